"""Validation during training: the held-out split, the evaluation pass, and the bookkeeping that
picks the best checkpoint, stops early, and notices overfitting.

The recipes call `split_validation` once, `evaluate` at each evaluation step, and feed the result
to an `EvalTracker`, whose `Decision` says whether this checkpoint is the best so far, whether to
stop, and whether the run just started to overfit (validation loss up while training loss down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trainer_service import common
from trainer_service.data_batches import collate
from trainer_service.data_tokens import IGNORE
from trainer_service.spec import EvalSpec


def split_validation(rows: list[dict], spec: EvalSpec, seed: int) -> tuple[list[dict], list[dict]]:
    """Holds out `spec.fraction_for(len(rows))` of the tokenized rows (seeded), at least one."""
    frac = spec.fraction_for(len(rows))
    if frac <= 0 or len(rows) < 2:
        return rows, []
    n_val = min(len(rows) - 1, max(1, round(frac * len(rows))))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    held = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)])


def eval_every(spec: EvalSpec, total_steps: int) -> int:
    """The interval: eval_every_steps, or by default 10 per run but never closer than 5 steps
    (every interval also writes the resume state and its probe batch, ~1/3 of a step)."""
    return spec.eval_every_steps or max(5, total_steps // 10)


@torch.no_grad()
def evaluate(model, rows: list[dict], batch_size: int, pad_id: int,
             compute: common.Compute = common.Compute()) -> float:
    """Token-weighted mean loss over the labelled tokens of `rows` (dropout off), on the
    compute's device and under its autocast (the precision the job trains in)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(rows), batch_size):
        batch = collate(rows[first:first + batch_size], pad_id)
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
        with compute.autocast():
            total += common.completion_loss(model, compute.batch(batch), reduction="sum").item()
    if was_training:
        model.train()
    return total / max(count, 1)


@dataclass(frozen=True)
class Decision:
    best: bool          # this evaluation is the best so far: keep its checkpoint as the result
    stop: bool          # patience exhausted: stop training now
    overfitting: bool   # validation loss rose while training loss fell (reported once per streak)


@dataclass
class EvalTracker:
    patience: int                       # evaluations without improvement before stopping; 0 = never
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    stale: int = 0                      # evaluations since the last improvement
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, eval, train)
    _overfitting: bool = False

    def update(self, step: int, eval_loss: float, train_loss: float) -> Decision:
        best = eval_loss < self.best_loss - self.min_delta
        if best:
            self.best_loss, self.best_step, self.stale = eval_loss, step, 0
        else:
            self.stale += 1
        # "Rose" means by more than 1% (and min_delta): equal-looking losses are not a trend.
        rising = (bool(self.history) and eval_loss > self.history[-1][1] * 1.01 + self.min_delta
                  and train_loss < self.history[-1][2])
        newly = rising and not self._overfitting
        self._overfitting = rising
        self.history.append((step, eval_loss, train_loss))
        return Decision(best=best, stop=self.patience > 0 and self.stale >= self.patience,
                        overfitting=newly)
