"""Crash-safe training state: what a recipe needs to continue exactly where it stopped.

At every checkpoint interval the recipe writes `<job dir>/resume/state.pt` (atomically: a temp
file, then rename) with the trained weights, the optimizer, the RNG states, the data position
(the epoch's example order and the next index), the running losses and the evaluation tracker,
plus a *probe loss*: the eval-mode loss of a fixed batch under those weights. A worker started on
the same job directory finds the file, restores everything, recomputes the probe loss and refuses
to go on if it differs by more than `TOLERANCE[precision]` (the checkpoint would not be the run
it claims).

On a GPU: the file is read onto the CPU (map_location) and copied into the device's parameters;
the optimizer's state follows its parameters (Optimizer.load_state_dict moves each state tensor
to its parameter's device). The RNG states include every CUDA device's (dropout on the GPU).

The continuity tolerance, relative to the loss (max(1, |loss|)), by the job's precision:

    fp32  1e-4   same machine: ~1e-7 seen; fp32's epsilon is 1.2e-7, so 1e-4 leaves ~1000 ulps
                 for a different reduction order (another thread count, another kernel)
    bf16  1e-2   bf16 keeps 8 significant bits: epsilon 2^-7 = 7.8e-3. A restarted process may
                 pick other matmul kernels (cuBLAS heuristics, split-K) whose bf16 outputs differ
                 by about one rounding (2^-8 relative); that reaches the loss through every layer
                 (mostly averaging out over the probe's tokens), so ~1 epsilon bounds honest
                 drift; a checkpoint of another step still fails (its loss differs by far more)
    fp16  2e-3   fp16 keeps 11 bits: epsilon 2^-10 = 9.8e-4; the same reasoning, ~2 epsilon
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer_service.evaluation import EvalTracker

FILE = Path("resume") / "state.pt"
# |probe loss after - before| / max(1, |before|), by the job's precision (see the docstring).
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}


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
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(), "tracker": asdict(tracker)}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous state intact


def load(job_dir: Path, model, optimizer, shuffle: torch.Generator) -> tuple[TrainState, EvalTracker] | None:
    """Restores weights, optimizer and RNGs in place; None when there is nothing to resume."""
    path = Path(job_dir) / FILE
    if not path.is_file():
        return None
    # Onto the CPU first: the file may come from another device layout; copy_ and the optimizer
    # put every tensor on its parameter's device.
    blob = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    shuffle.set_state(blob["shuffle"])
    torch.set_rng_state(blob["torch_rng"])
    cuda_rng = blob.get("cuda_rng") or []
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    random.setstate(blob["python_rng"])
    return TrainState(**blob["state"]), EvalTracker(**blob["tracker"])


def continuous(before: float, after: float, precision: str = "fp32") -> bool:
    """Whether the probe loss recomputed after a restart continues the run (TOLERANCE[precision])."""
    return abs(after - before) <= TOLERANCE[precision] * max(1.0, abs(before))
