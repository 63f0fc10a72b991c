"""Data-parallel training across processes (DDP) for the LoRA recipe: the few collectives it needs.

torchrun starts `num_processes` workers (see launcher.py); each calls `init()`, which joins the
process group torchrun describes in the environment. Every rank holds the whole model and trains
on its slice of each global batch; DistributedDataParallel averages the gradients, so the ranks'
weights stay identical. Rank 0 alone reports, evaluates and writes files; the other ranks follow
its decisions through `any_rank`.

Without torchrun (WORLD_SIZE unset or 1) every helper here is the identity: the single-process
path is the plain loop it always was.

A collective fails when a peer died (kill -9, OOM): it then raises `PeerLost`, which the worker
treats as a crash (exit non-zero, no failure report) so that the job is retried from its last
checkpoint rather than failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os

import torch
import torch.distributed as dist

from trainer_service import common
from trainer_service.data_tokens import IGNORE


class PeerLost(Exception):
    """A collective failed: another rank died or went away."""


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    """Joins torchrun's process group when there is one (WORLD_SIZE > 1)."""
    if env_world_size() > 1 and not dist.is_initialized():
        # CPU tensors go over gloo; CUDA tensors, where a GPU is, over NCCL.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def collective():
    """Wraps work that talks to the other ranks: a failure there means a peer is gone."""
    try:
        yield
    except RuntimeError as e:
        if world_size() == 1:
            raise
        raise PeerLost(f"rank {rank()}: {e}") from e


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (stop requests, rank 0's early stopping)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)])
    with collective():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_all(values: list[float]) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    with collective():
        dist.all_reduce(t)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    with collective():
        dist.all_gather_object(out, obj)
    return out


def wrap(model):
    """The model to train with: DDP around it when distributed, else the model itself."""
    if world_size() == 1:
        return model
    with collective():  # the constructor broadcasts rank 0's weights
        return torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)


def shard(ids: list[int]) -> tuple[list[int], bool]:
    """This rank's contiguous slice of a global batch (batch_size / world_size ids) and whether it
    counts. A short last batch of an epoch can leave a rank nothing: it then runs the first id
    with weight 0, since DDP needs every rank in every backward."""
    n, r = world_size(), rank()
    if n == 1:
        return ids, True
    per = math.ceil(len(ids) / n)
    mine = ids[r * per:(r + 1) * per]
    return (mine, True) if mine else (ids[:1], False)


def batch_loss(model, batch: dict[str, torch.Tensor], counts: bool = True) -> tuple[torch.Tensor, float, int]:
    """(loss to backpropagate, the global batch's loss, its real tokens).

    Single process: the batch's token-mean completion loss. DDP: each rank's summed loss over the
    global batch's label count, times world_size since DDP averages gradients, so the gradient
    is the one a single process would get on the whole global batch; the reported loss is that
    same token-weighted mean, all-reduced, and the real tokens are summed over the ranks.
    """
    real_tokens = int(batch["attention_mask"].sum())  # padding is not throughput
    if world_size() == 1:
        loss = common.completion_loss(model, batch)
        return loss, loss.item(), real_tokens
    loss_sum = common.completion_loss(model, batch, reduction="sum")
    if not counts:
        loss_sum, real_tokens = loss_sum * 0.0, 0
    labels = int((batch["labels"][:, 1:] != IGNORE).sum()) if counts else 0
    total, n_labels, n_tokens = sum_all([loss_sum.item(), labels, real_tokens])
    n_labels = max(n_labels, 1.0)
    return loss_sum * (world_size() / n_labels), total / n_labels, int(n_tokens)


def checksum(params) -> str:
    """sha256 of the parameters' bytes: equal on every rank when DDP kept them in step."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
