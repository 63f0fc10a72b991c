"""How much GPU memory a training job needs, and what to change when it does not fit.

    est = estimate(spec)                      # reads <spec.base_model>/config.json
    est.total_bytes, est.to_dict()            # the pre-flight forecast (the VALIDATED event)
    check_fits(est, spec, gpu_total_bytes)    # INSUFFICIENT_GPU_MEMORY before any model load
    advice(spec)                              # "turn on gradient_checkpointing; ..." (only what applies)

The model: a Llama / Qwen / Mistral-style decoder described by its config.json. The peak of one
training step is the sum of
  weights       every parameter at the job's precision (nf4: the layers' linear weights at half a
                byte plus quantisation constants, embeddings / LM head / norms unquantised in fp32); full
                fine-tuning keeps fp32 master weights and, under autocast, the half-precision
                copies of the linear weights that the backward pass needs;
  adapter       LoRA's A and B matrices (fp32);
  gradients     of the trainable parameters, fp32;
  optimizer     AdamW's two fp32 moments per trainable parameter;
  activations   what the backward pass keeps, per token and layer, for micro_batch_size x
                max_seq_length tokens (the worst case: every row full length); with gradient
                checkpointing only each layer's input plus one layer recomputed at a time;
  logits        the LM head's output on the labelled columns (worst case: every column) and its
                fp32 log-softmax and gradient;
  overhead      the CUDA context and the caching allocator's slack (a GPU only).
The activation and logit constants were fitted to the peak of live tensor memory measured on CPU
(trainer_service/memory_measure.py; tests/test_memory.py checks the fit on other shapes); the GPU
bench (bench/gpu_train.py) compares the estimate with torch.cuda.max_memory_allocated.

Cheap to import: no torch; the estimate is arithmetic on the config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer_service.spec import JobSpec
from tunewire import reasons as R
from tunewire.errors import TunewireError

GIB = 1 << 30
FP32 = 4                                         # bytes: adapter, gradients, moments, master weights
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}        # bytes per weight / activation at a precision
ADAM_MOMENTS = 2                                 # AdamW keeps exp_avg and exp_avg_sq per parameter
NF4_WEIGHT = 0.5                                 # bitsandbytes nf4: 4 bits per weight
# Quantisation constants with double quantisation (bnb_4bit_use_double_quant, the QLoRA paper's
# setting): an 8-bit absmax per block of 64 weights plus an fp32 scale per 256 blocks.
NF4_CONSTANTS = 1 / 64 + FP32 / (64 * 256)
# peft's default targets for Llama / Qwen / Mistral when target_modules is empty.
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Activations kept for backward, in BYTES per token and decoder layer per element of the sizes
# (hidden, q_dim = heads x head_dim, kv_dim = kv_heads x head_dim, intermediate), by (method,
# compute precision is fp32). They cover the q/k/v/o and MLP inputs, RMSNorm's fp32 internals,
# SDPA's saved q/k/v/output, peft's fp32 input casts. Fitted by `python -m
# trainer_service.memory_measure --fit` (least squares on the measured peaks of small random
# Llamas, all-linear LoRA r=8), rounded; nf4 and fp16 use the bf16 row.
#                          hidden  q_dim  kv_dim  inter
ACT_PER_TOKEN_LAYER = {
    ("lora", True):  (16.0,    8.0,   8.0,   16.0),
    ("lora", False): (16.0,    6.0,   3.0,    8.0),
    ("full", True):  (29.0,    9.0,  10.0,   15.0),
    ("full", False): (29.0,    5.0,   5.0,    7.0),
}
# With gradient checkpointing, the one layer being recomputed in backward at its peak: its
# activations again plus the gradients flowing through it. Fitted the same way on models whose
# vocabulary is small enough (128) that this, not the loss, is the backward's peak.
CKPT_LAYER_PER_TOKEN = {
    ("lora", True):  (19.0,    8.0,   8.0,   23.0),
    ("lora", False): (27.0,    6.0,   5.0,   14.0),
    ("full", True):  (28.0,   11.0,   8.0,   32.0),
    ("full", False): (30.0,    6.0,   4.0,   14.0),
}
# Per token outside the layers (embedding output, final norm, LM-head input), bytes per hidden:
# 0: the fit has no separate term for it, so the per-layer constants absorb it.
ACT_OUTSIDE_LAYERS = 0.0
# With (non-reentrant) gradient checkpointing a layer keeps only its input: one hidden vector
# per token at the residual stream's dtype (fp32 for full fine-tuning, whose weights are fp32);
# backward recomputes one layer at a time, after the loss's backward is done.
CKPT_HIDDEN_COPIES = 1.0
# Per labelled token and vocabulary entry, at the loss's peak (its backward): the fp32
# log-softmax output kept for backward, its incoming gradient and the gradient it produces
# (3 x fp32), plus the LM head's own logits when they are not fp32 already (.float() copies them).
LOGIT_FP32_COPIES = 3
# AdamW's step on a GPU (torch's default foreach implementation) computes sqrt(exp_avg_sq) for
# every parameter at once: one fp32 temporary per trainable parameter, while the gradients live.
# On a CPU (single-tensor implementation) the temporaries are per tensor: 2 of the largest.
ADAMW_FOREACH_TEMPS = 1
ADAMW_SINGLE_TENSOR_TEMPS = 2
# A GPU only: the CUDA context, cuBLAS workspaces and kernels (~0.5-1 GiB on H100-class GPUs,
# outside torch's allocator), and the caching allocator's fragmentation (a share of what tensors
# use). Judgement, to be checked by bench/gpu_train.py (reserved vs allocated).
CUDA_CONTEXT_BYTES = 1 * GIB
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class MemoryEstimate:
    precision: str                          # compute precision the estimate assumes (fp32/bf16/fp16)
    params: int                             # the base model's parameters
    trainable_params: int                   # adapter parameters (LoRA) or every parameter (full)
    tokens: int                             # micro_batch_size x max_seq_length per forward
    weights_bytes: int                      # the model's weights as held during training
    adapter_bytes: int                      # LoRA A/B weights (fp32); 0 for full fine-tuning
    gradient_bytes: int                     # fp32 gradients of the trainable parameters
    optimizer_bytes: int                    # AdamW moments of the trainable parameters
    activation_bytes: int                   # kept for backward, without checkpointing
    activation_bytes_checkpointed: int      # kept for backward, with gradient checkpointing
    logits_bytes: int                       # the loss on the labelled columns at its peak
    overhead_bytes: int                     # CUDA context + allocator slack (the job's setting)
    device_total_bytes: int                 # the GPU's memory; 0 = unknown or a CPU
    total_bytes: int                        # the peak with the job's own checkpointing setting
    total_bytes_checkpointed: int           # the peak with gradient checkpointing on

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name != "precision" and value < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def allocated_bytes(self) -> int:
        """total_bytes without the overhead: what torch.cuda.max_memory_allocated would read."""
        return self.total_bytes - self.overhead_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "allocated_bytes": self.allocated_bytes}


@dataclass(frozen=True)
class Shapes:
    """The sizes of a decoder that the estimate needs, read from its config.json."""
    hidden: int
    layers: int
    intermediate: int
    q_dim: int           # attention heads x head_dim
    kv_dim: int          # key/value heads x head_dim
    vocab: int
    tied: bool           # LM head shares the embedding matrix
    attention_bias: bool  # q/k/v projections have biases (Qwen2)

    @classmethod
    def from_config(cls, c: dict) -> "Shapes":
        c = c.get("text_config", c)  # multimodal configs nest the language model's
        h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or h // heads)
        return cls(hidden=h, layers=int(c["num_hidden_layers"]),
                   intermediate=int(c["intermediate_size"]), q_dim=heads * head_dim,
                   kv_dim=int(c.get("num_key_value_heads") or heads) * head_dim,
                   vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)),
                   attention_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")))

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in, out) features of a linear module of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[name]

    @property
    def linear_params(self) -> int:
        """The decoder layers' linear weights (and q/k/v biases): what nf4 quantises."""
        per_layer = sum(a * b for a, b in map(self.module_shape, LINEAR_MODULES))
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        return self.layers * per_layer

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and the RMSNorm weights (2 per layer + the final)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def lora_params(shapes: Shapes, spec: JobSpec) -> int:
    """A (r x in) and B (out x r) per adapted module and layer (+ DoRA's magnitude vector)."""
    targets = spec.lora.target_modules or PEFT_DEFAULT_TARGETS
    if "all-linear" in targets:
        targets = LINEAR_MODULES
    n = 0
    for t in dict.fromkeys(targets):
        if t in LINEAR_MODULES:
            fan_in, fan_out = shapes.module_shape(t)
            n += shapes.layers * (spec.lora.r * (fan_in + fan_out) + (fan_out if spec.lora.use_dora else 0))
        elif t == "lm_head":
            n += spec.lora.r * (shapes.hidden + shapes.vocab)
        elif t == "embed_tokens":
            n += spec.lora.r * (shapes.vocab + shapes.hidden)
    return n


def job_precision(spec: JobSpec) -> str:
    """The precision a job computes in on a GPU: its setting, auto = bf16 (every GPU the
    estimate is for, Ampere or newer, has it; the worker passes the resolved one)."""
    p = spec.hyperparameters.precision
    return "bf16" if p == "auto" else p


def estimate(spec: JobSpec, *, config: dict | None = None, precision: str | None = None,
             device: str = "cuda", device_total_bytes: int = 0) -> MemoryEstimate:
    """The peak memory of one training step of `spec` (see the module docstring).

    config: the model's config.json as a dict (default: read from spec.base_model);
    precision: the resolved compute precision (default: the job's, auto = bf16);
    device: "cuda" (the GPU forecast: CUDA overhead, foreach AdamW) or "cpu" (what a CPU run
    holds: no overhead, single-tensor AdamW; tests compare it with memory_measure);
    device_total_bytes: the GPU's memory, recorded with the estimate (0 = unknown / a CPU)."""
    if config is None:
        config = json.loads((Path(spec.base_model) / "config.json").read_text())
    s = Shapes.from_config(config)
    hp = spec.hyperparameters
    precision = precision or job_precision(spec)
    b = BYTES[precision]
    full = spec.method == "full"

    if full:
        trainable = s.params
        # fp32 master weights; under autocast the half-precision copies of the linear weights
        # are made in the forward and kept by autograd until their layer's backward.
        weights = s.params * FP32 + (s.linear_params * b if b < FP32 else 0)
        adapter = 0
        largest = max(s.vocab * s.hidden, s.hidden * s.intermediate)
    else:
        trainable = lora_params(s, spec)
        if hp.quantization == "nf4":
            # peft's prepare_model_for_kbit_training (trainer_service/qlora.py) casts every
            # parameter it does not quantise (embeddings, LM head, norms) to fp32.
            weights = int(s.linear_params * (NF4_WEIGHT + NF4_CONSTANTS)) + s.other_params * FP32
        else:
            weights = s.params * b
        adapter = trainable * FP32
        largest = spec.lora.r * max(s.hidden, s.intermediate, s.q_dim)
    gradients = trainable * FP32
    optimizer = trainable * FP32 * ADAM_MOMENTS
    step_temps = (ADAMW_FOREACH_TEMPS * trainable if device == "cuda"
                  else ADAMW_SINGLE_TENSOR_TEMPS * largest) * FP32

    tokens = hp.micro_batch_size * hp.max_seq_length
    method = "full" if full else "lora"
    layer = tokens * per_layer_bytes(s, method, precision)
    recomputed = tokens * per_layer_bytes(s, method, precision, CKPT_LAYER_PER_TOKEN)
    stream = FP32 if full else b  # the residual stream's dtype (full: fp32 weights, autocast)
    outside = tokens * ACT_OUTSIDE_LAYERS * stream * s.hidden
    saved_inputs = tokens * s.layers * CKPT_HIDDEN_COPIES * stream * s.hidden
    act = s.layers * layer + outside
    act_ckpt = saved_inputs + outside + recomputed
    logits = tokens * s.vocab * (LOGIT_FP32_COPIES * FP32 + (b if b < FP32 else 0))

    # Two candidate peaks: the start of backward (activations, the loss's backward, the LoRA
    # gradients as they appear) and the optimizer step (every gradient plus AdamW's temporaries;
    # the activations are gone by then). Checkpointing recomputes a layer only after the loss's
    # backward, so that layer and the logits never coexist.
    resident = weights + adapter + optimizer
    step_peak = gradients + step_temps
    early = 0 if full else gradients

    def total(backward_peak: int) -> tuple[int, int]:
        allocated = int(resident + max(backward_peak + early, step_peak))
        overhead = int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * allocated) if device == "cuda" else 0
        return allocated + overhead, overhead

    plain, plain_overhead = total(act + logits)
    ckpt, ckpt_overhead = total(saved_inputs + outside + max(logits, recomputed))
    own, own_overhead = (ckpt, ckpt_overhead) if hp.gradient_checkpointing else (plain, plain_overhead)
    return MemoryEstimate(
        precision=precision, params=s.params, trainable_params=trainable, tokens=tokens,
        weights_bytes=weights, adapter_bytes=adapter, gradient_bytes=gradients,
        optimizer_bytes=optimizer, activation_bytes=int(act),
        activation_bytes_checkpointed=int(act_ckpt), logits_bytes=logits,
        overhead_bytes=own_overhead, device_total_bytes=device_total_bytes, total_bytes=own,
        total_bytes_checkpointed=ckpt)


def per_layer_bytes(s: Shapes, method: str, precision: str, table=None) -> float:
    """Activation bytes one decoder layer keeps for backward, per token (table: a layer
    recomputed under checkpointing)."""
    ch, cq, ckv, ci = (table or ACT_PER_TOKEN_LAYER)[(method, BYTES[precision] == FP32)]
    return ch * s.hidden + cq * s.q_dim + ckv * s.kv_dim + ci * s.intermediate


def advice(spec: JobSpec) -> str:
    """What to turn on or lower so that the job needs less GPU memory: only what applies."""
    hp = spec.hyperparameters
    tips = []
    if not hp.gradient_checkpointing:
        tips.append("turn on gradient_checkpointing")
    if hp.micro_batch_size > 1:
        # The smallest larger accumulation that still divides the batch (accumulation x
        # micro-batch always does, so there is one).
        per_pass = hp.num_processes * hp.num_nodes
        accum = next(a for a in range(hp.gradient_accumulation_steps + 1, hp.batch_size + 1)
                     if hp.batch_size % (a * per_pass) == 0)
        tips.append(f"lower the micro-batch ({hp.micro_batch_size} examples per pass): "
                    f"gradient_accumulation_steps={accum} keeps batch_size={hp.batch_size}")
    if hp.max_seq_length > 256:
        tips.append(f"lower max_seq_length (now {hp.max_seq_length})")
    if spec.method == "lora" and hp.quantization == "none":
        tips.append("QLoRA: quantization=nf4")
    if spec.method == "full":
        tips.append("method=lora (full fine-tuning keeps ~16 bytes per parameter)")
    if spec.method == "lora" and hp.micro_batch_size > 1:
        tips.append(f"more GPUs: num_processes={hp.num_processes * 2} (each takes a share of "
                    f"every batch)")
    return "; ".join(tips) if tips else "use a GPU with more memory"


def check_fits(est: MemoryEstimate, spec: JobSpec, gpu_total_bytes: int) -> None:
    """Refuses a job whose estimated peak exceeds the GPU's memory (0 = a CPU: never refused)."""
    if gpu_total_bytes and est.total_bytes > gpu_total_bytes:
        raise TunewireError(R.INSUFFICIENT_GPU_MEMORY,
                            f"needs ~{est.total_bytes / GIB:.1f} GiB, the GPU has "
                            f"{gpu_total_bytes / GIB:.1f} GiB: {advice(spec)}")
