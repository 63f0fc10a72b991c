"""Data-parallel training across processes (DDP) for the LoRA recipe: the few collectives it needs.

torchrun starts `num_processes` workers (see launcher.py); each calls `init()`, which joins the
process group torchrun describes in the environment. Every rank holds the whole model and trains
on its slice of each global batch; DistributedDataParallel averages the gradients, so the ranks'
weights stay identical. Rank 0 alone reports, evaluates and writes files; the other ranks follow
its decisions through `any_rank`.

Without torchrun (WORLD_SIZE unset or 1) every helper here is the identity: the single-process
path is the plain loop it always was.

On GPUs: each rank computes on cuda:LOCAL_RANK (`init` makes it the current device before
joining, as NCCL requires), the group is `cpu:gloo,cuda:nccl` (DDP's gradient all-reduce and
its weight broadcast go over NCCL; the small CPU tensors of `any_rank` / `sum_all` and the
object collectives go over gloo, so they need no device copy), and DDP gets `device_ids`.

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


class PeerLost(Exception):
    """A collective failed: another rank died or went away."""


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    """Joins torchrun's process group when there is one (WORLD_SIZE > 1). With GPUs, this rank's
    GPU (LOCAL_RANK) becomes the current device first: NCCL binds a communicator to the current
    device, and without it every rank would use GPU 0 (devices.resolve_device picks the same one)."""
    if env_world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
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
    """The model to train with: DDP around it when distributed, else the model itself. On a GPU
    DDP gets device_ids=[this rank's GPU] (the model's own device)."""
    if world_size() == 1:
        return model
    dev = next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    with collective():  # the constructor broadcasts rank 0's weights
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                         forward_sync_buffers=False)


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


def step_loss(model, micro_batches: list[dict], *, n_labels: int, real_tokens: int, counts: bool,
              compute: common.Compute, loss_fn=common.completion_loss) -> tuple[float, int]:
    """Forward and backward of this rank's micro-batches of one optimizer step; returns (the
    step's loss over the global batch, the global batch's real tokens).

    The gradient is the one of the token-mean loss over the WHOLE step (every rank, every
    micro-batch): each micro-batch's summed loss is weighted by world_size / n_labels, n_labels
    being the labelled tokens of the global batch (data_batches.labelled_tokens; every rank knows the global
    batch, so no collective is needed before the backward), and DDP averages over the ranks.
    The micro-batches' gradients add up in .grad; DDP all-reduces only on the last one (no_sync
    on the others). A single micro-batch in a single process keeps the plain token-mean loss (the
    CPU run bit for bit as before accumulation). `loss_fn(model, batch, reduction)`:
    common.completion_loss, or packing.packed_loss for packed rows. `counts` False: this rank
    has no rows in a short last batch and runs one with weight 0 (DDP needs every rank in every
    backward). The reported loss and tokens are all-reduced once, after the backward passes.
    """
    world = world_size()
    single = world == 1 and len(micro_batches) == 1
    scale = world / max(n_labels, 1)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            batch = compute.batch(batch)
            with compute.autocast():
                if single:
                    loss = loss_fn(model, batch)
                    value = loss.detach()
                else:
                    value = loss_fn(model, batch, "sum") * (1.0 if counts else 0.0)
                    loss, value = value * scale, value.detach()
            with collective():  # with DDP the last backward all-reduces the gradients
                compute.backward(loss)
        total = total + value  # a device tensor: no synchronisation per micro-batch
    if single:
        return float(total), real_tokens
    loss_sum, n_tokens = sum_all([float(total), real_tokens if counts else 0])
    return loss_sum / max(n_labels, 1), int(n_tokens)


def checksum(params) -> str:
    """sha256 of the parameters' bytes (copied to the CPU; any dtype, bf16 included): equal on
    every rank when DDP kept them in step."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
