"""The training loop every causal-LM recipe shares: steps, metrics, evaluation, checkpoints, early
stopping, crash-safe resume and the final best-checkpoint selection.

A recipe sets up (data, model, optimizer), calls `train(...)` once and reports its artifact; what
differs between recipes is passed in explicitly:

* `save_dir(path)`: writes a loadable directory from the current weights (a peft adapter, or a
  full model + tokenizer). Used for every checkpoint and for the result when there is no
  validation (no best checkpoint).
* `place_best(checkpoint_dir, final_dir)`: puts the best checkpoint in place as the result
  (a copy, or hard links for full models).
* `keep_best_and_latest`: deletes every other checkpoint after each one is written (full models,
  where each checkpoint is a copy of the weights).
* `packed`: the training rows are packed (packing.collate_packed / packed_loss) or not.
* `compute` (common.Compute): the device and precision; the default is CPU fp32.

Per step: a new epoch draws a shuffled order from a generator seeded with hp.seed; linear warm-up
then decay (common.learning_rate), AdamW, gradient clipping. The step's batch_size examples are
split into micro-batches of hp.micro_batch_size per process (gradient_accumulation_steps of them
per process); distributed.step_loss weights them so that the step's gradient is that of the
token-mean loss over the whole batch. Each metric point carries the step time (measured after
synchronising the device), peak GPU memory and MFU (telemetry.py; both 0 on a CPU). A CUDA
out-of-memory in a step or an evaluation fails the job as OUT_OF_MEMORY with memory.advice. Every `eval.eval_every` steps (and at
the last) rank 0 evaluates on the validation rows, writes a checkpoint, lets the EvalTracker pick
the best / stop early / notice overfitting, and writes the resume state (resume.py) with the
probe loss of a fixed batch. A run started on a directory with resume state restores it, checks
the probe loss and reports RESUMED, then continues exactly where the state was written.

Data parallel (torchrun, see distributed.py): every rank runs this; rank 0 alone evaluates, writes
and saves; stop and early-stop decisions reach every rank through `distributed.any_rank`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from trainer_service import common, distributed, evaluation, memory, packing, resume, telemetry
from trainer_service.data_batches import collate, labelled_tokens, real_tokens
from trainer_service.data_rows import load_examples
from trainer_service.data_tokens import IGNORE, tokenize_dataset
from tunewire import devices, loading
from trainer_service.resume import TrainState
from trainer_service.spec import JobSpec
from tunewire import reasons as R
from tunewire.errors import TunewireError


class Reporter(Protocol):
    def started(self, trainable_params: int, total_params: int, total_steps: int) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, str],
              metrics: dict[str, float] | None = None) -> None: ...
    def metric(self, *, step: int, epoch: float, loss: float, learning_rate: float,
               grad_norm: float, tokens_per_second: float, tokens_seen: int,
               total_steps: int, step_seconds: float = 0.0, peak_gpu_memory_bytes: int = 0,
               mfu: float = 0.0) -> None: ...
    def evaluation(self, *, step: int, metrics: dict[str, float]) -> None: ...


class Cancelled(Exception):
    """should_stop() turned true; nothing was saved."""


def micro_batches(rows: list[dict], size: int, pad_id: int, packed: bool) -> list[dict]:
    """`rows` (this process's share of a step) as collated CPU batches of at most `size` rows."""
    make = packing.collate_packed if packed else collate
    return [make(rows[i:i + size], pad_id) for i in range(0, len(rows), size)]


@contextlib.contextmanager
def out_of_memory(spec: JobSpec, compute: common.Compute, what: str, step: int):
    """A CUDA out-of-memory inside becomes the user error OUT_OF_MEMORY: what ran out, the peak,
    the GPU's size and what to change (memory.advice), instead of a TRAINING_ERROR."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        gib = 1024 ** 3
        peak = devices.peak_memory_bytes(compute.device) / gib
        total = devices.total_memory_bytes(compute.device) / gib
        raise TunewireError(R.OUT_OF_MEMORY, f"GPU memory ran out in {what} at step {step}: peak "
                            f"{peak:.1f} GiB of {total:.1f} GiB; " + memory.advice(spec)) from None


def copy_dir(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


@dataclass
class Outcome:
    state: TrainState
    tracker: evaluation.EvalTracker
    train_seconds: float
    ranks: list[dict] = field(default_factory=list)  # every rank's {"pid", "checksum"} after training
    result: dict[str, float] = field(default_factory=dict)  # best_step ... when a best was selected
    saved: bool = False  # this rank wrote the artifact (rank 0)

    def metrics(self) -> dict[str, float]:
        return {**self.result, **loss_metrics(self.state.losses), "steps": float(self.state.step),
                "train_tokens": float(self.state.tokens_seen), "train_seconds": self.train_seconds}


TAIL_STEPS = 10  # tail_loss averages the last this-many steps: one step's loss is noisy


def loss_metrics(losses: list[float]) -> dict[str, float]:
    """The job result's loss metrics, from every step's loss in order (what MetricPoints streamed):
    final_loss is the last step's loss exactly, tail_loss the mean of the last TAIL_STEPS steps,
    train_loss the mean of all of them (docs/training.md, "Metrics")."""
    tail = losses[-TAIL_STEPS:]
    return {"train_loss": sum(losses) / len(losses), "final_loss": losses[-1],
            "tail_loss": sum(tail) / len(tail)}


def prepare_data(spec: JobSpec, tokenizer, reporter: Reporter):
    """Loads and tokenizes the data: (training rows, validation rows, what the steps draw from —
    the training rows, or packed rows with packing —, token stats). Reports DATASET_LOADED."""
    hp = spec.hyperparameters
    examples = load_examples(spec.training_data)
    eos_ids = loading.stop_ids(spec.base_model, tokenizer)
    rows, stats = tokenize_dataset(examples, tokenizer, hp.max_seq_length, eos_ids=eos_ids)
    if spec.validation_data:
        val_rows, _ = tokenize_dataset(load_examples(spec.validation_data, source="validation"),
                                       tokenizer, hp.max_seq_length, eos_ids=eos_ids)
    else:
        rows, val_rows = evaluation.split_validation(rows, spec.eval, hp.seed)
    # What the steps train on: the rows, or with packing the packed rows (evaluation, the probe
    # and the warm-up keep the rows).
    train_rows = packing.pack(rows, hp.max_seq_length) if hp.packing else rows
    packed = {"packed_rows": str(len(train_rows))} if hp.packing else {}
    reporter.event("DATASET_LOADED", f"{len(rows)} training and {len(val_rows)} validation examples, "
                   f"{stats.tokens} tokens "
                   f"({stats.truncated} truncated to max_seq_length, {stats.dropped} dropped with no "
                   "completion tokens left)",
                   {"examples": str(stats.examples), "tokens": str(stats.tokens),
                    "label_tokens": str(stats.label_tokens), "truncated": str(stats.truncated),
                    "dropped": str(stats.dropped), "max_seq_length": str(hp.max_seq_length),
                    "validation_examples": str(len(val_rows)), **packed})
    return rows, val_rows, train_rows, stats


def estimate_fit(spec: JobSpec, model, rows: list[dict], pad_id: int, total_steps: int,
                 reporter: Reporter, compute: common.Compute = common.Compute()) -> None:
    """Reports FIT_ESTIMATED from a timed forward + backward on one full batch of `rows` (in the
    job's micro-batches); a CUDA out-of-memory there is OUT_OF_MEMORY (at step 0)."""
    with out_of_memory(spec, compute, "the warm-up step", 0):
        warm = warmup_seconds(model, rows, pad_id, compute=compute,
                              micro_batch_size=spec.hyperparameters.micro_batch_size)
    reporter.event("FIT_ESTIMATED", f"~{warm:.2f} s per step, ~{warm * total_steps / 60:.1f} min for "
                   f"{total_steps} steps", {}, {"warmup_step_seconds": warm, "steps": float(total_steps),
                                                "estimated_seconds": warm * total_steps / distributed.world_size()})


def train(spec: JobSpec, model, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *,
          rows: list[dict], train_rows: list[dict], val_rows: list[dict], pad_id: int,
          total_steps: int, steps_per_epoch: int, out_dir: Path, final_dir: Path,
          save_dir: Callable[[Path], Path], place_best: Callable[[Path, Path], None] = copy_dir,
          keep_best_and_latest: bool = False, packed: bool = False,
          compute: common.Compute = common.Compute(), reporter: Reporter,
          should_stop: Callable[[], bool]) -> Outcome:
    """Trains `params` of `model` for total_steps (or until early stopping) and, on rank 0, writes
    the result to final_dir: the best checkpoint (place_best) when there was validation, else the
    last weights (save_dir). `rows` are the unpacked training rows (the probe batch falls back on
    them), `train_rows` what the steps draw from (packed or not).

    Raises Cancelled when should_stop() is true (before every step and before saving),
    TunewireError for a diverged loss or a resume state that does not continue the run.
    """
    hp = spec.hyperparameters
    rank = distributed.rank()
    every = evaluation.eval_every(spec.eval, total_steps)
    tracker = evaluation.EvalTracker(spec.eval.early_stopping_patience, spec.eval.early_stopping_min_delta)
    checkpoints = Path(out_dir) / "checkpoints"

    eval_batch = hp.batch_size // hp.gradient_accumulation_steps  # no grads: a few micro-batches
    model.train()  # dropout on
    train_model = distributed.wrap(model)  # DDP around the model; evaluation uses the model
    shuffle = torch.Generator().manual_seed(hp.seed)
    probe = (val_rows or rows)[:hp.batch_size]  # a fixed batch: resume continuity is checked on it
    stats = telemetry.model_stats(model)
    peak_flops = devices.peak_flops(compute.device, compute.dtype)
    st = TrainState()
    restored = resume.load(out_dir, model, optimizer, shuffle)
    if restored:
        st, tracker = restored
        with out_of_memory(spec, compute, "the resume probe", st.step):
            after = evaluation.evaluate(model, probe, eval_batch, pad_id, compute)
        m = {"step": float(st.step), "loss_before": st.probe_loss, "loss_after": after,
             "abs_diff": abs(after - st.probe_loss)}
        if not resume.continuous(st.probe_loss, after, compute.precision):
            raise TunewireError(R.RESUME_MISMATCH, f"the checkpoint at step {st.step} gives probe loss "
                                f"{after:.6f}, not the {st.probe_loss:.6f} it was saved with")
        reporter.event("RESUMED", f"resumed at step {st.step}: probe loss {st.probe_loss:.6f} before, "
                       f"{after:.6f} after", {"from_step": str(st.step)}, m)
    t_start = time.perf_counter()
    while st.step < total_steps and not st.stopped_early:
        if st.pos >= len(st.order):  # a new epoch; with max_steps the data repeats as needed
            st.order, st.pos = torch.randperm(len(train_rows), generator=shuffle).tolist(), 0
        if distributed.any_rank(should_stop()):
            raise Cancelled(f"stopped before step {st.step + 1} of {total_steps}")
        st.step += 1
        step = st.step
        compute.synchronize()  # the step's time covers its own device work, not the last one's
        t0 = time.perf_counter()
        global_ids = st.order[st.pos:st.pos + hp.batch_size]
        ids, counts = distributed.shard(global_ids)  # this rank's slice
        chosen = [train_rows[i] for i in ids]
        st.pos += hp.batch_size
        lr = common.learning_rate(step, total_steps, hp.learning_rate, hp.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        micro = micro_batches(chosen, hp.micro_batch_size, pad_id, packed)
        with out_of_memory(spec, compute, "a training step", step):
            loss_value, step_tokens = distributed.step_loss(
                train_model, micro, n_labels=labelled_tokens([train_rows[i] for i in global_ids]),
                real_tokens=real_tokens(chosen), counts=counts, compute=compute,
                loss_fn=packing.packed_loss if packed else common.completion_loss)
            if not math.isfinite(loss_value):  # the same on every rank: nothing was stepped yet
                raise TunewireError(R.TRAINING_DIVERGED, f"loss is {loss_value} at step {step}; "
                                    f"try a lower learning_rate")
            compute.unscale(optimizer)  # fp16: clip the true gradients
            grad_norm = common.clip_gradients(params, hp.max_grad_norm)
            compute.step(optimizer)
            optimizer.zero_grad(set_to_none=True)

        st.tokens_seen += step_tokens
        st.losses.append(loss_value)
        st.since_eval.append(st.losses[-1])
        compute.synchronize()
        seconds = time.perf_counter() - t0
        flops = (telemetry.step_flops(stats, real_tokens(chosen), _keys_per_token(chosen),
                                      sum(_head_positions(b) for b in micro))
                 if peak_flops else 0.0)  # no peak (a CPU): no MFU, no counting
        reporter.metric(step=step, epoch=step / steps_per_epoch, loss=st.losses[-1],
                        learning_rate=lr, grad_norm=grad_norm,
                        tokens_per_second=step_tokens / max(seconds, 1e-9),
                        tokens_seen=st.tokens_seen, total_steps=total_steps, step_seconds=seconds,
                        peak_gpu_memory_bytes=devices.peak_memory_bytes(compute.device),
                        mfu=telemetry.mfu(flops, seconds, peak_flops))

        if step % every and step != total_steps:
            continue
        if rank:  # only rank 0 evaluates and writes; the others wait for its early-stop decision
            st.stopped_early = distributed.any_rank(False)
            continue
        with out_of_memory(spec, compute, "an evaluation", step):
            if val_rows:  # evaluate, checkpoint, and let the tracker pick the best / stop early
                _evaluate_and_checkpoint(model, val_rows, eval_batch, pad_id, st, tracker,
                                         checkpoints, save_dir, keep_best_and_latest, reporter,
                                         compute)
            # Resume state at every interval, validation or not: a crash loses at most `every`
            # steps. Not after the last step: the result is written next, the state to keep.
            if step != total_steps:
                st.probe_loss = evaluation.evaluate(model, probe, eval_batch, pad_id, compute)
                resume.save(out_dir, st, model, optimizer, shuffle, tracker)
        st.stopped_early = distributed.any_rank(st.stopped_early)
    out = Outcome(st, tracker, time.perf_counter() - t_start)

    # ---- the result ----------------------------------------------------------------------
    if distributed.any_rank(should_stop()):
        raise Cancelled("stopped after training, before saving")
    # Each rank's weights after the last step (with DDP they must be equal), reported on the save.
    out.ranks = distributed.gather({"pid": os.getpid(), "checksum": distributed.checksum(params)})
    if rank:
        return out  # rank 0 saves the result
    if tracker.best_step:
        # The best checkpoint by eval_loss is the result, not the last weights.
        place_best(checkpoints / f"step-{tracker.best_step:06d}", final_dir)
        out.result = {"best_step": float(tracker.best_step), "best_eval_loss": tracker.best_loss,
                      "early_stopped": float(st.stopped_early)}
        reporter.event("BEST_CHECKPOINT_SELECTED", f"step {tracker.best_step} "
                       f"(eval_loss {tracker.best_loss:.4f}) of {st.step}", {"path": str(final_dir)},
                       out.result)
    else:
        save_dir(final_dir)
    out.saved = True
    return out


def _evaluate_and_checkpoint(model, val_rows, batch_size, pad_id, st: TrainState,
                             tracker: evaluation.EvalTracker, checkpoints: Path,
                             save_dir: Callable[[Path], Path], keep_best_and_latest: bool,
                             reporter: Reporter, compute: common.Compute) -> None:
    step = st.step
    train_loss = sum(st.since_eval) / len(st.since_eval)
    st.since_eval = []
    eval_loss = evaluation.evaluate(model, val_rows, batch_size, pad_id, compute)
    decision = tracker.update(step, eval_loss, train_loss)
    m = {"eval_loss": eval_loss, "train_loss": train_loss, "step": float(step)}
    reporter.evaluation(step=step, metrics=m)
    ckpt = save_dir(checkpoints / f"step-{step:06d}")
    reporter.event("CHECKPOINT_SAVED", f"checkpoint at step {step} "
                   f"(eval_loss {eval_loss:.4f})", {"path": str(ckpt)}, m)
    if keep_best_and_latest:
        # Decided from the directory, not from memory, so it holds across a resume too (a crash
        # can also leave a checkpoint newer than the resume state: it is rewritten or deleted).
        keep = {f"step-{tracker.best_step:06d}", ckpt.name}
        for old in checkpoints.glob("step-*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    if decision.overfitting:
        reporter.event("OVERFITTING", f"validation loss rose to {eval_loss:.4f} while "
                       f"training loss fell to {train_loss:.4f}", {}, m)
    if decision.stop:
        st.stopped_early = True
        reporter.event("EARLY_STOPPED", f"no eval_loss improvement in "
                       f"{tracker.stale} evaluations; best was step {tracker.best_step}",
                       {}, {"best_step": float(tracker.best_step),
                            "best_eval_loss": tracker.best_loss, "step": float(step)})


def warmup_seconds(model, batch_rows: list[dict], pad_id: int, *,
                   compute: common.Compute = common.Compute(), micro_batch_size: int = 0) -> float:
    """Times a forward + backward on one full batch (in micro-batches of micro_batch_size; 0 =
    the whole batch at once), twice (the first pays one-time costs), on the compute's device and
    in its precision, synchronised so that the time covers the device's work. Leaves no trace:
    gradients are dropped and the RNG states (CPU, and this GPU's) are restored, so training is
    the same with or without it."""
    times = []
    cuda = [compute.device.index or 0] if compute.device.type == "cuda" else []
    size = micro_batch_size or len(batch_rows)
    with torch.random.fork_rng(devices=cuda):
        for _ in range(2):
            compute.synchronize()
            t0 = time.perf_counter()
            for batch in micro_batches(batch_rows, size, pad_id, packed=False):
                with compute.autocast():
                    loss = common.completion_loss(model, compute.batch(batch))
                loss.backward()
            compute.synchronize()
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times[-1]


def _keys_per_token(rows: list[dict]) -> float:
    """Causal attention's (query, key) pairs per token of these rows (telemetry.step_flops);
    packed rows attend within each example (position_ids restart)."""
    lengths = []
    for r in rows:
        pos = r.get("position_ids")
        if pos is None:
            lengths.append(len(r["input_ids"]))
        else:  # each example of a packed row starts at position 0
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            lengths += [b - a for a, b in zip(starts, starts[1:])]
    return telemetry.attention_pairs(lengths) / max(sum(lengths), 1)


def _head_positions(batch: dict) -> int:
    """Positions the LM head runs on in a collated batch: rows x labelled columns
    (common.labelled_loss keeps a column when any row has a label there)."""
    labels = batch["labels"][:, 1:]
    return int((labels != IGNORE).any(0).sum()) * labels.shape[0]
