"""Front ends, interleaved: in-process vLLM AsyncLLM vs the gRPC service vs its HTTP API.

The same workload (the first --prompts of bench/_common.py PROMPTS, raw, greedy, max_tokens =
min_tokens = 32: every request generates 32 tokens; streamed) at each --concurrency, on three sides:
  inproc  `AsyncLLM.generate` in a worker subprocess (no tunewire Generator), built from exactly
          the service's engine arguments: it parses the service's `tunewire serve serving ...`
          arguments with tunewire's parser, then serving_service.engine `engine_args` (and
          `VllmEngine.prepare`: vLLM's environment and CPU LoRA plugin, as the service);
  grpc    `tunewire serve serving` (a subprocess), StreamGenerate via bench/serving_grpc.py Client;
  http    the SAME service's --http-port: POST /v1/completions, stream: true, from one
          httpx.AsyncClient (one connection pool); SSE lines parsed here (one json.loads per
          event), no SDK: the client stays cheap so the bench measures the server.
Engine settings: bench/serving.py's (LoRA on, max_loras 8, max_model_len 512, max_num_seqs 32).
Both engines start at once and stay up; every side is warmed up at every concurrency. A *round*
runs, per concurrency, the three sides back to back in an order rotated every round: every round
gives a ratio at every concurrency, from three runs ~10-20 s apart, so a slow spell of the shared
VM hits them alike. Each ratio (tokens/s over inproc's, same round and concurrency) is the median
of the per-round ratios, with the [min-max] range. grpc's and http's clients run in this process
on the same cores as the servers; inproc's caller is inside its worker.
TTFT: until the first streamed token, whose text may still be empty (the detokenizer holds it).
Checks: every request generated 32 tokens and its text equals inproc's (else exit 1, after the JSON).

    .venv/bin/python bench/serving_frontends.py                # defaults: ~7-8 min on 2 cores
    .venv/bin/python bench/serving_frontends.py --rounds 2 --prompts 4 --out /tmp/f.json
    TUNEWIRE_BENCH_PROFILE=/tmp/prof .venv/bin/python bench/serving_frontends.py
        # the service and the worker under cProfile: /tmp/prof/{serving,inproc}.prof
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import OUT_DIR, PROMPTS, conditions, md_table, median, run_workload  # noqa: E402
from serving_grpc import Client, free_port, serve_argv, stop_server, wait_serving  # noqa: E402

SIDES = ("inproc", "grpc", "http")
REF = "inproc"
MAX_TOKENS = 32
PROFILE_ENV = "TUNEWIRE_BENCH_PROFILE"  # a directory: run the service and the worker under cProfile
# bench/serving.py's engine settings, given to the service as flags (serving_grpc.serve_argv)
ENGINE = dict(max_loras=8, max_cpu_loras=8, max_model_len=512, max_num_seqs=32, kv_cache_gib=1,
              enforce_eager=False)


# --- arithmetic (tests/test_bench_frontends.py) ----------------------------------------------
def rotation(sides, r: int) -> list:
    """Round r's order: `sides` rotated left by r, so each side takes every position in turn."""
    k = r % len(sides)
    return list(sides[k:]) + list(sides[:k])


def tok_s(run: dict) -> float:
    return run["tokens"] / run["wall_s"]


def ratio_stats(values: list[float], refs: list[float]) -> dict:
    """Per-round ratios values[i]/refs[i]: their median and [min, max]."""
    ratios = [v / r for v, r in zip(values, refs, strict=True)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "ratios": ratios}


def summarize(rounds: list[dict], conc: list[int]) -> list[dict]:
    """rounds[i]["runs"][str(c)][side] = a run -> one row per (concurrency, side)."""
    rows = []
    for c in conc:
        per = {s: [tok_s(r["runs"][str(c)][s]) for r in rounds] for s in SIDES}
        for s in SIDES:
            row = {"concurrency": c, "side": s, "tok_s_median": median(per[s]),
                   "tok_s_min": min(per[s]), "tok_s_max": max(per[s]),
                   "ttft_ms_p50_median": median([r["runs"][str(c)][s]["ttft_ms_p50"] for r in rounds])}
            if s != REF:
                st = ratio_stats(per[s], per[REF])
                row.update(vs_inproc=st["median"], vs_inproc_min=st["min"], vs_inproc_max=st["max"],
                           vs_inproc_rounds=st["ratios"])
            rows.append(row)
    return rows


def check_outputs(rounds: list[dict], max_tokens: int) -> list[str]:
    """What differs where it must not: token counts != max_tokens, texts != inproc's."""
    bad = []
    for i, rnd in enumerate(rounds):
        for c, runs in rnd["runs"].items():
            for s, run in runs.items():
                if any(n != max_tokens for n in run["counts"]):
                    bad.append(f"round {i + 1}, c={c}, {s}: token counts {run['counts']}")
                diff = [k for k, (a, b) in enumerate(zip(run["extra"], runs[REF]["extra"])) if a != b]
                if diff:
                    bad.append(f"round {i + 1}, c={c}, {s}: text differs from inproc for prompts {diff}")
    return bad


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        ratio = ("1 (reference)" if r["side"] == REF else
                 f"{r['vs_inproc']:.3f} [{r['vs_inproc_min']:.3f}-{r['vs_inproc_max']:.3f}]")
        out.append([r["concurrency"], r["side"], r["tok_s_median"], ratio, r["ttft_ms_p50_median"]])
    return md_table(["concurrency", "side", "tokens/s (median)", "vs inproc: median [min-max]",
                     "TTFT p50 ms (median)"], out)


# --- inproc: the worker subprocess (stdin line = one run, stdout "ROUND <json>") ---------------
async def _worker(argv: list[str]) -> None:
    from serving_service.engine import VllmEngine, engine_args, engine_device
    from tunewire.cli import build_parser
    from tunewire.cli.serve import CONFIGS, overrides
    from tunewire.config import load_config

    cfg = load_config(CONFIGS["serving"], None, overrides(build_parser().parse_args(argv)))
    device = engine_device()
    VllmEngine(cfg.engine_config(), device=device).prepare()  # as the service: env, LoRA plugin
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(cfg.engine_config(), device)))
    # the SamplingParams serving_service.engine builds for a greedy request with min_tokens
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0,
                            top_p=1.0, top_k=0, output_kind=RequestOutputKind.DELTA)
    ids = itertools.count()

    async def send(prompt: str):
        t = time.perf_counter()
        ttft, n, text = None, 0, []
        async for out in llm.generate(prompt, params, request_id=f"b{next(ids)}"):
            piece = out.outputs[0]
            if ttft is None and piece.token_ids:
                ttft = time.perf_counter() - t
            n += len(piece.token_ids)
            text.append(piece.text)
        return ttft, time.perf_counter() - t, n, "".join(text)

    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            job = json.loads(line)
            res = await run_workload(send, PROMPTS[:job["n"]], job["c"])
            print("ROUND " + json.dumps(res), flush=True)
    finally:
        llm.shutdown()


def _read(proc, prefix: str, log: Path) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise RuntimeError(f"inproc worker exited (rc {proc.wait()}):\n{log.read_text(errors='replace')[-4000:]}")


def _python(profile: str | None) -> list[str]:
    return [sys.executable, "-m", "cProfile", "-o", profile] if profile else [sys.executable]


# --- http: the service's /v1/completions, streamed ---------------------------------------------
def http_sender(client, model: str):
    async def send(prompt: str):
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t = time.perf_counter()
        ttft, n, text = None, 0, []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    raise RuntimeError(f"stream error: {ev['error']}")
                for ch in ev["choices"]:  # one event per engine delta: >= 1 token, maybe no text yet
                    ttft = ttft if ttft is not None else time.perf_counter() - t
                    text.append(ch["text"])
                if ev.get("usage"):
                    n = ev["usage"]["completion_tokens"]
        total = time.perf_counter() - t
        return (ttft if ttft is not None else total), total, n, "".join(text)
    return send


# --- the bench ---------------------------------------------------------------------------------
async def bench(args, worker, address: str, http_url: str, model_name: str) -> list[dict]:
    import httpx

    conc = args.conc
    prompts = PROMPTS[:args.prompts]
    grpc_client = Client(address, MAX_TOKENS)
    http_client = httpx.AsyncClient(base_url=http_url, timeout=600,
                                    limits=httpx.Limits(max_connections=max(conc),
                                                        max_keepalive_connections=max(conc)))

    async def inproc(c: int, n: int) -> dict:
        worker.stdin.write(json.dumps({"c": c, "n": n}) + "\n")
        worker.stdin.flush()
        return json.loads(await asyncio.to_thread(_read, worker, "ROUND ", args.worker_log))

    async def grpc_send(p):
        ttft, total, n, extra = await grpc_client.stream(p, min_tokens=MAX_TOKENS)
        return ttft, total, n, extra["text"]

    http_send = http_sender(http_client, model_name)
    run = {"inproc": inproc,
           "grpc": lambda c, n: run_workload(grpc_send, prompts[:n], c),
           "http": lambda c, n: run_workload(http_send, prompts[:n], c)}
    rounds = []
    try:
        t = time.monotonic()
        for c in conc:                  # warm-up: every side at every concurrency
            for s in SIDES:
                await run[s](c, min(args.prompts, max(c, 2)))
        print(f"warm-up {time.monotonic() - t:.0f} s", flush=True)
        for r in range(args.rounds):
            order = rotation(SIDES, r)
            runs = {str(c): {s: await run[s](c, args.prompts) for s in order} for c in conc}
            rounds.append({"order": order, "runs": runs})
            print(f"round {r + 1} ({','.join(order)}): " + "  ".join(
                f"c={c} " + " ".join(f"{s} {tok_s(runs[str(c)][s]):.1f}" for s in SIDES)
                for c in conc) + " tok/s", flush=True)
    finally:
        await grpc_client.channel.close()
        await http_client.aclose()
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds")
    ap.add_argument("--prompts", type=int, default=8, help=f"requests per run (<= {len(PROMPTS)})")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated, each run in every round")
    ap.add_argument("--model", default="", help="HF model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=str(OUT_DIR / "serving_frontends.json"), help="JSON results")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return asyncio.run(_worker(args.worker))
    args.conc = [int(c) for c in args.concurrency.split(",") if c]
    if not 1 <= args.prompts <= len(PROMPTS) or args.rounds < 1 or not args.conc:
        ap.error(f"--prompts in [1, {len(PROMPTS)}], --rounds >= 1, --concurrency non-empty")
    if not args.model:
        from tunewire.models import ensure_default_base_model

        args.model = str(ensure_default_base_model(progress=print))
    cond = conditions()
    print(f"conditions: {cond}", flush=True)
    t_all = time.monotonic()
    if prof := os.environ.get(PROFILE_ENV):
        Path(prof).mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(ENGINE["kv_cache_gib"]))
    with tempfile.TemporaryDirectory(prefix="tw-bench-frontends-") as tmp:
        port, http_port = free_port(), free_port()
        (store := Path(tmp) / "store").mkdir()
        argv = serve_argv(argparse.Namespace(model=args.model, **ENGINE), store, port, free_port())
        args.worker_log, server_log = Path(tmp) / "inproc.log", Path(tmp) / "serving.log"
        # both engines start at once (they share the cores only while starting)
        with open(args.worker_log, "w") as wlog:
            worker = subprocess.Popen(
                [*_python(prof and f"{prof}/inproc.prof"), __file__, "--worker", *argv], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=wlog, text=True, cwd=ROOT)
        with open(server_log, "wb") as slog:
            server = subprocess.Popen(
                [*_python(prof and f"{prof}/serving.prof"), "-m", "tunewire.cli", *argv,
                 "--http-port", str(http_port)], env=env, stdout=slog, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            t = time.monotonic()
            wait_serving(server, f"127.0.0.1:{port}", server_log, args.start_timeout)
            _read(worker, "READY", args.worker_log)
            print(f"both engines up after {time.monotonic() - t:.0f} s", flush=True)
            rounds = asyncio.run(bench(args, worker, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}",
                                       os.path.basename(os.path.normpath(args.model))))
        finally:
            worker.stdin.close()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
            stop_server(server)
    rows = summarize(rounds, args.conc)
    bad = check_outputs(rounds, MAX_TOKENS)
    cond.update(loadavg_at_end=os.getloadavg(), total_s=time.monotonic() - t_all)
    print(f"\n{table(rows)}\n\n({args.rounds} rounds x {args.prompts} prompts x {MAX_TOKENS} tokens, "
          f"greedy; total {cond['total_s']:.0f} s)")
    print("outputs: " + ("; ".join(bad) if bad else f"as expected (every request {MAX_TOKENS} tokens, "
                         "texts equal to inproc's)"))
    for run in (run for rnd in rounds for runs in rnd["runs"].values() for run in runs.values()):
        del run["extra"]                # the JSON keeps numbers, not texts
    data = {"command": "python " + " ".join(sys.argv), "conditions": cond, "model": args.model,
            "max_tokens": MAX_TOKENS, "prompts": args.prompts, "rounds_n": args.rounds,
            "concurrency": args.conc, "engine": ENGINE, "target_ratio": 0.95, "outputs_ok": not bad,
            "output_problems": bad, "rows": rows, "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
