"""Pieces every training recipe shares: the learning-rate schedule, the completion-only loss,
gradient clipping, and saving an adapter (loading the base model is tunewire/loading.py). Recipes stay readable top
to bottom and call these; nothing here knows which method is being trained.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer_service.data_tokens import IGNORE


def save_adapter(model, path: Path) -> Path:
    model.save_pretrained(path)
    # peft also writes a model card; the adapter store holds only weights and config.
    (path / "README.md").unlink(missing_ok=True)
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
