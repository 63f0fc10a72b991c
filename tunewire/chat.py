"""Chat messages: the roles tunewire accepts and the one way a conversation becomes a prompt.

Training (`messages` rows), serving (`GenerateRequest.messages`) and the worker's in-process JSON
eval render a conversation with the base model's chat template through `render_prompt`, so an
adapter is served exactly the token sequences it was trained on, and a role that training
accepts is one serving accepts.

    render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])  # text up to the answer
"""

from __future__ import annotations

# Roles chat templates know (OpenAI's, plus Llama's "ipython"); the template decides what each means.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as text, ending with the template's generation prompt (where the
    assistant's answer starts). Encode it without special tokens: the template writes its own."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
