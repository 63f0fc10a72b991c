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

Outputs: a table per part on stdout (ready to paste in the README), docs/bench/serving_<part>.json
and, when matplotlib is installed, docs/bench/serving_<part>.png.

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
import signal
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (OUT_DIR, PROMPTS, bar_png, conditions, have_matplotlib, md_table,  # noqa: E402
                     median, other_benches, pct, write_json)

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
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "city": {"type": "string"},
                   "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False,
}


def json_prompt(i: int) -> str:
    return ("Extract the person as JSON with keys name, age, city, hobbies.\nText: "
            f"{PEOPLE[i % len(PEOPLE)]}\nJSON: ")


# --- real-world schemas for the compile benchmark (small -> large) ----------------------------
SCHEMAS = {
    "person (4 props)": PERSON_SCHEMA,
    "address (enum, pattern)": {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 80},
            "city": {"type": "string"},
            "postal_code": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{3}$"},
            "country": {"type": "string", "enum": ["PT", "ES", "FR", "DE", "IT", "GB", "US"]},
            "kind": {"enum": ["home", "work", "billing"]},
        },
        "required": ["street", "city", "country"], "additionalProperties": False,
    },
    "tool call (anyOf, arrays)": {
        "type": "object",
        "properties": {
            "tool": {"enum": ["search", "get_weather", "send_email", "create_event"]},
            "arguments": {"anyOf": [
                {"type": "object", "properties": {"query": {"type": "string"},
                                                  "top_k": {"type": "integer", "minimum": 1, "maximum": 20}},
                 "required": ["query"], "additionalProperties": False},
                {"type": "object", "properties": {"city": {"type": "string"},
                                                  "units": {"enum": ["metric", "imperial"]}},
                 "required": ["city"], "additionalProperties": False},
                {"type": "object", "properties": {"to": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 1, "maxItems": 5},
                                                  "subject": {"type": "string"}, "body": {"type": "string"}},
                 "required": ["to", "subject", "body"], "additionalProperties": False},
                {"type": "object", "properties": {"title": {"type": "string"},
                                                  "start": {"type": "string", "format": "date-time"},
                                                  "minutes": {"type": "integer", "minimum": 5}},
                 "required": ["title", "start"], "additionalProperties": False},
            ]},
        },
        "required": ["tool", "arguments"], "additionalProperties": False,
    },
    "invoice ($defs, nested)": {
        "$defs": {
            "money": {"type": "object", "properties": {
                "amount": {"type": "number", "minimum": 0},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                "required": ["amount", "currency"], "additionalProperties": False},
            "party": {"type": "object", "properties": {
                "name": {"type": "string"}, "vat_id": {"type": "string"},
                "email": {"type": "string", "format": "email"}},
                "required": ["name"], "additionalProperties": False},
            "line": {"type": "object", "properties": {
                "sku": {"type": "string"}, "description": {"type": "string"},
                "quantity": {"type": "integer", "minimum": 1}, "unit_price": {"$ref": "#/$defs/money"}},
                "required": ["description", "quantity", "unit_price"], "additionalProperties": False},
        },
        "type": "object",
        "properties": {
            "number": {"type": "string"}, "issued": {"type": "string", "format": "date"},
            "seller": {"$ref": "#/$defs/party"}, "buyer": {"$ref": "#/$defs/party"},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 1, "maxItems": 50},
            "total": {"$ref": "#/$defs/money"}, "paid": {"type": "boolean"},
            "notes": {"type": ["string", "null"]},
        },
        "required": ["number", "issued", "seller", "buyer", "lines", "total"],
        "additionalProperties": False,
    },
    "github issue (large)": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 256},
            "body": {"type": "string"},
            "state": {"enum": ["open", "closed"]},
            "state_reason": {"enum": ["completed", "not_planned", "reopened", None]},
            "labels": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "color": {"type": "string", "pattern": "^[0-9a-f]{6}$"},
                "description": {"type": ["string", "null"]}},
                "required": ["name"], "additionalProperties": False}, "maxItems": 20},
            "assignees": {"type": "array", "items": {"type": "string",
                                                     "pattern": "^[A-Za-z0-9-]{1,39}$"}, "maxItems": 10},
            "milestone": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                "title": {"type": "string"}, "due_on": {"type": "string", "format": "date-time"},
                "open_issues": {"type": "integer", "minimum": 0}}, "required": ["title"],
                "additionalProperties": False}]},
            "reactions": {"type": "object", "properties": {
                k: {"type": "integer", "minimum": 0} for k in
                ("+1", "-1", "laugh", "hooray", "confused", "heart", "rocket", "eyes")},
                "additionalProperties": False},
            "comments": {"type": "array", "maxItems": 100, "items": {"type": "object", "properties": {
                "author": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
                "body": {"type": "string"},
                "author_association": {"enum": ["OWNER", "MEMBER", "COLLABORATOR", "CONTRIBUTOR",
                                                "FIRST_TIMER", "NONE"]}},
                "required": ["author", "body"], "additionalProperties": False}},
            "locked": {"type": "boolean"},
            "number": {"type": "integer", "minimum": 1},
            "created_at": {"type": "string", "format": "date-time"},
        },
        "required": ["title", "state", "number"], "additionalProperties": False,
    },
}


# --- workload runner (shared by the in-process engine and the gRPC client) ---------------------
async def run_workload(send, items: list, concurrency: int) -> dict:
    """send(item) -> (ttft_s, latency_s, completion_tokens, extra); `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(item):
        async with sem:
            return await send(item)

    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(it) for it in items])
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in res)
    ttft = [r[0] * 1000 for r in res]
    lat = [r[1] * 1000 for r in res]
    return {"requests": len(items), "concurrency": concurrency, "wall_s": wall, "tokens": tokens,
            "tok_s": tokens / wall, "req_s": len(items) / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95),
            "latency_ms_p50": pct(lat, 50), "latency_ms_p95": pct(lat, 95),
            "extra": [r[3] for r in res]}


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


# --- the gRPC service --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, store: Path, log_path: Path):
    """(process, gRPC address, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "tunewire.cli", "serve", "serving", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--model", args.model,
           "--adapter-store", str(store), "--max-loras", str(args.max_loras),
           "--max-cpu-loras", str(args.max_cpu_loras), "--max-model-len", str(args.max_model_len),
           "--max-queued-requests", "1024", "--config", str(store.parent / "serving.toml")]
    # no CLI flags for these two: a config file (field names of ServingConfig)
    (store.parent / "serving.toml").write_text(
        f"max_num_seqs = {args.max_num_seqs}\nkv_cache_gib = {args.kv_cache_gib}\n")
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"


def load_phases(metrics_url: str) -> dict[str, float]:
    """Cumulative seconds per adapter-load phase (validate, room, engine) from the server."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pat = re.compile(r'^tunewire_serving_adapter_load_phase_seconds_sum\{phase="(\w+)"\} (\S+)$', re.M)
    return {k: float(v) for k, v in pat.findall(text)}


def wait_serving(proc, address: str, log_path: Path, timeout: float) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with grpc.insecure_channel(address) as ch:
                st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if st == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - t0
        except grpc.RpcError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"not SERVING after {timeout}s:\n{log_path.read_text()[-4000:]}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Client:
    def __init__(self, address: str, max_tokens: int):
        import grpc

        from tunewire.serving.v1 import serving_pb2 as pb
        from tunewire.serving.v1 import serving_pb2_grpc as pbg

        self.pb = pb
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pbg.ServingServiceStub(self.channel)
        self.max_tokens = max_tokens

    async def stream(self, prompt: str, adapter: str = "", schema: dict | None = None,
                     max_tokens: int | None = None, t_start: float | None = None,
                     min_tokens: int = 0):
        """(ttft_s, latency_s, completion_tokens, extra); times from t_start if given."""
        pb = self.pb
        fmt = (pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema=json.dumps(schema)))
               if schema is not None else None)
        req = pb.StreamGenerateRequest(prompt=prompt, adapter=adapter, response_format=fmt,
                                       sampling=pb.SamplingParams(max_tokens=max_tokens or self.max_tokens,
                                                                  min_tokens=min_tokens))
        t = t_start if t_start is not None else time.perf_counter()
        ttft, n, last, text = None, 0, None, []
        async for m in self.stub.StreamGenerate(req, timeout=600):
            if ttft is None and (m.text or m.completion_tokens):
                ttft = time.perf_counter() - t
            n = max(n, m.completion_tokens)
            text.append(m.text)
            last = m
        total = time.perf_counter() - t
        extra = {"valid": bool(last.structured_output_valid) if last is not None else False,
                 "version": last.adapter_version if last is not None else "",
                 "text": "".join(text)}
        return (ttft if ttft is not None else total), total, n, extra


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


# --- schema compile (no engine) ----------------------------------------------------------------
async def schema_part(args) -> dict:
    from transformers import AutoTokenizer

    from serving_service.structured import StructuredOutputs

    tok = AutoTokenizer.from_pretrained(args.model)
    so = StructuredOutputs(lambda: tok, compile_timeout_s=60)
    t = time.perf_counter()
    so._ll_tokenizer()
    tok_ms = (time.perf_counter() - t) * 1000
    rows = []
    for label, schema in SCHEMAS.items():
        text = json.dumps(schema)
        cold, warm = [], []
        for _ in range(args.schema_repeats):
            fresh = StructuredOutputs(lambda: tok, compile_timeout_s=60)
            fresh._ll_tok = so._ll_tok            # the tokenizer is built once per server
            c = await fresh.prepare("json_schema", schema=text)
            assert not c.cached
            cold.append(c.compile_ms)
            for _ in range(5):
                w = await fresh.prepare("json_schema", schema=text)
                assert w.cached
                warm.append(w.compile_ms)
        rows.append({"schema": label, "bytes": len(text), "cold_ms_median": median(cold),
                     "cold_ms_max": max(cold), "cached_ms_median": median(warm),
                     "warnings": list(c.warnings) if hasattr(c, "warnings") else []})
    return {"tokenizer_build_ms": tok_ms, "repeats": args.schema_repeats, "rows": rows}


# --- report ------------------------------------------------------------------------------------
def report(args, results: dict, cond: dict) -> None:
    cmd = "python bench/serving.py " + " ".join(sys.argv[1:])
    common = {"command": cmd.strip(), "conditions": cond, "model": args.model,
              "max_tokens": args.max_tokens, "engine": {
                  "dtype": "float32", "enforce_eager": args.enforce_eager,
                  "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
                  "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs},
              "start_s": results.get("start_s", {})}
    plot_note = "" if have_matplotlib() else " (matplotlib not installed: no PNG)"

    def strip(r):
        return {k: v for k, v in r.items() if k != "extra"}

    if "overhead_inproc" in results and "overhead_grpc" in results:
        rows, data = [], []
        for c in args.conc:
            a, g = results["overhead_inproc"][str(c)], results["overhead_grpc"][str(c)]
            ratio = g["tok_s"] / a["tok_s"]
            d_ttft = g["ttft_ms_p50"] - a["ttft_ms_p50"]
            rows.append([c, a["requests"], f"{a['tok_s']:.1f}", f"{g['tok_s']:.1f}", f"{ratio:.3f}",
                         f"{a['ttft_ms_p50']:.1f}", f"{g['ttft_ms_p50']:.1f}", f"{d_ttft:+.1f}",
                         f"{a['latency_ms_p50']:.0f}", f"{g['latency_ms_p50']:.0f}"])
            data.append({"concurrency": c, "inproc": strip(a), "grpc": strip(g),
                         "throughput_ratio": ratio, "ttft_overhead_ms_p50": d_ttft,
                         "ttft_overhead_ms_p95": g["ttft_ms_p95"] - a["ttft_ms_p95"],
                         "tokens_equal": a["tokens"] == g["tokens"]})
        print("\n## Serving overhead: gRPC service vs the same AsyncLLM in-process\n")
        print(md_table(["concurrency", "requests", "in-process tok/s", "gRPC tok/s", "ratio",
                        "TTFT p50 in-proc ms", "TTFT p50 gRPC ms", "TTFT overhead ms",
                        "latency p50 in-proc ms", "latency p50 gRPC ms"], rows))
        print("tokens generated equal (in-proc vs gRPC):",
              ", ".join(f"c={d['concurrency']}: {d['tokens_equal']}" for d in data))
        write_json("serving_overhead" + args.suffix, {**common, "target_ratio": 0.95, "rows": data})
        bar_png("serving_overhead" + args.suffix, "gRPC service vs in-process AsyncLLM (tok/s)",
                [f"c={c}" for c in args.conc],
                {"in-process": [d["inproc"]["tok_s"] for d in data],
                 "gRPC": [d["grpc"]["tok_s"] for d in data]}, "tokens/s")

    if "adapters" in results:
        res = results["adapters"]
        base = res["base"]["tok_s"]
        rows = [[k, v["requests"], f"{v['tok_s']:.1f}", f"{v['tok_s'] / base:.2f}",
                 f"{v['ttft_ms_p50']:.0f}", f"{v['latency_ms_p50']:.0f}"] for k, v in res.items()]
        print(f"\n## Multi-adapter via gRPC (concurrency {max(args.conc)})\n")
        print(md_table(["workload", "requests", "tok/s", "vs base", "TTFT p50 ms", "latency p50 ms"], rows))
        write_json("serving_adapters" + args.suffix, {**common, "target_ratio": 0.8, "concurrency": max(args.conc),
                                        "rows": [{"workload": k, **strip(v), "vs_base": v["tok_s"] / base}
                                                 for k, v in res.items()]})
        bar_png("serving_adapters" + args.suffix, "Multi-adapter throughput vs base (gRPC)", list(res),
                {"vs base": [v["tok_s"] / base for v in res.values()]}, "ratio", ref_line=0.8)

    if "structured" in results:
        res = results["structured"]
        u = res["unconstrained"]
        rows = []
        for k, v in res.items():
            valid = sum(1 for e in v["extra"] if e["valid"]) if k != "unconstrained" else None
            parsed = sum(1 for e in v["extra"] if _parses(e["text"]))
            v["valid"], v["parses_as_json"] = valid, parsed
            rows.append([k, v["requests"], f"{v['tokens'] / v['requests']:.1f}", f"{v['tok_s']:.1f}",
                         f"{v['tok_s'] / u['tok_s']:.2f}", f"{v['req_s']:.2f}",
                         f"{v['req_s'] / u['req_s']:.2f}", f"{parsed}/{v['requests']}",
                         "-" if valid is None else f"{valid}/{v['requests']}"])
        print(f"\n## Structured output via gRPC (concurrency {max(args.conc)}, "
              f"max_tokens {args.json_max_tokens})\n")
        print(md_table(["mode", "requests", "tokens/request", "tok/s", "tok/s vs unconstrained",
                        "req/s", "req/s vs unconstrained", "parses as JSON", "schema-valid"], rows))
        write_json("serving_structured" + args.suffix, {**common, "json_max_tokens": args.json_max_tokens,
                                          "schema": PERSON_SCHEMA,
                                          "rows": [{"mode": k, **strip(v)} for k, v in res.items()]})
        bar_png("serving_structured" + args.suffix, "JSON-schema constrained vs unconstrained (gRPC)", list(res),
                {"tok/s": [v["tok_s"] for v in res.values()]}, "tokens/s")

    if "schemas" in results:
        s = results["schemas"]
        rows = [[r["schema"], r["bytes"], f"{r['cold_ms_median']:.1f}", f"{r['cold_ms_max']:.1f}",
                 f"{r['cached_ms_median']:.3f}"] for r in s["rows"]]
        print(f"\n## Schema compile (StructuredOutputs.prepare, guidance; median of {s['repeats']} "
              f"cold, 5x{s['repeats']} cached; one-time tokenizer build {s['tokenizer_build_ms']:.0f} ms)\n")
        print(md_table(["schema", "bytes", "cold ms (median)", "cold ms (max)", "cached ms"], rows))
        write_json("serving_schemas" + args.suffix, {**common, **s})
        bar_png("serving_schemas" + args.suffix, "Schema compile time: cold vs cached (ms)",
                [r["schema"] for r in s["rows"]],
                {"cold": [r["cold_ms_median"] for r in s["rows"]],
                 "cached": [r["cached_ms_median"] for r in s["rows"]]}, "ms")

    if "hotload" in results:
        h = results["hotload"]
        rows = [[r["adapter"], f"{r['load_adapter_ms']:.0f}",
                 " / ".join(f"{r.get(k + '_ms', 0):.0f}" for k in ("validate", "room", "engine")),
                 f"{r['load_to_first_token_ms']:.0f}",
                 f"{r['first_request_ttft_ms']:.0f}", f"{r['base_ttft_under_load_ms']:.0f}",
                 r["served_version"]] for r in h["rows"]]
        print(f"\n## Hot-load via gRPC ({h['background_streams']} background streams of "
              f"{h['bg_tokens']} tokens running)\n")
        print(md_table(["adapter", "LoadAdapter ms", "validate / room / engine ms", "LoadAdapter call -> first token ms",
                        "of which first request TTFT ms", "base request TTFT ms (same load)",
                        "version served"], rows))
        write_json("serving_hotload" + args.suffix, {**common, **h})
        bar_png("serving_hotload" + args.suffix, "Hot-load under load (ms)", [r["adapter"] for r in h["rows"]],
                {"LoadAdapter": [r["load_adapter_ms"] for r in h["rows"]],
                 "call -> first token": [r["load_to_first_token_ms"] for r in h["rows"]],
                 "base TTFT": [r["base_ttft_under_load_ms"] for r in h["rows"]]}, "ms")
    print(f"\nJSON{plot_note} written to {OUT_DIR}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


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
