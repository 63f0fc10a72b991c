"""Trainer benchmark: our LoRA recipe vs a plain Hugging Face `Trainer` + PEFT script, side by side.

    ./dev run python bench/trainer.py [--steps 30] [--repeats 2] [--model DIR] [--data FILE]
    ./dev run python bench/trainer.py --service     # job accepted → first step; step → watch stream

Same model (SmolLM2-135M-Instruct by default), same data (the demo's extraction set), same LoRA
(r=16, alpha=32, q_proj/v_proj, dropout 0.05), same optimizer settings (AdamW, lr 1e-3, 5 warm-up
steps, linear decay), same batch size and number of optimizer steps. Each side runs in its own
subprocess (so peak memory is its own), alternating, `--repeats` times; the table shows medians.

Measured per side: *real* tokens per second (tokens that are not padding, over the training
steps' wall time, model loading excluded) and peak resident memory (ru_maxrss of the process).
Baselines: `hf-maxlen` is the common script (tokenize with padding="max_length", the default
Trainer); `hf-dynamic` pads each batch to its longest row (DataCollatorForSeq2Seq). Ours pads
dynamically too and runs the LM head only on labelled columns (common.labelled_loss);
`ours-packed` is our recipe with `packing` (no padding at all; --packed-batch-size rows of
max_seq_length per step, about as many examples as --batch-size unpacked). Writes
docs/bench/trainer.json and, with matplotlib, docs/bench/trainer.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import conditions, other_benches  # noqa: E402 - bench/ is on sys.path as a script

SIDES = ("ours", "ours-packed", "hf-maxlen", "hf-dynamic")
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(a, packed: bool) -> dict:
    from trainer_service import recipe_lora
    from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec, LoraSpec

    class Quiet:  # the recipe's Reporter protocol; this benchmark only needs the final metrics
        def started(self, *_): pass
        def event(self, *_a, **_k): pass
        def evaluation(self, **_): pass
        def metric(self, **_): pass

    spec = JobSpec(base_model=a.model, training_data=a.data, adapter_name="bench",
                   lora=LoraSpec(r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                 target_modules=tuple(LORA["target_modules"]), lora_dropout=LORA["lora_dropout"]),
                   hyperparameters=Hyperparameters(learning_rate=1e-3, max_steps=a.steps, seed=0,
                                                   batch_size=a.packed_batch_size if packed else a.batch_size,
                                                   max_seq_length=a.max_seq_length, warmup_steps=5,
                                                   packing=packed),
                   eval=EvalSpec(validation_fraction=0.0, early_stopping_patience=0))
    with tempfile.TemporaryDirectory() as out:
        m = recipe_lora.run(spec, Path(out), Quiet(), should_stop=lambda: False)
    return {"tokens": m["train_tokens"], "seconds": m["train_seconds"], "peak_mib": peak_mib()}


def run_hf(a, dynamic: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator)

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [json.loads(line) for line in open(a.data)]

    def encode(r):  # prompt masked, completion + EOS trained: the same loss as ours
        p = tok(r["prompt"]).input_ids
        c = tok(r["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = (p + c)[:a.max_seq_length]
        labels = ([-100] * len(p) + c)[:a.max_seq_length]
        if not dynamic:  # the usual script: every row padded to max_length
            pad = a.max_seq_length - len(ids)
            return {"input_ids": ids + [tok.pad_token_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                    "labels": labels + [-100] * pad}
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    ds = Dataset.from_list([encode(r) for r in rows])
    inner = DataCollatorForSeq2Seq(tok, padding="longest") if dynamic else default_data_collator
    counted = {"tokens": 0}

    def collate(batch):  # num_workers=0: called once per step, in order
        out = inner(batch)
        counted["tokens"] += int(out["attention_mask"].sum())
        return out

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            times["start"] = time.perf_counter()

        def on_train_end(self, *_a, **_k):
            times["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                                 learning_rate=1e-3, warmup_steps=5, lr_scheduler_type="linear",
                                 weight_decay=0.0, max_grad_norm=1.0, seed=0, save_strategy="no",
                                 logging_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                                 remove_unused_columns=False, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
    return {"tokens": counted["tokens"], "seconds": times["end"] - times["start"], "peak_mib": peak_mib()}


def child(a) -> None:
    if a.side.startswith("ours"):
        r = run_ours(a, packed=a.side == "ours-packed")
    else:
        r = run_hf(a, dynamic=a.side == "hf-dynamic")
    print("RESULT " + json.dumps(r), flush=True)


def run_side(tree: Path, side: str, a) -> dict:
    """One side in its own process, with this script as it is in `tree` (a checkout; ROOT or
    another revision, see bench/trainer_trees.py): its RESULT plus tokens_per_s."""
    cmd = [sys.executable, str(tree / "bench" / "trainer.py"), "--side", side, "--model", a.model,
           "--data", a.data, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--packed-batch-size", str(a.packed_batch_size), "--max-seq-length", str(a.max_seq_length)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} in {tree} failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    return r


def service_latency(a) -> dict:
    """Job accepted → first step on the watch stream (worker start, model load, first step), and
    step stored by the trainer → seen by a watching client, through a real trainer process."""
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tunewire.trainer.v1 import trainer_pb2 as pb
    from tunewire.trainer.v1 import trainer_pb2_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = tempfile.mkdtemp()
    proc = subprocess.Popen([sys.executable, "-m", "tunewire.cli", "serve", "trainer", "--port", str(port),
                             "--metrics-port", "0", "--data-dir", tmp, "--data-root", str(Path(a.data).parent),
                             "--model-root", str(Path(a.model).parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        job = pb.TrainingJob(base_model=a.model, adapter_name="bench", training_data=pb.DatasetRef(path=a.data),
                             lora=pb.LoraMethod(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                             hyperparameters=pb.Hyperparameters(learning_rate=1e-3, max_steps=10, batch_size=8,
                                                                max_seq_length=a.max_seq_length),
                             eval=pb.EvalSettings(validation_fraction=0.0))
        t0 = time.time()
        created = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(training_job=job)).training_job
        first, lags = None, []
        for e in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(name=created.name), timeout=1800):
            now = time.time()
            if e.WhichOneof("payload") == "metric":
                first = first or now
                lags.append(now - e.time.ToNanoseconds() / 1e9)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"accepted_to_first_step_s": first - t0, "stored_to_seen_ms_median": 1000 * statistics.median(lags),
            "stored_to_seen_ms_max": 1000 * max(lags), "steps": len(lags)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--data", default=str(ROOT / "tunewire" / "data" / "extract_train.jsonl"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--packed-batch-size", type=int, default=2,
                   help="rows per step for ours-packed (a packed row holds ~4 of the demo's examples)")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side in a child
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "trainer.json"))
    p.add_argument("--service", action="store_true", help="only the service latencies (a real trainer)")
    a = p.parse_args()
    if not a.model:
        from tunewire.models import ensure_default_base_model

        a.model = str(ensure_default_base_model())
    if a.side:
        return child(a)
    if a.service:
        r = service_latency(a)
        print(json.dumps(r, indent=2))
        out = Path(a.out).with_name("trainer_service.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2))
        return None

    cond = conditions()  # before the runs: the load they start under
    sides = [s for s in SIDES if s in a.sides.split(",")]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(a.repeats):
        for side in sides:  # alternating, so a busy moment hits every side alike
            r = run_side(ROOT, side, a)
            results[side].append(r)
            print(f"[{rep + 1}/{a.repeats}] {side:>10}: {r['tokens_per_s']:8.1f} real tok/s  "
                  f"{r['seconds']:6.1f} s  peak {r['peak_mib']:6.0f} MiB", flush=True)
    med = {s: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "seconds", "tokens", "peak_mib")}
           for s, rs in results.items()}
    ref = "hf-maxlen" if "hf-maxlen" in med else sides[-1]
    base = med[ref]["tokens_per_s"]
    print(f"\n{a.steps} steps × batch {a.batch_size}, max_seq_length {a.max_seq_length}, medians of {a.repeats}")
    print(f"{'side':>10} | {'real tok/s':>10} | {'vs ' + ref:>12} | {'real tokens':>11} | {'peak MiB':>8}")
    for s in sides:
        m = med[s]
        print(f"{s:>10} | {m['tokens_per_s']:10.1f} | {m['tokens_per_s'] / base:11.2f}x | "
              f"{m['tokens']:11.0f} | {m['peak_mib']:8.0f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "side"},
                               "conditions": {**cond, "loadavg_at_end": os.getloadavg(),
                                              "other_bench_processes_at_end": other_benches()},
                               "runs": results, "median": med}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(sides, [med[s]["tokens_per_s"] for s in sides])
        ax.set_ylabel("real tokens / s")
        ax.set_title(f"LoRA training, {a.steps} steps, batch {a.batch_size}")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
