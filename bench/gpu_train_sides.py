"""One side of bench/gpu_train.py's speed comparison, run in a process of its own.

    python bench/gpu_train.py --child '{"side": "ours", "model": ..., "data": ..., ...}'

prints one line `RESULT {json}`. Each side loads the model itself, so its peak memory is its own:
the peak counter is reset once the model (and adapter) are loaded and read at the end
(torch.cuda.max_memory_allocated; 0 on a CPU, where `peak_bytes` is reported as null).

Sides (the Side settings, `side`):
  ours     trainer_service.recipe_lora.run with a JobSpec (packing on/off, liger on/off, nf4 or not)
  hf       a plain Hugging Face Trainer + PEFT script: bf16=True, SDPA, gradient checkpointing,
           DataCollatorForSeq2Seq dynamic padding, AdamW (torch), linear schedule
  qlora_diff  ours with nf4 for a few steps, then the adapter's logits on the bf16 base (served)
           vs on the nf4 base it was trained on

Timing: the first `skip` optimizer steps are not counted (CUDA/cuBLAS start-up; our recipe also
runs an untimed warm-up step before training, the HF side does not); tokens/s = real (non-pad)
tokens of the counted steps / their seconds, measured after a device synchronise on both sides.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)  # both sides
LR, WARMUP, MAX_GRAD_NORM = 2e-4, 1, 1.0                                       # both sides


@dataclass(frozen=True)
class Side:
    side: str                      # ours | hf | qlora_diff
    model: str                     # model directory (save_pretrained)
    data: str                      # prompt/completion JSONL
    device: str                    # cuda | cpu
    precision: str                 # bf16 | fp32 (the compute precision of both sides)
    steps: int                     # optimizer steps
    batch_size: int                # examples per optimizer step (packed rows when packing)
    grad_accum: int                # micro-batches per step
    max_seq_length: int            # longest row (no generated row is longer)
    packing: bool = False          # ours only
    liger: bool = False            # ours only: liger kernels patched into transformers' Llama
    quantization: str = "none"     # ours only: none | nf4
    skip: int = 1                  # first optimizer steps not timed
    prompts: int = 4               # qlora_diff: rows whose logits are compared

    def __post_init__(self):
        if self.side not in ("ours", "hf", "qlora_diff"):
            raise ValueError(f"unknown side {self.side}")
        if self.steps <= self.skip:
            raise ValueError("steps must exceed the untimed skip steps")
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be a multiple of grad_accum")


@dataclass
class Recorder:
    """The recipe's Reporter: keeps every metric point and event; resets the GPU peak counter
    when training starts (after the model load, the adapter and the recipe's warm-up step)."""
    device: str = "cpu"
    points: list[dict] = field(default_factory=list)
    events: list[tuple[str, str, dict, dict]] = field(default_factory=list)

    def started(self, *_):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def event(self, kind, message, data, metrics=None):
        self.events.append((kind, message, dict(data), dict(metrics or {})))

    def metric(self, **kw):
        self.points.append(kw)

    def evaluation(self, **_):
        pass

    @property
    def last_step(self) -> int:
        return self.points[-1]["step"] if self.points else 0


def spec_for(s: Side):
    from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec, LoraSpec

    return JobSpec(
        base_model=s.model, training_data=s.data, adapter_name="bench",
        lora=LoraSpec(r=LORA["r"], lora_alpha=LORA["lora_alpha"], target_modules=("all-linear",),
                      lora_dropout=LORA["lora_dropout"]),
        hyperparameters=Hyperparameters(
            learning_rate=LR, max_steps=s.steps, batch_size=s.batch_size,
            max_seq_length=s.max_seq_length, warmup_steps=WARMUP, max_grad_norm=MAX_GRAD_NORM,
            seed=0, packing=s.packing, precision=s.precision, gradient_checkpointing=True,
            gradient_accumulation_steps=s.grad_accum, quantization=s.quantization),
        # no validation and no intermediate evaluation: the steps are all that runs
        eval=EvalSpec(validation_fraction=0.0, eval_every_steps=s.steps, early_stopping_patience=0))


def _peak(device: str) -> int | None:
    if device != "cuda":
        return None  # a CPU has no allocator counter: never a made-up number
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def run_ours(s: Side, out: Path) -> dict:
    from trainer_service import recipe_lora

    if s.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Class-level patches of transformers' Llama, before the model is built. Fused linear
        # cross-entropy needs `labels` passed to the model; our loss (common.labelled_loss) calls
        # the model without labels and keeps only labelled columns' logits, so it is not used.
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    rec = Recorder(s.device)
    t0 = time.perf_counter()
    recipe_lora.run(spec_for(s), out, rec, should_stop=lambda: False, device=s.device)
    counted = [p for p in rec.points if p["step"] > s.skip]
    tokens = sum(p["tokens_per_second"] * p["step_seconds"] for p in counted)
    seconds = sum(p["step_seconds"] for p in counted)
    mfus = sorted(p.get("mfu", 0.0) for p in counted)
    return {"tokens": round(tokens), "seconds": seconds, "steps_timed": len(counted),
            "peak_bytes": _peak(s.device),
            "mfu": mfus[len(mfus) // 2] if s.device == "cuda" and mfus else None,
            "losses": [p["loss"] for p in rec.points], "wall_s": time.perf_counter() - t0}


def tokenized_rows(s: Side, tok) -> list[dict]:
    """The data exactly as our recipe tokenizes it: the comparison is of training, not of
    tokenization (same token sequences, same labels)."""
    from trainer_service.data_rows import load_examples
    from trainer_service.data_tokens import tokenize_dataset
    from tunewire import loading

    rows, _ = tokenize_dataset(load_examples(s.data), tok, s.max_seq_length,
                               eos_ids=loading.stop_ids(s.model, tok))
    return [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
             "labels": r["labels"]} for r in rows]


def run_hf(s: Side, out: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from trainer_service import telemetry
    from tunewire import devices

    cuda = s.device == "cuda"
    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(s.model)
    rows = tokenized_rows(s, tok)
    inner = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    calls: list[tuple[int, list[int]]] = []  # per collate call: real tokens, row lengths

    def collate(batch):  # num_workers=0: called once per micro-batch, in order
        out_ = inner(batch)
        calls.append((int(out_["attention_mask"].sum()), [len(b["input_ids"]) for b in batch]))
        return out_

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=dtype, attn_implementation="sdpa",
                                                 device_map=s.device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=s.batch_size // s.grad_accum,
        gradient_accumulation_steps=s.grad_accum, max_steps=s.steps, learning_rate=LR,
        warmup_steps=WARMUP, lr_scheduler_type="linear", weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch", bf16=cuda and dtype == torch.bfloat16,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=0, save_strategy="no", logging_strategy="no", report_to="none", use_cpu=not cuda,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      callbacks=[Clock()])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    per_step = [calls[i * s.grad_accum:(i + 1) * s.grad_accum] for i in range(len(ends))]
    timed = per_step[s.skip:]
    tokens = sum(t for step in timed for t, _ in step)
    lengths = [n for step in timed for _, ns in step for n in ns]
    seconds = ends[-1] - ends[s.skip - 1] if s.skip else ends[-1] - t0
    result = {"tokens": tokens, "seconds": seconds, "steps_timed": len(timed),
              "peak_bytes": _peak(s.device), "mfu": None, "wall_s": time.perf_counter() - t0}
    if cuda:  # HF runs the LM head on every position: head_tokens = all tokens
        stats = telemetry.model_stats(model)
        flops = telemetry.step_flops(stats, tokens, telemetry.attention_pairs(lengths) / max(tokens, 1),
                                     head_tokens=tokens)
        dev = torch.device("cuda", torch.cuda.current_device())
        result["mfu"] = telemetry.mfu(flops, seconds, devices.peak_flops(dev, dtype))
    return result


def run_qlora_diff(s: Side, out: Path) -> dict:
    """Trains ours with nf4 for s.steps, then compares the adapter's next-token distributions on
    the nf4 base (what was trained) and on the bf16 base (what vLLM serves)."""
    import gc

    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer_service import qlora

    trained = run_ours(s, out)
    tok = AutoTokenizer.from_pretrained(s.model)
    rows = tokenized_rows(s, tok)[:s.prompts]
    ids = [torch.tensor([r["input_ids"][:256]], device="cuda") for r in rows]

    def logits(quantized: bool) -> list[torch.Tensor]:
        kw = {"quantization_config": qlora.quantization_config(torch.bfloat16)} if quantized else {}
        base = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.bfloat16,
                                                    device_map={"": 0}, **kw)
        model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        with torch.no_grad():
            got = [model(input_ids=x).logits.float()[0].cpu() for x in ids]
        del model, base
        gc.collect()
        torch.cuda.empty_cache()
        return got

    served, trained_on = logits(False), logits(True)
    abs_diff = torch.cat([(a - b).abs().flatten() for a, b in zip(served, trained_on)]).mean()
    # random weights give near-uniform logits: the difference means something next to their spread
    spread = torch.cat([a.flatten() for a in served]).std()
    # KL(trained || served) per position: how far the served distribution is from the trained one
    kl = torch.cat([F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True,
                             reduction="none").sum(-1) for a, b in zip(served, trained_on)])
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(served, trained_on)])
    return {**trained, "logit_mean_abs_diff": float(abs_diff), "logit_std": float(spread),
            "logit_rel_diff": float(abs_diff / spread), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "top1_agreement": float(agree.mean()),
            "positions": int(agree.numel())}


def child(config_json: str) -> None:
    """Runs one side and prints `RESULT {json}` (or `RESULT {"skipped": why}`)."""
    import importlib.util

    s = Side(**json.loads(config_json))
    needs = (["liger_kernel"] if s.liger else []) + \
        (["bitsandbytes"] if s.quantization == "nf4" or s.side == "qlora_diff" else [])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        print("RESULT " + json.dumps({"skipped": f"{', '.join(missing)} not installed"}), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = {"ours": run_ours, "hf": run_hf, "qlora_diff": run_qlora_diff}[s.side]
        r = run(s, Path(tmp))
    print("RESULT " + json.dumps(r), flush=True)
