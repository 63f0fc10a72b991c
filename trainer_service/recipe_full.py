"""Full fine-tuning recipe: one job, read top to bottom — setup, train, save, clean up.

`run(spec, out_dir, reporter, should_stop)` trains EVERY weight of a Hugging Face causal LM (no
peft; `spec.lora` is ignored) with the same plain PyTorch loop as the LoRA recipe (AdamW, linear
warm-up then linear decay to 0, gradient clipping, completion-only loss), the same data handling
and the same validation / checkpoint / early-stopping / best-checkpoint behaviour, and writes a
complete model directory to `out_dir/model`:

    config.json, generation_config.json, model*.safetensors (fp32), tokenizer files

which transformers and vLLM (`serving_service.engine.VllmEngine`) load as a model of its own. The
Reporter gets the LoRA recipe's events; the final artifact is still announced as ADAPTER_SAVED
(data {"path": out_dir/model}) so the worker and trainer need no second code path.

    from trainer_service.recipe_full import run
    run(JobSpec(base_model="/models/tiny", training_data="train.jsonl", adapter_name="demo"),
        Path("/tmp/out"), reporter, should_stop=lambda: False)

Memory: fp32 weights (4 bytes/param) + gradients (4) + AdamW's two moments (8) = about 16 bytes
per parameter before activations, e.g. ~8 GiB for a 0.5B model, four times the weights alone.

Disk: every checkpoint is a full copy of the weights (4 bytes/param: ~2 GiB at 0.5B), not a few
MB of adapter. Only the best checkpoint (by eval_loss) and the latest stay on disk; older ones are
deleted as training goes (their CHECKPOINT_SAVED events were still reported). The result is
hard-linked from the best checkpoint when the filesystem allows, so it costs no third copy.

Threads: `TUNEWIRE_TRAIN_THREADS` (default: all cores) sets torch's intra-op threads.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer_service import common, data, evaluation
from trainer_service.recipe_lora import Cancelled, Reporter
from trainer_service.spec import JobSpec
from tunewire.errors import JobFailure

__all__ = ["Cancelled", "Reporter", "run"]


def run(spec: JobSpec, out_dir: Path, reporter: Reporter,
        should_stop: Callable[[], bool]) -> dict[str, float]:
    """Trains all weights and saves the model to out_dir/"model"; returns the final metrics.

    Raises Cancelled when should_stop() is true (checked before every step and before saving),
    JobFailure for bad input (user_error) or training that cannot go on.
    """
    hp = spec.hyperparameters

    # ---- setup ---------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(hp.seed)  # python, numpy and torch: dropout and shuffling repeat
    torch.set_num_threads(int(os.environ.get("TUNEWIRE_TRAIN_THREADS", os.cpu_count() or 1)))

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
    reporter.event("DATASET_LOADED", f"{len(rows)} training and {len(val_rows)} validation examples, "
                   f"{stats.tokens} tokens "
                   f"({stats.truncated} truncated to max_seq_length, {stats.dropped} dropped with no "
                   "completion tokens left)",
                   {"examples": str(stats.examples), "tokens": str(stats.tokens),
                    "label_tokens": str(stats.label_tokens), "truncated": str(stats.truncated),
                    "dropped": str(stats.dropped), "max_seq_length": str(hp.max_seq_length),
                    "validation_examples": str(len(val_rows))})

    model = common.load_model(spec.base_model)  # fp32
    # parameters() yields a shared (tied) tensor once: tied embeddings count, train and decay once.
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    total = sum(p.numel() for p in params)
    trainable = total
    reporter.event("MODEL_LOADED", f"loaded {spec.base_model}",
                   {"base_model": spec.base_model, "parameters": str(total)})

    steps_per_epoch = math.ceil(len(rows) / hp.batch_size)
    total_steps = hp.max_steps if hp.max_steps > 0 else steps_per_epoch * hp.num_epochs
    # Weight decay on matrices and embeddings only; norm scales and biases are not shrunk toward 0
    # (with every weight trainable, decaying a norm's scale of ~1 would damage the model).
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=hp.learning_rate)
    # Padding never reaches the loss or attention, so any id works when the tokenizer has none.
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    every = evaluation.eval_every(spec.eval, total_steps)
    tracker = evaluation.EvalTracker(spec.eval.early_stopping_patience, spec.eval.early_stopping_min_delta)
    checkpoints = Path(out_dir) / "checkpoints"
    on_disk: list[int] = []  # steps whose checkpoint directory still exists
    reporter.started(trainable, total, total_steps)

    # ---- train ---------------------------------------------------------------------------
    model.train()  # the model's own dropout (if any) on
    shuffle = torch.Generator().manual_seed(hp.seed)
    losses: list[float] = []
    tokens_seen = 0
    t_start = time.perf_counter()
    step, since_eval, stopped_early = 0, [], False
    while step < total_steps and not stopped_early:  # epochs; with max_steps the data repeats
        order = torch.randperm(len(rows), generator=shuffle).tolist()
        for first in range(0, len(order), hp.batch_size):
            if step >= total_steps or stopped_early:
                break
            if should_stop():
                raise Cancelled(f"stopped before step {step + 1} of {total_steps}")
            step += 1
            t0 = time.perf_counter()
            batch = data.collate([rows[i] for i in order[first:first + hp.batch_size]], pad_id)
            lr = common.learning_rate(step, total_steps, hp.learning_rate, hp.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss = common.completion_loss(model, batch)
            if not torch.isfinite(loss):
                raise JobFailure("TRAINING_DIVERGED", f"loss is {loss.item()} at step {step}; "
                                 f"try a lower learning_rate", user_error=True)
            loss.backward()
            # Infinite max norm computes the norm without clipping (max_grad_norm 0 = no clip).
            grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            real_tokens = int(batch["attention_mask"].sum())  # padding is not throughput
            tokens_seen += real_tokens
            losses.append(loss.item())
            since_eval.append(losses[-1])
            reporter.metric(step=step, epoch=step / steps_per_epoch, loss=losses[-1],
                            learning_rate=lr, grad_norm=float(grad_norm),
                            tokens_per_second=real_tokens / max(time.perf_counter() - t0, 1e-9),
                            tokens_seen=tokens_seen, total_steps=total_steps)

            if val_rows and (step % every == 0 or step == total_steps):
                # Evaluate, checkpoint, and let the tracker pick the best / stop early.
                train_loss = sum(since_eval) / len(since_eval)
                since_eval = []
                eval_loss = evaluation.evaluate(model, val_rows, hp.batch_size, pad_id)
                decision = tracker.update(step, eval_loss, train_loss)
                m = {"eval_loss": eval_loss, "train_loss": train_loss, "step": float(step)}
                reporter.evaluation(step=step, metrics=m)
                ckpt = _save_model(model, tokenizer, checkpoints / f"step-{step:06d}")
                on_disk.append(step)
                reporter.event("CHECKPOINT_SAVED", f"checkpoint at step {step} "
                               f"(eval_loss {eval_loss:.4f})", {"path": str(ckpt)}, m)
                # A full checkpoint is as big as the model: keep the best and the latest only.
                for old in [s for s in on_disk if s not in (tracker.best_step, step)]:
                    shutil.rmtree(checkpoints / f"step-{old:06d}", ignore_errors=True)
                    on_disk.remove(old)
                if decision.overfitting:
                    reporter.event("OVERFITTING", f"validation loss rose to {eval_loss:.4f} while "
                                   f"training loss fell to {train_loss:.4f}", {}, m)
                if decision.stop:
                    stopped_early = True
                    reporter.event("EARLY_STOPPED", f"no eval_loss improvement in "
                                   f"{tracker.stale} evaluations; best was step {tracker.best_step}",
                                   {}, {"best_step": float(tracker.best_step),
                                        "best_eval_loss": tracker.best_loss, "step": float(step)})
    train_seconds = time.perf_counter() - t_start

    # ---- save ----------------------------------------------------------------------------
    if should_stop():
        raise Cancelled("stopped after training, before saving")
    model_dir = Path(out_dir) / "model"
    result: dict[str, float] = {}
    if tracker.best_step:
        # The best checkpoint by eval_loss is the result, not the last weights. Checkpoint files
        # are never written again, so hard links are safe and save a full copy of the weights.
        shutil.copytree(checkpoints / f"step-{tracker.best_step:06d}", model_dir,
                        copy_function=_link_or_copy, dirs_exist_ok=True)
        result = {"best_step": float(tracker.best_step), "best_eval_loss": tracker.best_loss,
                  "early_stopped": float(stopped_early)}
        reporter.event("BEST_CHECKPOINT_SELECTED", f"step {tracker.best_step} "
                       f"(eval_loss {tracker.best_loss:.4f}) of {step}", {"path": str(model_dir)}, result)
    else:
        _save_model(model, tokenizer, model_dir)
    # The event keeps the LoRA recipe's name: it announces the job's artifact, here a full model.
    reporter.event("ADAPTER_SAVED", f"full model saved to {model_dir}",
                   {"path": str(model_dir), "trainable_params": str(trainable)})

    # ---- cleanup -------------------------------------------------------------------------
    # The worker may report for a while after this; give the memory (weights, grads and the
    # optimizer's moments: ~4x the model) back now.
    del model, optimizer, params
    gc.collect()
    tail = losses[-min(10, len(losses)):]
    return {**result, "train_loss": sum(losses) / len(losses), "final_loss": sum(tail) / len(tail),
            "steps": float(step), "train_tokens": float(tokens_seen),
            "train_seconds": train_seconds, "examples": float(stats.examples),
            "truncated_examples": float(stats.truncated), "dropped_examples": float(stats.dropped),
            "validation_examples": float(len(val_rows))}


def _save_model(model, tokenizer, path: Path) -> Path:
    """A directory transformers and vLLM load on its own: config, generation_config, safetensors
    weights and the tokenizer (its chat template included)."""
    model.save_pretrained(path)  # safetensors (the only format transformers 5 writes)
    tokenizer.save_pretrained(path)
    return path


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)
    return dst
