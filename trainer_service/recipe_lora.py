"""LoRA fine-tuning recipe: one job, read top to bottom — setup, train, save, clean up.

`run(spec, out_dir, reporter, should_stop)` trains a peft LoRA adapter on top of a Hugging Face
causal LM with a plain PyTorch loop (AdamW, linear warm-up then linear decay to 0, gradient
clipping, completion-only loss) and writes the adapter to `out_dir/adapter` as the standard peft
files (adapter_model.safetensors + adapter_config.json) that peft and vLLM load. The base model is
not saved. The loop itself (steps, evaluation, checkpoints, early stopping, crash-safe resume,
best-checkpoint selection) is trainer_service.loop, shared with the full fine-tuning recipe. The
worker process calls it and forwards what the `Reporter` gets to the trainer;
nothing here knows about gRPC, so it also runs on its own:

    from trainer_service.recipe_lora import run
    run(JobSpec(base_model="/models/tiny", training_data="train.jsonl", adapter_name="demo"),
        Path("/tmp/out"), reporter, should_stop=lambda: False)

Device and precision (`device` = the trainer's setting, `hyperparameters.precision`): the base
is loaded straight onto the device (cuda:LOCAL_RANK on a GPU) in the job's dtype and stays
frozen; the LoRA weights and so AdamW's state are fp32 (peft's get_peft_model keeps adapter
weights fp32 on a half-precision base: autocast_adapter_dtype); the forward runs under
torch.autocast to the job's dtype (none at fp32), the loss in fp32; fp16 scales the loss
(GradScaler) and unscales before clipping. The saved adapter is fp32: lossless, and vLLM casts
it to its serving dtype on load. `out_dir/adapter/training.json` records how it was trained
(precision, device, quantization, gradient_checkpointing, gradient_accumulation_steps). QLoRA
(quantization nf4): the base in 4-bit, trainer_service/qlora.py. On a CPU the default (auto =
fp32) is the plain fp32 run, bit for bit.

Memory: gradient_checkpointing recomputes each layer's activations in backward;
gradient_accumulation_steps splits every step into micro-batches (loop.py).

Threads: `TUNEWIRE_TRAIN_THREADS` (default: all cores) sets torch's intra-op threads (CPU only).

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

import functools
import gc
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from trainer_service import common, distributed, loop, qlora
from tunewire import loading
from trainer_service.loop import Cancelled, Reporter
from trainer_service.spec import JobSpec
from tunewire import reasons as R
from tunewire.errors import TunewireError

__all__ = ["Cancelled", "Reporter", "run"]


def run(spec: JobSpec, out_dir: Path, reporter: Reporter,
        should_stop: Callable[[], bool], *, device: str = "auto") -> dict[str, float]:
    """Trains and saves the adapter to out_dir/"adapter"; returns the final metrics.

    Raises Cancelled when should_stop() is true (checked before every step and before saving),
    TunewireError for bad input (a user error) or training that cannot go on.
    """
    hp = spec.hyperparameters

    # ---- setup ---------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(hp.seed)  # python, numpy and torch: LoRA init, dropout and shuffling repeat
    world = distributed.world_size()  # 1 without torchrun
    if hp.packing and max(world, hp.num_processes) > 1:
        raise TunewireError(R.PACKING_UNSUPPORTED, "packing is not supported with num_processes > 1")
    compute = common.Compute.for_job(hp.precision, device)  # refuses fp16 on a CPU, cuda without one
    if hp.quantization == "nf4":
        qlora.check_available(compute.device)  # before the data and the weights are loaded
    if compute.device.type == "cpu":
        threads = int(os.environ.get("TUNEWIRE_TRAIN_THREADS", os.cpu_count() or 1))
        torch.set_num_threads(max(1, threads // world))

    tokenizer = loading.load_tokenizer(spec.base_model)
    # Data before the model: a bad file fails in seconds instead of after loading the weights.
    rows, val_rows, train_rows, stats = loop.prepare_data(spec, tokenizer, reporter)

    model = build_model(spec, compute, reporter)
    trainable, total = model.get_nb_trainable_parameters()  # what print_trainable_parameters shows

    steps_per_epoch = math.ceil(len(train_rows) / hp.batch_size)
    total_steps = hp.max_steps if hp.max_steps > 0 else steps_per_epoch * hp.num_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    # Padding never reaches the loss or attention, so any id works when the tokenizer has none.
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    loop.estimate_fit(spec, model, rows[:hp.batch_size], pad_id, total_steps, reporter, compute)
    reporter.started(trainable, total, total_steps)

    # ---- train and save ------------------------------------------------------------------
    adapter_dir = Path(out_dir) / "adapter"
    out = loop.train(spec, model, params, optimizer, rows=rows, train_rows=train_rows,
                     val_rows=val_rows, pad_id=pad_id, total_steps=total_steps,
                     steps_per_epoch=steps_per_epoch, out_dir=out_dir, final_dir=adapter_dir,
                     save_dir=functools.partial(common.save_adapter, model),
                     packed=hp.packing, compute=compute, reporter=reporter, should_stop=should_stop)
    if not out.saved:
        return {}  # rank 0 saved the adapter and reports the result
    common.write_training_info(adapter_dir, spec, compute)
    ranks = out.ranks
    reporter.event("ADAPTER_SAVED", f"adapter saved to {adapter_dir}",
                   {"path": str(adapter_dir), "trainable_params": str(trainable),
                    "world_size": str(world), "rank_pids": json.dumps([r["pid"] for r in ranks]),
                    "rank_checksums": json.dumps([r["checksum"] for r in ranks])})

    # ---- cleanup -------------------------------------------------------------------------
    # The worker may report for a while after this; give the memory back now.
    del model, optimizer, params
    gc.collect()
    return {**out.metrics(), "examples": float(stats.examples),
            "truncated_examples": float(stats.truncated), "dropped_examples": float(stats.dropped),
            "validation_examples": float(len(val_rows))}


def build_model(spec: JobSpec, compute: common.Compute, reporter: Reporter | None = None):
    """The base (in the job's dtype on the device, or 4-bit for nf4) with gradient checkpointing
    as the job says and the LoRA adapter (fp32) added; reports MODEL_LOADED."""
    hp = spec.hyperparameters
    if hp.quantization == "nf4":
        model = qlora.load_base(spec.base_model, compute,
                                gradient_checkpointing=hp.gradient_checkpointing)
    else:
        model = loading.load_causal_lm(spec.base_model, dtype=compute.dtype, device=compute.device)
        if hp.gradient_checkpointing:
            common.enable_gradient_checkpointing(model)
    if reporter is not None:
        reporter.event("MODEL_LOADED", f"loaded {spec.base_model}",
                       {"base_model": spec.base_model,
                        "parameters": str(sum(p.numel() for p in model.parameters()))})
    model = add_lora(model, spec)
    for p in model.parameters():  # peft keeps LoRA weights fp32; trained biases (bias=all) too
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def add_lora(model, spec: JobSpec):
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
        raise TunewireError(R.TARGET_MODULES_INVALID, f"cannot apply LoRA to target_modules="
                            f"{targets}: {e}") from None
