"""Checked examples to token ids and labels, exactly as serving will feed the model.

Only the completion, the last assistant turn, or the whole text is trained on (the other
positions' label is IGNORE). The tokenization copies what serving feeds the model for the same
request, so the adapter learns on exactly the token sequences it will see:

- prompt/completion: the prompt is `tokenizer(prompt).input_ids` (with the tokenizer's default
  special tokens, e.g. BOS), as vLLM's completions endpoint encodes a raw prompt; the completion
  is encoded without special tokens and followed by EOS, which is labelled so the model learns
  to stop.
- messages: the chat template renders the conversation to text, which is encoded without special
  tokens (the template writes its own), as vLLM's chat endpoint does. Labels start after the
  generation prompt of the last turn and end with the end-of-turn token; whatever the template
  writes after it (e.g. a newline) is never generated, so it is cut off.
- text: `tokenizer(text).input_ids` plus EOS, every token labelled.
- classification rows are not tokenized here (recipe_classifier reads them with
  tunewire.features, as serving's Classify does).

    rows, stats = tokenize_dataset(load_examples(path), tokenizer, max_seq_length=512)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from tunewire import reasons as R
from tunewire.chat import render_prompt
from tunewire.errors import TunewireError

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def end_ids(tokenizer, eos_ids: Collection[int] | None = None) -> set[int]:
    """The tokens that end a turn: `eos_ids` (e.g. generation_config's) and the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise TunewireError(R.BASE_MODEL_INVALID, "the tokenizer has no EOS token")
    return set(eos_ids or ()) | {tokenizer.eos_token_id}


def encode_example(example: dict, tokenizer, *,
                   eos_ids: Collection[int] | None = None) -> tuple[list[int], list[int]]:
    """Full (untruncated) input ids and labels of one checked example. `eos_ids` are the extra
    tokens that end an assistant turn (the tokenizer's EOS always does)."""
    eos = tokenizer.eos_token_id
    if "label" in example:
        raise TunewireError(R.DATASET_INVALID, "text/label rows are classification data for a "
                            "feature-extraction method, not causal-LM training; use prompt/"
                            "completion, messages or text rows")
    if "text" in example:
        ids = tokenizer(example["text"]).input_ids
        ids = ids if ids and ids[-1] == eos else ids + [eos]  # unless the tokenizer adds it
        return ids, list(ids)
    if "messages" in example:
        msgs = example["messages"]
        prefix_text = render_prompt(tokenizer, msgs[:-1])  # exactly what serving sends
        full_text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prefix = tokenizer(prefix_text, add_special_tokens=False).input_ids
        full = tokenizer(full_text, add_special_tokens=False).input_ids
        if full[:len(prefix)] != prefix:
            raise TunewireError(R.DATASET_INVALID, "the chat template renders the conversation "
                                "without the generation prompt as a prefix, so the assistant turn "
                                "cannot be told apart; use prompt/completion rows instead")
        answer = full[len(prefix):]
        ends = end_ids(tokenizer, eos_ids)
        end = next((i for i, t in enumerate(answer) if t in ends), None)
        # Keep the answer through its end-of-turn token; the template's text after it is never
        # generated. A template that does not end turns with EOS gets one, so the model stops.
        answer = answer[:end + 1] if end is not None else answer + [eos]
        return prefix + answer, [IGNORE] * len(prefix) + answer
    prompt = tokenizer(example["prompt"]).input_ids
    completion = tokenizer(example["completion"], add_special_tokens=False).input_ids + [eos]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def trained_tokens(labels: list[int]) -> int:
    """How many positions carry loss. Position 0 never does: nothing precedes it to predict it."""
    return sum(t != IGNORE for t in labels[1:])


@dataclass(frozen=True)
class TokenStats:
    examples: int       # examples kept for training
    truncated: int      # of those, how many lost tokens to max_seq_length
    dropped: int        # examples with no labelled token left after truncation (not trained on)
    tokens: int         # tokens in the kept examples
    label_tokens: int   # of those, how many carry loss


def tokenize_dataset(examples: list[dict], tokenizer, max_seq_length: int, *,
                     eos_ids: Collection[int] | None = None) -> tuple[list[dict], TokenStats]:
    """Tokenizes every example as {input_ids, labels} cut to its first max_seq_length tokens,
    drops those left without a labelled token, and counts what was cut."""
    eos = end_ids(tokenizer, eos_ids)
    rows, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, labels = encode_example(ex, tokenizer, eos_ids=eos)
        cut = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if not trained_tokens(labels):
            dropped += 1
            continue
        truncated += cut
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise TunewireError(R.DATASET_EMPTY, f"none of the {dropped} examples has a completion token "
                            f"within max_seq_length={max_seq_length}, leaving nothing to train on")
    stats = TokenStats(examples=len(rows), truncated=truncated, dropped=dropped,
                       tokens=sum(len(r["input_ids"]) for r in rows),
                       label_tokens=sum(trained_tokens(r["labels"]) for r in rows))
    return rows, stats
