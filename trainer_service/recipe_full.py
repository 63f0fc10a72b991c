"""Full fine-tuning recipe: one job, read top to bottom — setup, train, save, clean up.

`run(spec, out_dir, reporter, should_stop)` trains EVERY weight of a Hugging Face causal LM (no
peft; `spec.lora` is ignored) with the same plain PyTorch loop as the LoRA recipe (AdamW, linear
warm-up then linear decay to 0, gradient clipping, completion-only loss): trainer_service.loop,
so the same data handling (packing included), warm-up estimate (FIT_ESTIMATED), validation /
checkpoint / early-stopping / best-checkpoint behaviour and crash-safe resume. It writes a
complete model directory to `out_dir/model`:

    config.json, generation_config.json, model*.safetensors (fp32), tokenizer files

which transformers and vLLM (`serving_service.engine.VllmEngine`) load as a model of its own. The
Reporter gets the LoRA recipe's events; the final artifact is still announced as ADAPTER_SAVED
(data {"path": out_dir/model}) so the worker and trainer need no second code path.

    from trainer_service.recipe_full import run
    run(JobSpec(base_model="/models/tiny", training_data="train.jsonl", adapter_name="demo"),
        Path("/tmp/out"), reporter, should_stop=lambda: False)

Precision (`hyperparameters.precision`; `device` = the trainer's setting): mixed precision with
fp32 master weights. The weights, gradients and AdamW's moments stay fp32 on the device; the
forward runs under torch.autocast to bf16/fp16 (the matmuls in half precision, on tensor cores),
the loss in fp32; fp16 adds loss scaling (GradScaler, unscaled before clipping). Why not bf16
weights with bf16 AdamW (8 bytes/param instead of 16: half the memory)? An update smaller than
bf16's resolution (lr x update < 2^-8 of the weight: at lr 1e-5 nearly every update) rounds away,
so training stalls or drifts unless the optimizer keeps compensation buffers (Kahan summation,
stochastic rounding), which torch's AdamW does not. fp32 master weights cost memory, never
accuracy: the safe default. Memory-bound jobs should use LoRA/QLoRA (memory.advice says so).
The saved weights are fp32 (vLLM serves them at its own dtype). On a CPU the default (auto =
fp32) is the plain fp32 run, bit for bit. `out_dir/model/training.json` records how it was trained.

Memory: fp32 weights (4 bytes/param) + gradients (4) + AdamW's two moments (8) = about 16 bytes
per parameter before activations, e.g. ~8 GiB for a 0.5B model, four times the weights alone.
gradient_checkpointing and gradient_accumulation_steps lower the activations (loop.py).

Disk: every checkpoint is a full copy of the weights (4 bytes/param: ~2 GiB at 0.5B), not a few
MB of adapter. Only the best checkpoint (by eval_loss) and the latest stay on disk; older ones are
deleted as training goes (their CHECKPOINT_SAVED events were still reported). The result is
hard-linked from the best checkpoint when the filesystem allows, so it costs no third copy.
The resume state (`out_dir/resume/state.pt`, rewritten at every evaluation interval) holds every
weight plus AdamW's two moments: ~12 bytes/param (~6 GiB at 0.5B), written each interval.

Data parallel (num_processes > 1) is LoRA-only: spec validation refuses it for this method.

Threads: `TUNEWIRE_TRAIN_THREADS` (default: all cores) sets torch's intra-op threads (CPU only).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from trainer_service import common, loop
from tunewire import loading
from trainer_service.loop import Cancelled, Reporter
from trainer_service.spec import JobSpec

__all__ = ["Cancelled", "Reporter", "run"]


def run(spec: JobSpec, out_dir: Path, reporter: Reporter,
        should_stop: Callable[[], bool], *, device: str = "auto") -> dict[str, float]:
    """Trains all weights and saves the model to out_dir/"model"; returns the final metrics.

    Raises Cancelled when should_stop() is true (checked before every step and before saving),
    TunewireError for bad input (a user error) or training that cannot go on.
    """
    hp = spec.hyperparameters

    # ---- setup ---------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(hp.seed)  # python, numpy and torch: dropout and shuffling repeat
    compute = common.Compute.for_job(hp.precision, device)  # refuses fp16 on a CPU, cuda without one
    if compute.device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("TUNEWIRE_TRAIN_THREADS", os.cpu_count() or 1)))

    tokenizer = loading.load_tokenizer(spec.base_model)
    # Data before the model: a bad file fails in seconds instead of after loading the weights.
    rows, val_rows, train_rows, stats = loop.prepare_data(spec, tokenizer, reporter)

    model = build_model(spec, compute)
    # parameters() yields a shared (tied) tensor once: tied embeddings count, train and decay once.
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    total = sum(p.numel() for p in params)
    trainable = total
    reporter.event("MODEL_LOADED", f"loaded {spec.base_model}",
                   {"base_model": spec.base_model, "parameters": str(total)})

    steps_per_epoch = math.ceil(len(train_rows) / hp.batch_size)
    total_steps = hp.max_steps if hp.max_steps > 0 else steps_per_epoch * hp.num_epochs
    # Weight decay on matrices and embeddings only; norm scales and biases are not shrunk toward 0
    # (with every weight trainable, decaying a norm's scale of ~1 would damage the model).
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=hp.learning_rate)
    # Padding never reaches the loss or attention, so any id works when the tokenizer has none.
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    loop.estimate_fit(spec, model, rows[:hp.batch_size], pad_id, total_steps, reporter, compute)
    reporter.started(trainable, total, total_steps)

    # ---- train and save ------------------------------------------------------------------
    model_dir = Path(out_dir) / "model"
    out = loop.train(spec, model, params, optimizer, rows=rows, train_rows=train_rows,
                     val_rows=val_rows, pad_id=pad_id, total_steps=total_steps,
                     steps_per_epoch=steps_per_epoch, out_dir=out_dir, final_dir=model_dir,
                     save_dir=functools.partial(_save_model, model, tokenizer),
                     # Checkpoint files are never written again, so hard links are safe and save
                     # a full copy of the weights.
                     place_best=_link_tree, keep_best_and_latest=True,
                     packed=hp.packing, compute=compute, reporter=reporter, should_stop=should_stop)
    common.write_training_info(model_dir, spec, compute)
    # The event keeps the LoRA recipe's name: it announces the job's artifact, here a full model.
    reporter.event("ADAPTER_SAVED", f"full model saved to {model_dir}",
                   {"path": str(model_dir), "trainable_params": str(trainable)})

    # ---- cleanup -------------------------------------------------------------------------
    # The worker may report for a while after this; give the memory (weights, grads and the
    # optimizer's moments: ~4x the model) back now.
    del model, optimizer, params
    gc.collect()
    return {**out.metrics(), "examples": float(stats.examples),
            "truncated_examples": float(stats.truncated), "dropped_examples": float(stats.dropped),
            "validation_examples": float(len(val_rows))}


def build_model(spec: JobSpec, compute: common.Compute):
    """The model with fp32 master weights on the device (autocast gives the forward the job's
    precision), gradient checkpointing as the job says."""
    model = loading.load_causal_lm(spec.base_model, dtype=torch.float32, device=compute.device)
    if spec.hyperparameters.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    return model


def _save_model(model, tokenizer, path: Path) -> Path:
    """A directory transformers and vLLM load on its own: config, generation_config, safetensors
    weights and the tokenizer (its chat template included)."""
    model.save_pretrained(path)  # safetensors (the only format transformers 5 writes)
    tokenizer.save_pretrained(path)
    return path


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)
    return dst
