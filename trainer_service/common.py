"""Pieces every training recipe shares: where and in which precision it computes (`Compute`), the
learning-rate schedule, the completion-only loss, gradient clipping, and saving an adapter
(loading the base model is tunewire/loading.py). Recipes stay readable top to bottom and call
these; nothing here knows which method is being trained.

    compute = Compute.for_job(hp.precision, "auto")  # cuda:LOCAL_RANK + bf16 on a GPU, else CPU fp32
    batch = compute.batch(collate(rows, pad_id))     # the one place batches move to the device
    with compute.autocast():
        loss = completion_loss(model, batch)
    compute.backward(loss)                           # scaled for fp16 (GradScaler), else plain
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer_service.data_tokens import IGNORE
from tunewire import devices
from tunewire.adapters import TRAINING_INFO

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Compute:
    """Where a job computes and in which precision; the default is today's CPU fp32 run."""
    device: torch.device = CPU        # the model, batches, loss and gradients live here
    dtype: torch.dtype = torch.float32  # the job's precision: autocast's dtype (fp32: no autocast)
    # fp16 only: torch.amp.GradScaler (fp16's 5 exponent bits underflow small gradients; bf16
    # has fp32's range and needs none). None otherwise.
    scaler: object | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported compute dtype {self.dtype}")
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device")

    @classmethod
    def for_job(cls, precision: str, device: str = "auto") -> "Compute":
        """The device of the trainer's `device` setting and the job's `precision` on it
        (tunewire.devices: fp16 on a CPU and cuda without a GPU are refused, DEVICE_UNAVAILABLE)."""
        dev = devices.resolve_device(device)
        dtype = devices.resolve_precision(precision, dev)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return cls(dev, dtype, scaler)

    @property
    def precision(self) -> str:
        return devices.precision_name(self.dtype)

    def autocast(self):
        """The forward's context: autocast to the job's dtype, nothing at fp32 (so a CPU fp32 run
        is bit for bit what it was before there were precisions)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def batch(self, batch: dict) -> dict:
        """`batch` with its tensors on the device (other values, e.g. a packed batch's None mask
        and num_tokens, as they are). A no-op copy-free pass on the CPU."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        """Before clipping: fp16 gradients back to their true scale (a no-op otherwise)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        """optimizer.step(); with fp16 the scaler skips a step whose gradients overflowed and
        adjusts its scale."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def synchronize(self) -> None:
        devices.synchronize(self.device)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (memory
    per token ~ one hidden vector per layer). Non-reentrant checkpointing: it needs no input that
    requires grad (a frozen embedding under LoRA is fine) and works under DDP and autocast."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a cache is useless in training and conflicts with recompute


def save_adapter(model, path: Path) -> Path:
    # The adapter's weights are saved as they are trained: fp32 (peft keeps LoRA weights fp32 on
    # a bf16/fp16 base). Lossless; vLLM casts them to its serving dtype when it loads them.
    model.save_pretrained(path)
    # peft also writes a model card; the adapter store holds only weights and config.
    (path / "README.md").unlink(missing_ok=True)
    return path


def write_training_info(artifact_dir: Path, spec, compute: Compute) -> Path:
    """Records next to the artifact how it was trained (the manifest's `training`, adapters.py)."""
    hp = spec.hyperparameters
    info = {"precision": compute.precision, "device": compute.device.type,
            "quantization": hp.quantization, "gradient_checkpointing": hp.gradient_checkpointing,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps}
    path = Path(artifact_dir) / TRAINING_INFO
    path.write_text(json.dumps(info, sort_keys=True) + "\n")
    return path


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Rate for 1-based `step`: linear up to `peak` over warm-up, then linearly down toward 0.

    Neither end wastes a step at rate 0: step 1 of a warm-up already moves, and the last step
    runs at peak / (steps after warm-up).
    """
    if step <= warmup_steps:
        return peak * step / warmup_steps
    return peak * (total_steps - step + 1) / max(total_steps - warmup_steps, 1)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The gradients' total L2 norm before clipping (what a step reports as grad_norm); the
    gradients are scaled down to `max_norm` when over it, and left exactly as they are when
    max_norm is 0 (hyperparameters.max_grad_norm: 0 = no clipping)."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def completion_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the labelled (completion) tokens of the batch: their mean,
    or their sum with reduction="sum" (evaluation weighs every token equally across batches)."""
    return labelled_loss(model, batch["labels"], reduction, input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"])


def labelled_loss(model, labels: torch.Tensor, reduction: str = "mean", **inputs) -> torch.Tensor:
    """Cross-entropy of the model's next-token logits against `labels` (IGNORE carries no loss).

    No wasted work: the LM head (hidden x vocabulary, ~20% of a small model's FLOPs, plus the
    softmax over the vocabulary) runs only on the sequence positions where some row of the batch
    has a label, through transformers' `logits_to_keep` (an index tensor). The prompt columns
    are skipped; the loss is the same (tests/test_units.py). The call still goes through the
    model's (and DDP's) own forward, so gradient hooks, soft-capping and scaling all apply.
    """
    targets = labels[:, 1:]  # token t predicts token t + 1
    columns = (targets != IGNORE).any(0).nonzero().squeeze(1)
    if len(columns) and _takes_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=columns).logits
        targets = targets[:, columns]
    else:  # a model without logits_to_keep, or nothing labelled (the mean is then NaN, as before)
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE, reduction=reduction)


def _takes_logits_to_keep(model) -> bool:
    """Whether the causal LM inside `model` (a peft model, DDP, or the bare model) accepts
    `logits_to_keep` as an index tensor (transformers 5 models do; remote code may not)."""
    inner = getattr(model, "module", model)  # DDP wraps the model in .module
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    return _forward_has(type(inner), "logits_to_keep")


@functools.cache
def _forward_has(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters
