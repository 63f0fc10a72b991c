"""Models, tokenizer and data for bench/gpu_train.py: nothing downloaded, everything generated.

    shape = SHAPES["8b"]
    build_model(Path("/tmp/m8b"), shape, device="cuda", dtype="bf16")   # random weights, saved
    write_rows(Path("/tmp/train.jsonl"), n=160, lo=64, hi=2048, vocab=shape.vocab, seed=0)

Models are Llama-architecture configs at real shapes with RANDOM weights, built on the device and
written with `save_pretrained`, so the recipes load them through tunewire.loading as they would a
downloaded checkpoint. Speed and memory depend only on the shapes, not on the weights' values.

The tokenizer is a WordLevel vocabulary of generated words ("w0", "w1", ...) that covers the whole
model vocabulary, split on whitespace, with the ChatML template of tunewire.tiny_model: a row of
N words is exactly N tokens, so the generated lengths are the token lengths.

Rows are prompt/completion pairs whose total token lengths are log-uniform in [lo, hi] (real
instruction data is heavy-tailed: many short rows, a few long ones) with the completion 20-40%
of the row, as instruction-tuning sets have.
"""

from __future__ import annotations

import gc
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tunewire.tiny_model import CHAT_TEMPLATE, SPECIAL

ROLE_WORDS = ["user", "assistant", "system"]  # the chat template writes these as words
COMPLETION_SHARE = (0.2, 0.4)                 # completion tokens / row tokens, uniform in this range


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int             # hidden_size
    layers: int             # num_hidden_layers
    intermediate: int       # MLP intermediate_size
    heads: int              # num_attention_heads
    kv_heads: int           # num_key_value_heads (GQA)
    vocab: int              # vocab_size (the tokenizer covers exactly this many ids)
    tied: bool              # tie_word_embeddings (Llama-3.2-1B ties, Llama-3.1-8B does not)
    init_range: float = 0.02  # initializer_range: Llama's 0.02 at real shapes; the tiny model
                              # 0.2 so its logits are far from uniform and rounding shows in the loss

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide into heads, heads into kv_heads")
        if self.vocab <= len(SPECIAL) + len(ROLE_WORDS):
            raise ValueError("vocab too small for the special and role tokens")


SHAPES = {
    # Llama-3.2-1B: 1.24B parameters (embeddings tied)
    "1b": Shape("1b", 2048, 16, 8192, 32, 8, 128256, True),
    # Llama-3.1-8B: 8.03B parameters
    "8b": Shape("8b", 4096, 32, 14336, 32, 8, 128256, False),
    # the --smoke shape and part (a)'s model: seconds on a CPU
    "tiny": Shape("tiny", 64, 2, 128, 4, 2, 512, False, 0.2),
}


def build_tokenizer(out: Path, vocab: int):
    """Writes a tokenizer with exactly `vocab` ids (specials, role words, then w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + ROLE_WORDS + [f"w{i}" for i in range(vocab - len(SPECIAL) - len(ROLE_WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)  # already in the vocabulary: marks them special, same ids
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[1], eos_token=SPECIAL[2],
                                   pad_token=SPECIAL[0], unk_token=SPECIAL[0])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    if len(fast) != vocab:
        raise AssertionError(f"tokenizer has {len(fast)} ids, wanted {vocab}")
    return fast


def build_model(out: Path, shape: Shape, *, device: str = "cpu", dtype: str = "fp32",
                seed: int = 0) -> Path:
    """Random-weight LlamaForCausalLM of `shape`, built on `device` in `dtype` ("fp32"/"bf16")
    and saved with save_pretrained (+ tokenizer) to `out`; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, shape.vocab)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=shape.tied, initializer_range=shape.init_range,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will run: an 8B init on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    del model
    gc.collect()  # the model's reference cycles: free its GPU memory before the sides run
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


def row_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n token lengths, log-uniform in [lo, hi]."""
    rng = random.Random(seed)
    return [int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) for _ in range(n)]


def write_rows(path: Path, *, n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> dict:
    """Writes n prompt/completion rows (JSONL) whose tokenized length (completion + EOS
    included) is log-uniform in [lo, hi]; returns their length stats."""
    rng = random.Random(seed + 1)
    first = len(SPECIAL) + len(ROLE_WORDS)  # plain words only: no special tokens inside rows

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - first)}" for _ in range(k))

    lengths = row_lengths(n, lo, hi, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for total in lengths:
            completion = max(1, int(total * rng.uniform(*COMPLETION_SHARE)))
            prompt = max(1, total - completion - 1)  # - 1: the EOS the recipe appends
            f.write(json.dumps({"prompt": words(prompt), "completion": words(completion)}) + "\n")
    return {"rows": n, "lo": lo, "hi": hi, "mean_tokens": sum(lengths) / n,
            "max_tokens": max(lengths), "min_tokens": min(lengths)}
