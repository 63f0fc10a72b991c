"""Serving benchmarks: gRPC overhead, multi-adapter, structured output, schema compile, hot-load.

Every number is a side-by-side ratio measured in one invocation. Workload (defaults, all flags):
SmolLM2-135M-Instruct (`tunewire.models.ensure_default_base_model()`, or --model), float32,
greedy, max_tokens 32, raw prompts (no chat template), streamed, engine args identical in both
engines: LoRA on, --max-loras 8 --max-cpu-loras 8, max_lora_rank 16, max_num_seqs 32,
max_model_len 512, guidance structured outputs, enforce_eager off (--enforce-eager to turn it on).

Parts (--parts, comma-separated; default all):

  overhead    the same prompts, concurrency 1 and 8, through `tunewire serve serving` (a
              subprocess on 127.0.0.1, StreamGenerate from a grpc.aio client) vs the same
              `serving_service.engine.VllmEngine` driven in-process (in a subprocess of its own,
              run first; the two engines never run at once). Throughput ratio (target >= 0.95)
              and TTFT overhead (client-side, first streamed token).
  adapters    via gRPC: base only vs every request on an adapter, round-robin over 1, 4, 8
              random r=16 q/v peft adapters (init_lora_weights=False) published to a temp store
              and loaded with LoadAdapter beforehand; min_tokens = max_tokens, so every request
              generates the same number of tokens. Ratios vs base (target >= 0.8).
  structured  via gRPC: the same JSON-extraction prompts unconstrained vs `json_schema`
              constrained (max_tokens --json-max-tokens); tokens/s, requests/s, validity.
  hotload     via gRPC, while 8 background streams keep the engine busy: LoadAdapter of a newly
              published adapter, then a StreamGenerate on it; LoadAdapter latency and
              LoadAdapter call -> first token, next to a base request's TTFT under the same load.
  schemas     `serving_service.structured.StructuredOutputs.prepare` directly (no engine, run
              after the server stopped): compile ms cold (fresh cache) vs cached for 5 real-world
              schemas of varied complexity; the one-time tokenizer build is reported apart.

Outputs: a table per part on stdout (ready to paste in docs/serving.md),
docs/bench/serving_<part>.json and, when matplotlib is installed, docs/bench/serving_<part>.png.
Beside this file: serving_grpc.py (the service subprocess and its client), serving_schemas.py
(the schemas part), serving_report.py (tables and files).

Run (about 5 minutes on 2 cores; two engine start-ups of ~30-40 s each):

    .venv/bin/python bench/serving.py            # everything
    .venv/bin/python bench/serving.py --quick    # fewer prompts
    .venv/bin/python bench/serving.py --parts overhead --prompts 64 --concurrency 1,8,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import PROMPTS, conditions, other_benches, run_workload  # noqa: E402
from serving_grpc import Client, load_phases, start_server, stop_server, wait_serving  # noqa: E402
from serving_report import report  # noqa: E402
from serving_schemas import PERSON_SCHEMA, schema_part  # noqa: E402

PARTS = ("overhead", "adapters", "structured", "hotload", "schemas")
PEOPLE = [
    "Ana, 31, lives in Braga and likes hiking and chess.",
    "Tom is 45 years old, from Leeds; hobbies: fishing.",
    "Mei Chen (27) moved to Toronto. She paints and runs.",
    "Carlos, age 52, Madrid, enjoys cooking, golf and jazz.",
    "Priya, 38, Bangalore, reads novels.",
    "Jonas, 19, student in Berlin, plays guitar and football.",
    "Fatima is 64 and lives in Rabat; she gardens.",
    "Liam, 23, Dublin, likes surfing and coding.",
]
def json_prompt(i: int) -> str:
    return ("Extract the person as JSON with keys name, age, city, hobbies.\nText: "
            f"{PEOPLE[i % len(PEOPLE)]}\nJSON: ")


def overhead_items(args, c: int) -> list[str]:
    n = args.prompts_c1 if c == 1 else args.prompts
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# --- in-process engine (worker subprocess) ---------------------------------------------------
async def _inproc_worker(args) -> dict:
    from serving_service.engine import EngineConfig, GenParams, VllmEngine

    engine = VllmEngine(EngineConfig(
        model=args.model, max_model_len=args.max_model_len, max_loras=args.max_loras,
        max_lora_rank=16, max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib, enforce_eager=args.enforce_eager))
    t0 = time.monotonic()
    await engine.start()
    start_s = time.monotonic() - t0
    counter = iter(range(10**9))

    async def send(prompt):
        t = time.perf_counter()
        ttft, n, ids = None, 0, []
        async for d in engine.generate(f"b{next(counter)}", prompt,
                                       GenParams(max_tokens=args.max_tokens), None):
            if ttft is None and (d.text or d.completion_tokens):
                ttft = time.perf_counter() - t
            n = d.completion_tokens
            ids.extend(d.token_ids)
        total = time.perf_counter() - t
        return (ttft if ttft is not None else total), total, n, ids

    out = {"start_s": start_s, "runs": {}}
    try:
        for c in args.conc:
            await run_workload(send, PROMPTS[:max(c, 2)], c)           # warm-up
            r = await run_workload(send, overhead_items(args, c), c)
            out["runs"][str(c)] = r
    finally:
        engine.shutdown()
    return out


def run_inproc(args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, *args.passthrough]
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"in-process worker failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- adapters --------------------------------------------------------------------------------
def make_adapters(model_dir: str, out: Path, n: int) -> list[Path]:
    """n random r=16 q/v peft adapters (different seeds)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
    dirs = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        pm = get_peft_model(model, cfg)
        d = out / f"a{i}"
        pm.save_pretrained(d)
        model = pm.unload()
        dirs.append(d)
    return dirs


async def grpc_parts(args, address: str, adapters: dict[str, Path], results: dict) -> None:
    from tunewire.serving.v1 import serving_pb2 as pb

    cl = Client(address, args.max_tokens)
    try:
        if "overhead" in args.parts_set:
            runs = {}
            for c in args.conc:
                await run_workload(lambda p: cl.stream(p), PROMPTS[:max(c, 2)], c)   # warm-up
                runs[str(c)] = await run_workload(lambda p: cl.stream(p), overhead_items(args, c), c)
            results["overhead_grpc"] = runs

        if "structured" in args.parts_set:
            items = [json_prompt(i) for i in range(args.prompts)]
            c = max(args.conc)
            res = {}
            for mode, schema in (("unconstrained", None), ("json_schema", PERSON_SCHEMA)):
                async def send(p, schema=schema):
                    return await cl.stream(p, schema=schema, max_tokens=args.json_max_tokens)
                await run_workload(send, items[:c], c)                          # warm-up (+ compile)
                res[mode] = await run_workload(send, items, c)
            results["structured"] = res

        if "adapters" in args.parts_set:
            names = [f"mix{i}" for i in range(8)]
            for n in names:
                await cl.stub.LoadAdapter(pb.LoadAdapterRequest(name=n), timeout=120)
            c = max(args.conc)
            items = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
            res = {}
            for label, k in (("base", 0), ("1 adapter", 1), ("4 adapters", 4), ("8 adapters", 8)):
                idx = iter(range(10**9))

                # min_tokens = max_tokens: every request generates the same number of tokens
                # (otherwise base requests stop at EOS sooner than random adapters do)
                async def send(p, k=k, idx=idx):
                    a = names[next(idx) % k] if k else ""
                    return await cl.stream(p, adapter=a, min_tokens=args.max_tokens)
                await run_workload(send, items[:max(c, k)], c)                  # warm-up
                res[label] = await run_workload(send, items, c)
                res[label]["adapters"] = k
            results["adapters"] = res

        if "hotload" in args.parts_set:
            stop = asyncio.Event()
            started = asyncio.Event()
            bg_done = [0]

            async def background(i):
                while not stop.is_set():
                    await cl.stream(PROMPTS[i % len(PROMPTS)], max_tokens=args.bg_tokens)
                    bg_done[0] += 1
                    started.set()

            bg = [asyncio.create_task(background(i)) for i in range(args.bg_streams)]
            await asyncio.sleep(3.0)        # the background streams are running by now
            rows = []
            try:
                for i in range(args.hot_adapters):
                    name = f"hot{i}"
                    before = await asyncio.to_thread(load_phases, args.metrics_url)
                    t0 = time.perf_counter()
                    resp = await cl.stub.LoadAdapter(pb.LoadAdapterRequest(name=name), timeout=120)
                    t1 = time.perf_counter()
                    after = await asyncio.to_thread(load_phases, args.metrics_url)
                    ttft, _, n, extra = await cl.stream(PROMPTS[i], adapter=name, max_tokens=4, t_start=t0)
                    b_ttft, _, _, _ = await cl.stream(PROMPTS[i], max_tokens=4)
                    rows.append({"adapter": name, "version": resp.adapter.version, "server_load_ms": resp.adapter.load_ms,
                                 "load_adapter_ms": (t1 - t0) * 1000,
                                 **{f"{k}_ms": 1000 * (after[k] - before.get(k, 0.0)) for k in after},
                                 "load_to_first_token_ms": ttft * 1000,
                                 "first_request_ttft_ms": ttft * 1000 - (t1 - t0) * 1000,
                                 "base_ttft_under_load_ms": b_ttft * 1000,
                                 "served_version": extra["version"]})
                    await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.gather(*bg, return_exceptions=True)
            results["hotload"] = {"background_streams": args.bg_streams, "bg_tokens": args.bg_tokens,
                                  "rows": rows}
    finally:
        await cl.channel.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="fewer prompts (16, 4 at concurrency 1)")
    ap.add_argument("--model", default="", help="HF model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=32, help="requests per measured run")
    ap.add_argument("--prompts-c1", type=int, default=12, help="requests at concurrency 1")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json-max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-cpu-loras", type=int, default=8)
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--bg-streams", type=int, default=8, help="hot-load: background streams")
    ap.add_argument("--bg-tokens", type=int, default=128, help="hot-load: tokens per background request")
    ap.add_argument("--hot-adapters", type=int, default=3)
    ap.add_argument("--schema-repeats", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--suffix", default="", help="appended to the output names (serving_<part><suffix>.json)")
    ap.add_argument("--show-server-log", action="store_true", help="print the server log tail")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.prompts_c1, args.hot_adapters, args.schema_repeats = 16, 4, 2, 2
    args.conc = [int(c) for c in args.concurrency.split(",") if c]
    args.parts_set = {p for p in args.parts.split(",") if p}
    if unknown := args.parts_set - set(PARTS):
        ap.error(f"unknown parts: {sorted(unknown)}")
    # flags the in-process worker must share with the server
    args.passthrough = [f"--{k}={v}" for k, v in (
        ("prompts", args.prompts), ("prompts-c1", args.prompts_c1), ("concurrency", args.concurrency),
        ("max-tokens", args.max_tokens), ("max-model-len", args.max_model_len),
        ("max-num-seqs", args.max_num_seqs), ("max-loras", args.max_loras),
        ("max-cpu-loras", args.max_cpu_loras), ("kv-cache-gib", args.kv_cache_gib))]
    if args.enforce_eager:
        args.passthrough.append("--enforce-eager")

    if args.worker:
        print("RESULT " + json.dumps(asyncio.run(_inproc_worker(args))), flush=True)
        return

    from tunewire.models import ensure_default_base_model

    if not args.model:
        args.model = str(ensure_default_base_model(progress=print))
    cond = conditions()
    print(f"conditions: {cond}", flush=True)
    results: dict = {"start_s": {}}
    t_all = time.monotonic()

    if "overhead" in args.parts_set:
        print("in-process engine ...", flush=True)
        r = run_inproc(args)
        results["overhead_inproc"] = r["runs"]
        results["start_s"]["inproc_engine"] = r["start_s"]
        print(f"  engine start {r['start_s']:.0f} s; " + ", ".join(
            f"c={c}: {v['tok_s']:.1f} tok/s" for c, v in r["runs"].items()), flush=True)

    grpc_needed = args.parts_set & {"overhead", "adapters", "structured", "hotload"}
    if grpc_needed:
        tmp = Path(tempfile.mkdtemp(prefix="tw-bench-serving-"))
        try:
            from tunewire.adapters import publish

            store = tmp / "store"
            n_mix = 8 if "adapters" in args.parts_set else 0
            n_hot = args.hot_adapters if "hotload" in args.parts_set else 0
            adapters: dict[str, Path] = {}
            if n_mix + n_hot:
                srcs = make_adapters(args.model, tmp / "src", n_mix + n_hot)
                names = [f"mix{i}" for i in range(n_mix)] + [f"hot{i}" for i in range(n_hot)]
                # all published up front: for hot* the LoadAdapter call (not publishing) is timed
                for name, src in zip(names, srcs):
                    adapters[name] = publish(src, store, name, base_model_dir=args.model)[0]
            store.mkdir(parents=True, exist_ok=True)
            log_path = tmp / "serving.log"
            print("gRPC service ...", flush=True)
            proc, address, args.metrics_url = start_server(args, store, log_path)
            try:
                results["start_s"]["grpc_service"] = wait_serving(proc, address, log_path,
                                                                  args.start_timeout)
                print(f"  SERVING after {results['start_s']['grpc_service']:.0f} s", flush=True)
                asyncio.run(grpc_parts(args, address, adapters, results))
            finally:
                stop_server(proc)
                if args.show_server_log and log_path.exists():
                    print(log_path.read_text(errors="replace")[-6000:])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if "schemas" in args.parts_set:
        print("schema compile ...", flush=True)
        results["schemas"] = asyncio.run(schema_part(args))

    cond["loadavg_at_end"] = os.getloadavg()
    cond["other_bench_processes_at_end"] = other_benches()
    cond["total_s"] = time.monotonic() - t_all
    report(args, results, cond)
    print(f"total {cond['total_s']:.0f} s")


if __name__ == "__main__":
    main()
