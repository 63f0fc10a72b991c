"""Crash-safe training state: what a recipe needs to continue exactly where it stopped.

At every checkpoint interval the recipe writes `<job dir>/resume/state.pt` (atomically: a temp
file, then rename) with the trained weights, the optimizer, the RNG states, the data position
(the epoch's example order and the next index), the running losses and the evaluation tracker,
plus a *probe loss*: the eval-mode loss of a fixed batch under those weights. A worker started on
the same job directory finds the file, restores everything, recomputes the probe loss and refuses
to go on if it differs by more than `TOLERANCE` (the checkpoint would not be the run it claims).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer_service.evaluation import EvalTracker

FILE = Path("resume") / "state.pt"
TOLERANCE = 1e-4  # |probe loss after - before|, relative to the loss (fp32 on the same machine: ~1e-7)


@dataclass
class TrainState:
    step: int = 0                                   # optimizer steps done
    order: list[int] = field(default_factory=list)  # this epoch's example order
    pos: int = 0                                    # next index into `order`
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)
    since_eval: list[float] = field(default_factory=list)  # training losses since the last eval
    stopped_early: bool = False
    probe_loss: float = 0.0                         # eval-mode loss of the probe batch


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(job_dir: Path, state: TrainState, model, optimizer, shuffle: torch.Generator,
         tracker: EvalTracker) -> None:
    path = Path(job_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"state": asdict(state), "weights": trainable_state(model), "optimizer": optimizer.state_dict(),
            "shuffle": shuffle.get_state(), "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(), "tracker": asdict(tracker)}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous state intact


def load(job_dir: Path, model, optimizer, shuffle: torch.Generator) -> tuple[TrainState, EvalTracker] | None:
    """Restores weights, optimizer and RNGs in place; None when there is nothing to resume."""
    path = Path(job_dir) / FILE
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    shuffle.set_state(blob["shuffle"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    return TrainState(**blob["state"]), EvalTracker(**blob["tracker"])


def continuous(before: float, after: float) -> bool:
    return abs(after - before) <= TOLERANCE * max(1.0, abs(before))
