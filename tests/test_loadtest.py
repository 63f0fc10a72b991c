"""The load tester's report math (exact percentiles, histograms, error grouping, JSON), the mix
parser, and run_load against in-process fake services (closed and open loop, trainer target).

In the closed-loop runs time is virtual (10 ms per answer, `VirtualClock`), so how many requests
they send follows from counting, never from how fast this machine happens to be.
"""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tunewire import loadtest as lt
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc


def test_percentile_is_nearest_rank_over_every_sample():
    s = [float(i) for i in range(1, 101)]  # 1..100
    assert [lt.percentile(s, q) for q in (50, 90, 95, 99, 100)] == [50, 90, 95, 99, 100]
    assert lt.percentile([7.0], 99) == 7.0 and lt.percentile([], 50) == 0.0
    assert lt.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and lt.percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert lt.percentile([1.0, 2.0, 3.0], 0) == 1.0
    # against the definition, on random data: the smallest x with >= q% of samples <= x
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 999):
        vals = sorted(rng.random() for _ in range(n))
        for q in (50, 90, 95, 99):
            x = lt.percentile(vals, q)
            assert x in vals and sum(v <= x for v in vals) >= q / 100 * n
            assert all(sum(v <= y for v in vals) < q / 100 * n for y in vals if y < x)


def test_latency_summary_in_ms():
    lat = lt.latency_summary([0.004, 0.001, 0.002, 0.003])
    assert list(lat) == ["min", "mean", "p50", "p90", "p95", "p99", "max"]
    assert lat == pytest.approx({"min": 1, "mean": 2.5, "p50": 2, "p90": 4, "p95": 4, "p99": 4, "max": 4})
    assert lt.latency_summary([]) == {}


def _samples():
    S = lt.Sample
    return ([S("base", 0.010, tokens=8)] * 6 + [S("json", 0.020, tokens=5, valid=True)] * 2
            + [S("json", 0.030, tokens=16, valid=False)]
            + [S("adapter", 0.001, "RESOURCE_EXHAUSTED", "QUEUE_FULL", "queue full")] * 3
            + [S("adapter", 0.002, "NOT_FOUND", "ADAPTER_NOT_FOUND", "no such adapter: x")])


def test_build_report_counts_histogram_errors_and_kinds():
    r = lt.build_report(_samples(), 2.0, concurrency=6, mix={"base": 2, "adapter": 1, "json": 1})
    assert (r.count, r.ok, r.rps) == (13, 9, 6.5)
    assert r.status == {"OK": 9, "RESOURCE_EXHAUSTED": 3, "NOT_FOUND": 1}
    assert list(r.status) == ["OK", "RESOURCE_EXHAUSTED", "NOT_FOUND"]  # OK first, then most frequent
    assert r.errors == [
        {"code": "RESOURCE_EXHAUSTED", "reason": "QUEUE_FULL", "count": 3, "message": "queue full"},
        {"code": "NOT_FOUND", "reason": "ADAPTER_NOT_FOUND", "count": 1, "message": "no such adapter: x"}]
    assert r.tokens == 6 * 8 + 2 * 5 + 16 and r.tokens_per_s == r.tokens / 2
    assert (r.json_ok, r.json_valid) == (3, 2)
    assert r.kinds["adapter"] == {"count": 4, "ok": 0, "p50_ms": pytest.approx(1), "p99_ms": pytest.approx(2)}
    assert r.kinds["json"]["p99_ms"] == pytest.approx(30)
    assert r.latency_ms["min"] == pytest.approx(1) and r.latency_ms["max"] == pytest.approx(30)
    assert r.latency_ms["p50"] == pytest.approx(10)  # 7th of 13 sorted samples
    d = json.loads(json.dumps(r.to_dict()))
    assert d["status"] == r.status and d["latency_ms"]["p99"] == pytest.approx(30)
    text = r.text()
    for needle in ("Count:         13", "Requests/sec:  6.50", "[OK]", "9 responses",
                   "[3]  RESOURCE_EXHAUSTED QUEUE_FULL: queue full", "JSON valid:    2/3",
                   "mix base=2,adapter=1,json=1", "p99"):
        assert needle in text, (needle, text)


def test_empty_report():
    r = lt.build_report([], 1.0)
    assert (r.count, r.rps, r.latency_ms, r.status, r.errors) == (0, 0.0, {}, {}, [])
    assert "Count:         0" in r.text()


def test_parse_mix():
    assert lt.parse_mix("base=2,adapter=1, json=0.5") == {"base": 2, "adapter": 1, "json": 0.5}
    assert lt.parse_mix("base") == {"base": 1}
    assert lt.parse_mix("get=3,list=1", lt.TRAINER_KINDS) == {"get": 3, "list": 1}
    for bad in ("bogus=1", "base=-1", "base=0", "base=nan", "", "base=x"):
        with pytest.raises(ValueError):
            lt.parse_mix(bad)


# -- run_load against in-process fakes --------------------------------------------------------------------
class VirtualClock:
    """Stands in for loadtest's perf_counter: time moves 10 ms per answer a fake server gives,
    so how many requests a closed loop of `duration` sends is fixed by counting, not by timing."""

    def __init__(self):
        self.answers = 0

    def __call__(self) -> float:
        return self.answers / 100

    def answer(self) -> None:
        self.answers += 1


class FakeServing(serving_pb2_grpc.ServingServiceServicer):
    """Holds the first `wave` requests until all of them are in flight (so the closed loop's
    concurrency shows), then answers each at once; every request for adapter "full" is refused
    like a full admission queue."""

    def __init__(self, clock: VirtualClock | None, wave: int = 0):
        self.seen, self.clock, self.wave = [], clock, wave
        self.wave_in = asyncio.Event()

    async def Generate(self, request, context):
        self.seen.append(request)
        if len(self.seen) >= self.wave:
            self.wave_in.set()
        await self.wave_in.wait()
        if self.clock:
            self.clock.answer()
        if request.adapter == "full":
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="tunewire"))
            st = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="queue full",
                                   details=[info])
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                                trailing_metadata=(("grpc-status-details-bin", st.SerializeToString()),))
        json_kind = request.response_format.WhichOneof("format") == "json_schema"
        return spb.GenerateResponse(text="{}", completion_tokens=4, structured_output_valid=json_kind)


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, clock: VirtualClock | None):
        self.clock, self.calls = clock, 0

    def _tick(self):
        self.calls += 1
        if self.clock:
            self.clock.answer()

    async def ListTrainingJobs(self, request, context):
        self._tick()
        return tpb.ListTrainingJobsResponse(training_jobs=[tpb.TrainingJob(id="a"), tpb.TrainingJob(id="b")])

    async def GetTrainingJob(self, request, context):
        self._tick()
        return tpb.GetTrainingJobResponse(training_job=tpb.TrainingJob(id=request.name))


async def _with_server(fn, clock=None, wave=0):
    server = grpc.aio.server()
    serving, trainer = FakeServing(clock, wave), FakeTrainer(clock)
    serving_pb2_grpc.add_ServingServiceServicer_to_server(serving, server)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await fn(f"127.0.0.1:{port}"), serving, trainer
    finally:
        await server.stop(None)


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    c = VirtualClock()
    monkeypatch.setattr(lt, "perf_counter", c)
    return c


def test_run_load_closed_loop_mix_and_errors(clock):
    report, serving, _ = asyncio.run(_with_server(lambda addr: lt.run_load(
        addr, concurrency=4, duration=0.5, mix={"base": 2, "adapter": 1, "json": 1}, adapters=["ok-a", "full"],
        max_tokens=7), clock, wave=4))  # the first 4 requests are answered only once all 4 are in
    # 0.5 s of virtual time = 50 answers; the other 3 workers each have at most one request out then
    assert report.mode == "concurrency" and report.count == len(serving.seen) and 50 <= report.count <= 53
    assert set(report.kinds) == {"base", "adapter", "json"}
    full = sum(r.adapter == "full" for r in serving.seen)
    assert full > 0 and report.status["RESOURCE_EXHAUSTED"] == full and report.ok == report.count - full
    assert report.errors[0]["reason"] == "QUEUE_FULL" and report.errors[0]["message"] == "queue full"
    assert report.json_ok == report.json_valid == report.kinds["json"]["ok"] > 0
    assert report.tokens == 4 * report.ok and all(r.sampling.max_tokens == 7 for r in serving.seen)
    assert report.latency_ms["min"] >= 10 and report.duration_s == report.count / 100


def test_run_load_open_loop_rate():
    report, _, _ = asyncio.run(_with_server(lambda addr: lt.run_load(addr, rps=40, duration=0.5)))
    assert report.mode == "rps" and report.count == 20 and report.ok == 20  # due at 0, 1/40, ..., 19/40 s
    assert report.kinds == {"base": report.kinds["base"]} and report.rps_target == 40


def test_run_load_trainer_reads(clock):
    report, _, trainer = asyncio.run(_with_server(lambda addr: lt.run_load(
        addr, target="trainer", concurrency=2, duration=0.3, mix={"get": 3, "list": 1}), clock))
    # the first answer (the job list that `get` draws from) is not part of the load
    assert report.target == "trainer" and report.ok == report.count == trainer.calls - 1
    assert 30 <= report.count <= 31 and set(report.kinds) == {"get", "list"}  # 0.3 s, 2 workers


def test_run_load_rejects_bad_arguments():
    for kw in ({"mix": {"adapter": 1}}, {"mix": {"get": 1}}, {"target": "nope"}, {"duration": 0}):
        with pytest.raises(ValueError):
            asyncio.run(lt.run_load("127.0.0.1:1", **kw))
