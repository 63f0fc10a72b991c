"""`tunewire loadtest`: drive the serving endpoint (or the trainer's read RPCs) and print a
ghz-style report.

    tunewire loadtest --concurrency 8 --duration 30 --mix base=2,adapter=1,json=1 --adapter extract
    tunewire loadtest --rps 20 --duration 10 --max-tokens 16 --json report.json     # open loop
    tunewire loadtest --target trainer --concurrency 16 --duration 10 --mix get=3,list=1

Closed loop (`--concurrency N`): N workers, each sends its next request as soon as the last one
returned. Open loop (`--rps R`): request i is due at start + i/R whatever happened before, and its
latency counts from that due time, so a slow server cannot hide its queueing (no coordinated
omission); `--concurrency` then only caps the requests in flight (default 1000). Requests still
in flight when `--duration` ends are awaited and counted. One grpc.aio channel; latency by
time.perf_counter; percentiles are exact (nearest rank over every sample). Failed calls are
grouped by status code and google.rpc.ErrorInfo reason.

Kinds of request: serving `base` (the base model), `adapter` (one of `--adapter NAME`, at random),
`json` (a JSON-schema constrained request, `--json-schema FILE` or a small built-in schema);
trainer `get` (GetTrainingJob of a job listed at start) and `list` (ListTrainingJobs).

From Python (tests, bench scripts):
    report = await run_load("127.0.0.1:50052", concurrency=8, duration=10,
                            mix={"base": 2, "adapter": 1}, adapters=["extract"])
    print(report.text()); json.dumps(report.to_dict())
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import asdict, dataclass, field
from time import perf_counter

import grpc

SERVING_KINDS = ("base", "adapter", "json")
TRAINER_KINDS = ("get", "list")
PERCENTILES = (50, 90, 95, 99)
DEFAULT_PROMPT = "Extract the person as JSON with keys name, age, city.\nText: Ana Silva, 31, lives in Braga.\nJSON:\n"
DEFAULT_SCHEMA = json.dumps({"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}}, "required": ["name", "age"]})


@dataclass
class Sample:
    """One finished call."""
    kind: str
    latency_s: float
    code: str = "OK"
    reason: str = ""
    message: str = ""
    tokens: int = 0
    valid: bool | None = None  # json kind: structured_output_valid


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest sample with at least q% of all samples at or below it."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    """min, mean, p50/p90/p95/p99, max in milliseconds (empty dict without samples)."""
    s = sorted(latencies_s)
    if not s:
        return {}
    out = {"min": s[0], "mean": math.fsum(s) / len(s)}
    out.update({f"p{q}": percentile(s, q) for q in PERCENTILES})
    out["max"] = s[-1]
    return {k: v * 1e3 for k, v in out.items()}


@dataclass
class Report:
    target: str
    mode: str                 # "concurrency" (closed loop) or "rps" (open loop)
    concurrency: int
    rps_target: float
    duration_s: float         # first send to last answer
    count: int
    ok: int
    rps: float                # count / duration_s
    latency_ms: dict[str, float]
    status: dict[str, int]    # status code name -> calls, most frequent first
    errors: list[dict]        # {code, reason, count, message (the first one seen)}
    kinds: dict[str, dict]    # per kind: count, ok, p50_ms, p99_ms
    tokens: int = 0           # completion tokens of successful serving calls
    tokens_per_s: float = 0.0
    json_valid: int = 0       # successful json calls whose output matched the schema
    json_ok: int = 0
    mix: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        load = f"concurrency {self.concurrency}" if self.mode == "concurrency" else \
            f"{self.rps_target:g} rps open loop" + (f", at most {self.concurrency} in flight" if self.concurrency else "")
        mix = ",".join(f"{k}={v:g}" for k, v in self.mix.items())
        lines = ["", "Summary:", f"  Target:        {self.target} ({load}; mix {mix})",
                 f"  Count:         {self.count}", f"  Total:         {self.duration_s:.2f} s",
                 f"  Requests/sec:  {self.rps:.2f}"]
        if self.target == "serving":
            lines.append(f"  Tokens/sec:    {self.tokens_per_s:.1f}  ({self.tokens} completion tokens)")
            if self.json_ok:
                lines.append(f"  JSON valid:    {self.json_valid}/{self.json_ok}")
        if self.latency_ms:
            lines += ["", "Latency (ms):", "  " + "".join(f"{k:>10}" for k in self.latency_ms),
                      "  " + "".join(f"{v:>10.1f}" for v in self.latency_ms.values())]
        lines += ["", "Status code distribution:"]
        lines += [f"  [{code}]{' ' * max(1, 20 - len(code))}{n} responses" for code, n in self.status.items()]
        if self.errors:
            lines += ["", "Error distribution:"]
            lines += [f"  [{e['count']}]  {e['code']} {e['reason'] or '-'}: {e['message']}" for e in self.errors]
        lines += ["", "By kind:"]
        lines += [f"  {k:<8} count {v['count']:<7} errors {v['count'] - v['ok']:<6} p50 {v['p50_ms']:.1f} ms"
                  f"  p99 {v['p99_ms']:.1f} ms" for k, v in self.kinds.items()]
        return "\n".join(lines) + "\n"


def build_report(samples: list[Sample], duration_s: float, *, target: str = "serving", mode: str = "concurrency",
                 concurrency: int = 0, rps_target: float = 0.0, mix: dict[str, float] | None = None) -> Report:
    status: dict[str, int] = {}
    errors: dict[tuple[str, str], dict] = {}
    kinds: dict[str, list[Sample]] = {}
    for s in samples:
        status[s.code] = status.get(s.code, 0) + 1
        kinds.setdefault(s.kind, []).append(s)
        if s.code != "OK":
            e = errors.setdefault((s.code, s.reason), {"code": s.code, "reason": s.reason, "count": 0,
                                                       "message": s.message})
            e["count"] += 1
    ok = [s for s in samples if s.code == "OK"]
    tokens = sum(s.tokens for s in ok)
    per_kind = {}
    for k, ss in kinds.items():
        lat = latency_summary([s.latency_s for s in ss])
        per_kind[k] = {"count": len(ss), "ok": sum(s.code == "OK" for s in ss),
                       "p50_ms": lat["p50"], "p99_ms": lat["p99"]}
    return Report(
        target=target, mode=mode, concurrency=concurrency, rps_target=rps_target, duration_s=duration_s,
        count=len(samples), ok=len(ok), rps=len(samples) / duration_s if duration_s > 0 else 0.0,
        latency_ms=latency_summary([s.latency_s for s in samples]),
        status=dict(sorted(status.items(), key=lambda kv: (kv[0] != "OK", -kv[1], kv[0]))),
        errors=sorted(errors.values(), key=lambda e: (-e["count"], e["code"], e["reason"])),
        kinds=per_kind, tokens=tokens, tokens_per_s=tokens / duration_s if duration_s > 0 else 0.0,
        json_valid=sum(bool(s.valid) for s in ok if s.kind == "json"),
        json_ok=sum(s.kind == "json" for s in ok), mix=dict(mix or {}))


def parse_mix(text: str, kinds: tuple[str, ...] = SERVING_KINDS) -> dict[str, float]:
    """"base=2,adapter=1,json=1" -> {"base": 2.0, ...}; a bare name weighs 1."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if name not in kinds:
            raise ValueError(f"unknown request kind {name!r} in the mix (one of {', '.join(kinds)})")
        w = float(weight) if sep else 1.0
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"bad weight for {name}: {weight!r}")
        mix[name] = w
    if not any(mix.values()):
        raise ValueError("the mix needs at least one positive weight")
    return mix


async def _serving_caller(ch, *, adapters, prompt, max_tokens, response_format, json_schema, timeout):
    from tunewire.serving.v1 import serving_pb2 as spb
    from tunewire.serving.v1 import serving_pb2_grpc

    stub = serving_pb2_grpc.ServingServiceStub(ch)
    text = response_format or spb.ResponseFormat(text=spb.TextFormat())
    schema = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json_schema))

    async def call(kind: str, rng: random.Random):
        r = await stub.Generate(spb.GenerateRequest(
            adapter=rng.choice(adapters) if kind == "adapter" else "", prompt=prompt,
            sampling=spb.SamplingParams(max_tokens=max_tokens), response_format=schema if kind == "json" else text),
            timeout=timeout)
        return r.completion_tokens, (r.structured_output_valid if kind == "json" else None)
    return call


async def _trainer_caller(ch, *, timeout):
    from tunewire.trainer.v1 import trainer_pb2 as tpb
    from tunewire.trainer.v1 import trainer_pb2_grpc

    stub = trainer_pb2_grpc.TrainerServiceStub(ch)
    listed = await stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=100), timeout=timeout)
    ids = [j.id for j in listed.training_jobs] or ["loadtest-no-jobs"]  # no jobs: Get is NOT_FOUND

    async def call(kind: str, rng: random.Random):
        if kind == "get":
            await stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=rng.choice(ids)), timeout=timeout)
        else:
            await stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=50), timeout=timeout)
        return 0, None
    return call


async def run_load(address: str, *, target: str = "serving", concurrency: int = 0, rps: float = 0.0,
                   duration: float = 10.0, mix: dict[str, float] | None = None, adapters=(),
                   prompt: str = DEFAULT_PROMPT, max_tokens: int = 16, response_format=None,
                   json_schema: str = DEFAULT_SCHEMA, timeout: float = 60.0, seed: int = 0,
                   progress: bool = False, channel_kwargs: dict | None = None) -> Report:
    """Runs the load for `duration` seconds and returns the report. `response_format` (a
    serving_pb2.ResponseFormat) replaces plain text for the base and adapter kinds;
    `channel_kwargs` go to tunewire.security.channel (TLS, token)."""
    from tunewire.status import error_info
    from tunewire.security import channel

    if target not in ("serving", "trainer"):
        raise ValueError(f"unknown target {target!r}")
    kinds = SERVING_KINDS if target == "serving" else TRAINER_KINDS
    if not mix:
        mix = ({"base": 1.0, "adapter": 1.0} if adapters else {"base": 1.0}) if target == "serving" \
            else {"get": 1.0, "list": 1.0}
    mix = dict(mix)
    if set(mix) - set(kinds) or not any(mix.values()):
        raise ValueError(f"bad mix {mix} for {target} (kinds: {', '.join(kinds)})")
    if mix.get("adapter") and not adapters:
        raise ValueError("the mix has adapter requests: name at least one adapter")
    if rps < 0 or concurrency < 0 or duration <= 0:
        raise ValueError("rps, concurrency and duration must be positive")
    concurrency = concurrency or (0 if rps else 1)
    names, weights = zip(*[(k, w) for k, w in mix.items() if w > 0])
    rng = random.Random(seed)
    samples: list[Sample] = []
    in_flight = 0
    ch = channel(address, **(channel_kwargs or {}))
    try:
        call = await (_serving_caller(ch, adapters=list(adapters), prompt=prompt, max_tokens=max_tokens,
                                      response_format=response_format, json_schema=json_schema, timeout=timeout)
                      if target == "serving" else _trainer_caller(ch, timeout=timeout))

        async def one(due: float) -> None:
            nonlocal in_flight
            kind = rng.choices(names, weights)[0]
            in_flight += 1
            try:
                tokens, valid = await call(kind, rng)
                samples.append(Sample(kind, perf_counter() - due, tokens=tokens, valid=valid))
            except grpc.RpcError as e:
                reason, _ = error_info(e)
                samples.append(Sample(kind, perf_counter() - due, e.code().name, reason, e.details() or ""))
            finally:
                in_flight -= 1

        t0 = perf_counter()
        end = t0 + duration
        ticker = asyncio.create_task(_progress(lambda: (perf_counter() - t0, samples, in_flight), duration)) \
            if progress else None
        if rps:
            slots = asyncio.Semaphore(concurrency or 1000)

            async def limited(due: float) -> None:
                async with slots:  # waiting for a slot counts as latency (measured from `due`)
                    await one(due)

            tasks, i = [], 0
            while (due := t0 + i / rps) < end:
                if (delay := due - perf_counter()) > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(due)))
                i += 1
            await asyncio.gather(*tasks)
        else:
            async def worker() -> None:
                while (now := perf_counter()) < end:
                    await one(now)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = perf_counter() - t0
        if ticker:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
    finally:
        await ch.close()
    return build_report(samples, wall, target=target, mode="rps" if rps else "concurrency",
                        concurrency=concurrency, rps_target=rps, mix=mix)


async def _progress(state, duration: float) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("[bold]load"), BarColumn(), TextColumn("{task.fields[info]}"),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("load", total=duration, info="")
        while True:
            elapsed, samples, in_flight = state()
            errors = sum(s.code != "OK" for s in samples)
            bar.update(task, completed=min(elapsed, duration),
                       info=f"{elapsed:5.1f}/{duration:g} s  {len(samples)} done  {errors} errors  "
                            f"{in_flight} in flight  {len(samples) / max(elapsed, 1e-9):.1f} rps")
            await asyncio.sleep(0.25)
