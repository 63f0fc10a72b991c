"""Build a tiny random Llama (model + byte-level BPE tokenizer + chat template) on disk.

Tests and benchmarks use it instead of downloading anything: it loads in HF transformers, peft and
vLLM like a real checkpoint. `initializer_range=0.2` keeps greedy choices well separated, so greedy
outputs agree across HF and vLLM. hidden 128 / 4 heads = head_dim 32, the smallest head size
vLLM's CPU attention supports.

    python -m tunewire.tiny_model /tmp/tiny   # writes config, safetensors, tokenizer
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    # Enough JSON-ish text that the BPE learns braces, quotes, digits and common words.
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    cities = ["paris", "oslo", "lima", "rome", "kyiv", "cairo", "tokyo", "quito"]
    lines = []
    for i, (n, c) in enumerate(zip(names * 8, cities * 8)):
        lines.append(f'{n} is {20 + i} years old and lives in {c}.')
        lines.append(json.dumps({"name": n, "age": 20 + i, "city": c}))
    lines += ["Extract the person as JSON:", "user", "assistant", "system", "true false null"]
    return lines


def build_tiny_llama(out_dir: str | Path, *, hidden_size: int = 128, num_layers: int = 2,
                     vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a random LlamaForCausalLM and its tokenizer to `out_dir`; returns the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tunewire-tiny"))
