"""LoRA fine-tuning recipe: one job, read top to bottom — setup, train, save, clean up.

`run(spec, out_dir, reporter, should_stop)` trains a peft LoRA adapter on top of a Hugging Face
causal LM with a plain PyTorch loop (AdamW, linear warm-up then linear decay to 0, gradient
clipping, completion-only loss) and writes the adapter to `out_dir/adapter` as the standard peft
files (adapter_model.safetensors + adapter_config.json) that peft and vLLM load. The base model is
not saved. The worker process calls it and forwards what the `Reporter` gets to the trainer;
nothing here knows about gRPC, so it also runs on its own:

    from trainer_service.recipe_lora import run
    run(JobSpec(base_model="/models/tiny", training_data="train.jsonl", adapter_name="demo"),
        Path("/tmp/out"), reporter, should_stop=lambda: False)

Threads: `TUNEWIRE_TRAIN_THREADS` (default: all cores) sets torch's intra-op threads.

Data parallel: started by torchrun (`num_processes` > 1, see launcher.py and distributed.py),
every rank runs this same function. All ranks draw the same shuffled order and each trains on its
slice of every global batch; DDP averages the gradients. Rank 0 alone reports (the others get a
reporter that drops everything), evaluates, checkpoints and saves; a stop request or rank 0's
early stopping reaches every rank through `distributed.any_rank`, so no rank waits alone in a
collective. The threads are shared out: TUNEWIRE_TRAIN_THREADS / num_processes per rank.

Packing (`packing`, single process only): the training rows are packed into max_seq_length rows
once (trainer_service.packing) and the steps train on those; evaluation, the probe batch and the
warm-up use the unpacked rows.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from trainer_service import common, data, distributed, evaluation, packing, resume
from trainer_service.resume import TrainState
from trainer_service.spec import JobSpec
from tunewire.errors import JobFailure


class Reporter(Protocol):
    def started(self, trainable_params: int, total_params: int, total_steps: int) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, str],
              metrics: dict[str, float] | None = None) -> None: ...
    def metric(self, *, step: int, epoch: float, loss: float, learning_rate: float,
               grad_norm: float, tokens_per_second: float, tokens_seen: int,
               total_steps: int, step_seconds: float = 0.0) -> None: ...
    def evaluation(self, *, step: int, metrics: dict[str, float]) -> None: ...


class Cancelled(Exception):
    """should_stop() turned true; nothing was saved."""


def run(spec: JobSpec, out_dir: Path, reporter: Reporter,
        should_stop: Callable[[], bool]) -> dict[str, float]:
    """Trains and saves the adapter to out_dir/"adapter"; returns the final metrics.

    Raises Cancelled when should_stop() is true (checked before every step and before saving),
    JobFailure for bad input (user_error) or training that cannot go on.
    """
    hp = spec.hyperparameters

    # ---- setup ---------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(hp.seed)  # python, numpy and torch: LoRA init, dropout and shuffling repeat
    rank, world = distributed.rank(), distributed.world_size()  # 0 and 1 without torchrun
    if hp.packing and max(world, hp.num_processes) > 1:
        raise JobFailure("PACKING_UNSUPPORTED", "packing is not supported with num_processes > 1",
                         user_error=True)
    threads = int(os.environ.get("TUNEWIRE_TRAIN_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, threads // world))

    tokenizer = common.load_tokenizer(spec.base_model)
    # Data before the model: a bad file fails in seconds instead of after loading the weights.
    examples = data.load_examples(spec.training_data)
    eos_ids = common.stop_ids(spec.base_model, tokenizer)
    rows, stats = data.tokenize_dataset(examples, tokenizer, hp.max_seq_length, eos_ids=eos_ids)
    if spec.validation_data:
        val_rows, _ = data.tokenize_dataset(data.load_examples(spec.validation_data), tokenizer,
                                            hp.max_seq_length, eos_ids=eos_ids)
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

    model = common.load_model(spec.base_model)
    reporter.event("MODEL_LOADED", f"loaded {spec.base_model}",
                   {"base_model": spec.base_model,
                    "parameters": str(sum(p.numel() for p in model.parameters()))})
    model = _add_lora(model, spec)
    trainable, total = model.get_nb_trainable_parameters()  # what print_trainable_parameters shows

    steps_per_epoch = math.ceil(len(train_rows) / hp.batch_size)
    total_steps = hp.max_steps if hp.max_steps > 0 else steps_per_epoch * hp.num_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    # Padding never reaches the loss or attention, so any id works when the tokenizer has none.
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    warm = _warmup_seconds(model, rows[:hp.batch_size], pad_id)
    reporter.event("FIT_ESTIMATED", f"~{warm:.2f} s per step, ~{warm * total_steps / 60:.1f} min for "
                   f"{total_steps} steps", {}, {"warmup_step_seconds": warm, "steps": float(total_steps),
                                                "estimated_seconds": warm * total_steps / distributed.world_size()})
    every = evaluation.eval_every(spec.eval, total_steps)
    tracker = evaluation.EvalTracker(spec.eval.early_stopping_patience, spec.eval.early_stopping_min_delta)
    checkpoints = Path(out_dir) / "checkpoints"
    reporter.started(trainable, total, total_steps)

    # ---- train ---------------------------------------------------------------------------
    model.train()  # LoRA dropout on
    train_model = distributed.wrap(model)  # DDP around the peft model; evaluation uses the model
    shuffle = torch.Generator().manual_seed(hp.seed)
    probe = (val_rows or rows)[:hp.batch_size]  # a fixed batch: resume continuity is checked on it
    st = TrainState()
    restored = resume.load(out_dir, model, optimizer, shuffle)
    if restored:
        st, tracker = restored
        after = evaluation.evaluate(model, probe, hp.batch_size, pad_id)
        m = {"step": float(st.step), "loss_before": st.probe_loss, "loss_after": after,
             "abs_diff": abs(after - st.probe_loss)}
        if not resume.continuous(st.probe_loss, after):
            raise JobFailure("RESUME_MISMATCH", f"the checkpoint at step {st.step} gives probe loss "
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
        t0 = time.perf_counter()
        ids, counts = distributed.shard(st.order[st.pos:st.pos + hp.batch_size])  # this rank's slice
        chosen = [train_rows[i] for i in ids]
        st.pos += hp.batch_size
        lr = common.learning_rate(step, total_steps, hp.learning_rate, hp.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # With DDP: the global batch's loss and real tokens, the same on every rank.
        if hp.packing:  # single process only (refused above with DDP)
            batch = packing.collate_packed(chosen, pad_id)
            loss = packing.packed_loss(train_model, batch)
            loss_value, real_tokens = loss.item(), batch["num_tokens"]
        else:
            loss, loss_value, real_tokens = distributed.batch_loss(
                train_model, data.collate(chosen, pad_id), counts)
        if not math.isfinite(loss_value):
            raise JobFailure("TRAINING_DIVERGED", f"loss is {loss_value} at step {step}; "
                             f"try a lower learning_rate", user_error=True)
        with distributed.collective():  # DDP all-reduces the gradients during backward
            loss.backward()
        # Infinite max norm computes the norm without clipping (max_grad_norm 0 = no clip).
        grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        st.tokens_seen += real_tokens
        st.losses.append(loss_value)
        st.since_eval.append(st.losses[-1])
        seconds = time.perf_counter() - t0
        reporter.metric(step=step, epoch=step / steps_per_epoch, loss=st.losses[-1],
                        learning_rate=lr, grad_norm=float(grad_norm),
                        tokens_per_second=real_tokens / max(seconds, 1e-9),
                        tokens_seen=st.tokens_seen, total_steps=total_steps, step_seconds=seconds)

        if step % every and step != total_steps:
            continue
        if rank:  # only rank 0 evaluates and writes; the others wait for its early-stop decision
            st.stopped_early = distributed.any_rank(False)
            continue
        if val_rows:  # evaluate, checkpoint, and let the tracker pick the best / stop early
            train_loss = sum(st.since_eval) / len(st.since_eval)
            st.since_eval = []
            eval_loss = evaluation.evaluate(model, val_rows, hp.batch_size, pad_id)
            decision = tracker.update(step, eval_loss, train_loss)
            m = {"eval_loss": eval_loss, "train_loss": train_loss, "step": float(step)}
            reporter.evaluation(step=step, metrics=m)
            ckpt = common.save_adapter(model, checkpoints / f"step-{step:06d}")
            reporter.event("CHECKPOINT_SAVED", f"checkpoint at step {step} "
                           f"(eval_loss {eval_loss:.4f})", {"path": str(ckpt)}, m)
            if decision.overfitting:
                reporter.event("OVERFITTING", f"validation loss rose to {eval_loss:.4f} while "
                               f"training loss fell to {train_loss:.4f}", {}, m)
            if decision.stop:
                st.stopped_early = True
                reporter.event("EARLY_STOPPED", f"no eval_loss improvement in "
                               f"{tracker.stale} evaluations; best was step {tracker.best_step}",
                               {}, {"best_step": float(tracker.best_step),
                                    "best_eval_loss": tracker.best_loss, "step": float(step)})
        # Resume state at every interval, validation or not: a crash loses at most `every` steps.
        st.probe_loss = evaluation.evaluate(model, probe, hp.batch_size, pad_id)
        resume.save(out_dir, st, model, optimizer, shuffle, tracker)
        st.stopped_early = distributed.any_rank(st.stopped_early)
    train_seconds = time.perf_counter() - t_start

    # ---- save ----------------------------------------------------------------------------
    if distributed.any_rank(should_stop()):
        raise Cancelled("stopped after training, before saving")
    # Each rank's weights after the last step (with DDP they must be equal), reported on the save.
    ranks = distributed.gather({"pid": os.getpid(), "checksum": distributed.checksum(params)})
    if rank:
        return {}  # rank 0 saves the adapter and reports the result
    adapter_dir = Path(out_dir) / "adapter"
    result: dict[str, float] = {}
    if tracker.best_step:
        # The best checkpoint by eval_loss is the result, not the last weights.
        shutil.copytree(checkpoints / f"step-{tracker.best_step:06d}", adapter_dir, dirs_exist_ok=True)
        result = {"best_step": float(tracker.best_step), "best_eval_loss": tracker.best_loss,
                  "early_stopped": float(st.stopped_early)}
        reporter.event("BEST_CHECKPOINT_SELECTED", f"step {tracker.best_step} "
                       f"(eval_loss {tracker.best_loss:.4f}) of {st.step}", {"path": str(adapter_dir)}, result)
    else:
        common.save_adapter(model, adapter_dir)
    reporter.event("ADAPTER_SAVED", f"adapter saved to {adapter_dir}",
                   {"path": str(adapter_dir), "trainable_params": str(trainable),
                    "world_size": str(world), "rank_pids": json.dumps([r["pid"] for r in ranks]),
                    "rank_checksums": json.dumps([r["checksum"] for r in ranks])})

    # ---- cleanup -------------------------------------------------------------------------
    # The worker may report for a while after this; give the memory back now.
    del model, train_model, optimizer, params
    gc.collect()
    losses = st.losses
    tail = losses[-min(10, len(losses)):]
    return {**result, "train_loss": sum(losses) / len(losses), "final_loss": sum(tail) / len(tail),
            "steps": float(st.step), "train_tokens": float(st.tokens_seen),
            "train_seconds": train_seconds, "examples": float(stats.examples),
            "truncated_examples": float(stats.truncated), "dropped_examples": float(stats.dropped),
            "validation_examples": float(len(val_rows))}


def _warmup_seconds(model, batch_rows: list[dict], pad_id: int) -> float:
    """Times a forward + backward on one full batch, twice (the first pays one-time costs), and
    leaves no trace: gradients are dropped and the RNG state is restored, so training is the
    same with or without it."""
    times = []
    with torch.random.fork_rng():
        for _ in range(2):
            t0 = time.perf_counter()
            common.completion_loss(model, data.collate(batch_rows, pad_id)).backward()
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times[-1]


def _add_lora(model, spec: JobSpec):
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    alpha = lora.alpha
    config = LoraConfig(
        r=lora.r,
        # Whole alphas stay ints in adapter_config.json, the type servers expect.
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        # None: peft's default for the model; "all-linear" must reach peft as a string
        target_modules=("all-linear" if lora.target_modules == ("all-linear",)
                        else list(lora.target_modules) or None),
        lora_dropout=lora.lora_dropout, bias=lora.bias, use_rslora=lora.use_rslora,
        use_dora=lora.use_dora, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: module names not in the model, or no default for it
        targets = list(lora.target_modules) or "peft's default"
        raise JobFailure("TARGET_MODULES_INVALID", f"cannot apply LoRA to target_modules="
                         f"{targets}: {e}", user_error=True) from None
