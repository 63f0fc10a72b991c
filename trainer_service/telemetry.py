"""Model FLOPs per training step and MFU (model FLOPs utilisation), for each metric point.

    stats = model_stats(model)                               # once, after LoRA is added
    flops = step_flops(stats, tokens, seq_len, head_tokens)  # one optimizer step (this process)
    point_mfu = mfu(flops, step_seconds, devices.peak_flops(dev, dtype))   # 0 on a CPU

The count (per token, N = non-embedding parameters: every weight matrix of the decoder layers,
adapter matrices included, not the input embedding and not the LM head):

* forward: 2N (one multiply-add per weight);
* backward, gradient w.r.t. the inputs: 2N (needed through every layer, frozen or not);
* backward, gradient w.r.t. the weights: 2N_trainable (only weights that train: LoRA's A and B
  under LoRA, all of N in full fine-tuning);
* attention (no weights): QK^T and attention x V are 2 x 2 x d_attn FLOPs per (query, key)
  pair per layer forward, and twice that backward (gradients to both operands). Causal: a
  query at position t sees t + 1 keys, so a row of length T has T(T + 1)/2 pairs, and the
  step's attention is 3 x 4 x layers x d_attn x pairs; `seq_len` = pairs / tokens (the mean
  number of keys a token attends to, `attention_pairs`);
* the LM head: 2 x hidden x vocab per position it runs on (`head_tokens`: the loss keeps only
  labelled columns, common.labelled_loss) forward + the same backward to its input, + weight
  gradient when it trains.

What is NOT counted: gradient checkpointing's recomputed forward (counting it would make this
HFU, hardware FLOPs utilisation, not MFU), embedding lookups, norms, activations, softmax and
the optimizer (all O(N) or O(d) per token, negligible next to the matmuls). MFU is therefore a
conservative, comparable number: PaLM's definition (Chowdhery et al. 2022, appendix B) with
causal attention counted once per (query, key) pair actually computed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelStats:
    """What the FLOP count needs from a model (see the module docstring)."""
    params: int             # N: non-embedding, non-head parameters (adapter matrices included)
    trainable_params: int   # N_trainable: the part of N that gets weight gradients
    layers: int             # decoder layers
    attention_dim: int      # num_attention_heads x head_dim (the width of Q and of the output)
    head_params: int        # LM head: hidden x vocab
    head_trainable: bool    # the head gets a weight gradient (full fine-tuning)

    def __post_init__(self):
        if min(self.params, self.trainable_params, self.layers, self.attention_dim,
               self.head_params) < 0 or self.trainable_params > self.params:
            raise ValueError(f"inconsistent model stats {self}")


def model_stats(model) -> ModelStats:
    """The stats of a causal LM (bare, peft-wrapped or DDP-wrapped), from its parameters and config."""
    inner = getattr(model, "module", model)  # DDP
    lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    head_w = head.weight if head is not None else None
    skip = {id(emb)} | ({id(head_w)} if head_w is not None else set())
    params = trainable = 0
    for p in inner.parameters():  # a shared (tied) tensor is yielded once
        if id(p) in skip:
            continue
        n = _numel(p)
        params += n
        trainable += n if p.requires_grad else 0
    cfg = lm.config
    cfg = getattr(cfg, "text_config", cfg) if not hasattr(cfg, "num_hidden_layers") else cfg
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    head_params = int(head_w.shape[0] * head_w.shape[1]) if head_w is not None else 0
    return ModelStats(params=params, trainable_params=trainable, layers=cfg.num_hidden_layers,
                      attention_dim=heads * head_dim, head_params=head_params,
                      head_trainable=bool(head_w is not None and head_w.requires_grad))


def _numel(p) -> int:
    """Elements of a parameter; a bitsandbytes 4-bit weight stores two per byte, so its
    logical size is in its quant_state (the matmul still costs 2 FLOPs per logical weight)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        n = 1
        for s in shape:
            n *= int(s)
        return n
    return p.numel()


def attention_pairs(lengths: list[int]) -> int:
    """(query, key) pairs causal attention computes over rows of these lengths: T(T + 1)/2 each."""
    return sum(t * (t + 1) // 2 for t in lengths)


def step_flops(stats: ModelStats, tokens: int, seq_len: float, head_tokens: int = 0) -> float:
    """Model FLOPs of one training step of `tokens` tokens (forward + backward, see the module
    docstring). `seq_len`: the rows' token-weighted causal span, attention_pairs(lengths) / tokens
    (for rows all of length T: (T + 1) / 2); `head_tokens`: positions the LM head runs on."""
    dense = (4 * stats.params + 2 * stats.trainable_params) * tokens
    attention = 3 * stats.layers * 4 * stats.attention_dim * seq_len * tokens
    head = (4 + (2 if stats.head_trainable else 0)) * stats.head_params * head_tokens
    return float(dense + attention + head)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Achieved model FLOP/s over the device's peak: 0 when the peak is unknown (a CPU)."""
    if peak_flops <= 0 or seconds <= 0:
        return 0.0
    return flops / seconds / peak_flops
