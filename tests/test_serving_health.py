"""Serving's health tells the truth: it answers at once throughout start-up, turns NOT_SERVING
when the vLLM engine dies, and the process then exits EXIT_DIED (3) so that Kubernetes restarts it.

Slow (real `tunewire serve serving` processes, tiny model, vLLM on CPU):
- Health.Check with a 100 ms deadline every ~50 ms, from the moment the port accepts
  connections until SERVING: every call answers (nothing blocks the event loop while the engine
  starts);
- kill -9 of the engine core process while a StreamGenerate is in flight: health NOT_SERVING
  within 1 s on the main port and the health port (and 503 on the HTTP API's /health), the
  stream ends UNAVAILABLE ENGINE_DEAD, a new Generate during the drain is UNAVAILABLE
  ENGINE_DEAD (HTTP: 503 ENGINE_DEAD), and the process exits 3.
Fast: the death watcher on a stand-in for AsyncLLM (a real child process as its engine core),
ENGINE_DEAD vs ENGINE_NOT_READY in the generator, and run_server's `watch` on a real gRPC server.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m pytest tests/test_serving_health.py -q
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import expect_error, free_port, health_status, start_service
from serving_service.engine import EngineConfig, EngineDead, VllmEngine
from serving_service.generation import Generator, GenerationRequest
from test_serving import LONG, LONG_TOKENS
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.grpc_util import EXIT_DIED, run_server
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc
from tunewire.status import error_info

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PROBE_DEADLINE_S = 0.1  # the bound on a health answer during start-up


def start_serving(tmp, model, *flags):
    return start_service("serving", tmp, "--model", str(model), "--adapter-store", str(tmp / "adapters"),
                         "--max-model-len", "512", "--enforce-eager", *flags)


def wait_port(address: str, proc, timeout: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the service exited with {proc.returncode}"
        try:
            socket.create_connection((host, int(port)), timeout=0.05).close()
            return
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(f"{address} never accepted a connection")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_health_answers_within_100ms_throughout_start_up(tmp_path, tiny_model_dir):
    svc = start_serving(tmp_path, tiny_model_dir)
    try:
        wait_port(svc.address, svc.proc, 120)
        opened = time.monotonic()
        answers, late = [], []
        with grpc.insecure_channel(svc.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            status = NOT_SERVING
            while status != SERVING:
                assert time.monotonic() - opened < 400, svc.log()[-3000:]
                t = time.monotonic()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_DEADLINE_S).status
                    answers.append(time.monotonic() - t)
                except grpc.RpcError as e:
                    late.append((round(t - opened, 2), e.code().name))
                time.sleep(0.05)
        slowest = max(answers)
        summary = (f"{len(answers)} answers over {time.monotonic() - opened:.1f} s of start-up, slowest "
                   f"{1000 * slowest:.1f} ms, median {1000 * sorted(answers)[len(answers) // 2]:.1f} ms")
        print(summary)
        assert not late, f"{len(late)} checks got no answer within 100 ms (s after the port opened, " \
                         f"code): {late[:20]}; {summary}"
    finally:
        svc.stop()


def engine_core(pid: int) -> psutil.Process:
    """vLLM's engine core among the server's child processes (vLLM titles it VLLM::EngineCore)."""
    cores = [p for p in psutil.Process(pid).children(recursive=True)
             if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1, [(p.pid, p.name(), p.cmdline()) for p in psutil.Process(pid).children(recursive=True)]
    return cores[0]


def wait_status(address: str, want, within: float, since: float) -> float:
    """Seconds from `since` (time.monotonic) until Health.Check on `address` says `want`; fails
    once `within` seconds have passed since then."""
    while time.monotonic() - since < within:
        try:
            if health_status(address, timeout=0.2) == want:
                return time.monotonic() - since
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{address} not {health_pb2.HealthCheckResponse.ServingStatus.Name(want)} "
                         f"within {within} s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_engine_death_turns_health_not_serving_fails_requests_and_exits_3(tmp_path, tiny_model_dir):
    health_port, http_port = free_port(), free_port()
    http = f"http://127.0.0.1:{http_port}"
    svc = start_serving(tmp_path, tiny_model_dir, "--drain-seconds", "4", "--health-port", str(health_port),
                        "--http-port", str(http_port))
    probe = f"127.0.0.1:{health_port}"
    try:
        svc.wait_serving(300)
        for address in (svc.address, probe):
            assert health_status(address, "tunewire.serving.v1.ServingService") == SERVING
        ch = grpc.insecure_channel(svc.address)
        stub = serving_pb2_grpc.ServingServiceStub(ch)
        stream = stub.StreamGenerate(spb.StreamGenerateRequest(
            prompt="carol", sampling=spb.SamplingParams(max_tokens=LONG_TOKENS), response_format=LONG), timeout=120)
        next(stream)  # in flight: the engine is generating it
        core = engine_core(svc.proc.pid)
        core.kill()
        killed = time.monotonic()
        took = {a: wait_status(a, NOT_SERVING, 1.0, since=killed) for a in (svc.address, probe)}
        for service in ("", "tunewire.serving.v1.ServingService"):
            assert health_status(svc.address, service) == NOT_SERVING
        assert httpx.get(f"{http}/health", timeout=5).status_code == 503  # the HTTP API's too
        with pytest.raises(grpc.RpcError) as e:  # the in-flight stream
            for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert error_info(e.value)[0] == R.ENGINE_DEAD, e.value.details()
        # within the 4 s drain the process still answers: a new request is ENGINE_DEAD, not refused
        assert time.monotonic() - killed < 3 and svc.proc.poll() is None
        expect_error(lambda: stub.Generate(spb.GenerateRequest(
            prompt="dave", sampling=spb.SamplingParams(max_tokens=4)), timeout=10),
            grpc.StatusCode.UNAVAILABLE, R.ENGINE_DEAD)
        r = httpx.post(f"{http}/v1/completions", json={"model": Path(tiny_model_dir).name, "prompt": "dave",
                                                       "max_tokens": 4}, timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (503, R.ENGINE_DEAD), r.text
        ch.close()
        assert svc.proc.wait(120) == EXIT_DIED, svc.log()[-3000:]
        log = svc.log()
        assert "cannot serve any more" in log and "engine core process exited" in log, log[-3000:]
        print(f"NOT_SERVING after the kill: {', '.join(f'{a} {1000 * t:.0f} ms' for a, t in took.items())}")
    finally:
        svc.stop()


# ---- fast: the watcher and the mappings, with vLLM stood in for at its edge ----

def _sleep_forever():
    time.sleep(600)


def fake_async_llm(process):
    """What VllmEngine reads of AsyncLLM: `errored`, and the engine cores' processes."""
    manager = SimpleNamespace(processes=[process])
    return SimpleNamespace(errored=False, engine_core=SimpleNamespace(resources=SimpleNamespace(
        engine_manager=manager)))


@pytest.mark.timeout(30)
def test_the_death_watcher_sees_the_core_process_exit():
    core = multiprocessing.get_context("spawn").Process(target=_sleep_forever, name="EngineCore_DP0")
    core.start()
    try:
        engine = VllmEngine(EngineConfig(model="/nonexistent"))
        engine._engine = fake_async_llm(core)
        assert engine.ready and engine.death() == ""

        async def kill_then_watch():
            watcher = asyncio.create_task(engine.wait_dead())
            await asyncio.sleep(0.3)
            assert not watcher.done()  # alive: it keeps watching
            core.kill()
            t0 = time.monotonic()
            why = await asyncio.wait_for(watcher, 5)
            return why, time.monotonic() - t0

        why, took = asyncio.run(kill_then_watch())
        assert "engine core process exited" in why and "EngineCore_DP0" in why and took < 0.5, (why, took)
        assert not engine.ready and engine.death() == why
        with pytest.raises(EngineDead):
            engine.tokenizer()
    finally:
        core.kill()
        core.join()


@pytest.mark.timeout(30)
def test_the_death_watcher_sees_vllm_say_errored():
    engine = VllmEngine(EngineConfig(model="/nonexistent"))
    engine._engine = fake_async_llm(multiprocessing.get_context("spawn").Process(target=_sleep_forever))
    engine._engine.engine_core.resources.engine_manager.processes = []  # in-process core
    engine._engine.errored = True
    why = asyncio.run(asyncio.wait_for(engine.wait_dead(), 5))
    assert "EngineDeadError" in why and not engine.ready


@pytest.mark.timeout(30)
def test_generation_says_engine_dead_or_not_ready():
    def generator(**engine) -> Generator:
        return Generator(SimpleNamespace(**engine), registry=None, structured=None, admission=None,
                         default_max_tokens=8, max_model_len=64)

    async def first(gen):
        async for c in gen.stream(GenerationRequest(prompt="x")):
            return c

    cases = [(dict(ready=False, death=lambda: ""), R.ENGINE_NOT_READY),
             (dict(ready=False, death=lambda: "the engine core process exited"), R.ENGINE_DEAD)]
    for engine, reason in cases:
        for call in (lambda g: asyncio.run(first(g)), lambda g: g.tokenize("", "x")):
            with pytest.raises(TunewireError) as e:
                call(generator(**engine))
            assert e.value.reason == reason and e.value.code == "UNAVAILABLE", e.value


@pytest.mark.timeout(30)
def test_run_server_watch_turns_health_not_serving_and_exits_3():
    port, health_port = free_port(), free_port()
    died = asyncio.Event()
    seen: dict[str, list] = {"main": [], "probe": []}

    async def scenario():
        async def watch():
            await died.wait()
            return "the stand-in engine died"

        server = asyncio.create_task(run_server(
            name="t", host="127.0.0.1", port=port, metrics_port=0, add_servicers=lambda s, p: [],
            drain_seconds=1.0, watch=watch, health_port=health_port))

        async def check(address):
            async with grpc.aio.insecure_channel(address) as ch:
                return (await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)).status

        for _ in range(100):
            if await check(f"127.0.0.1:{port}") == SERVING:
                break
            await asyncio.sleep(0.02)
        # the probe port has the main port's edge: bytes that do not parse are a tunewire error
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            raw = ch.unary_unary("/grpc.health.v1.Health/Check")  # no serializers: raw bytes
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await raw(b"\xff\xff\xff", timeout=2)
            seen["undecodable"] = [bad.value.code(), error_info(bad.value)[0]]
        died.set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5 and await check(f"127.0.0.1:{port}") != NOT_SERVING:
            await asyncio.sleep(0.01)
        seen["main"].append(await check(f"127.0.0.1:{port}"))
        seen["probe"].append(await check(f"127.0.0.1:{health_port}"))
        assert not server.done()  # still draining: it answers, NOT_SERVING
        return await asyncio.wait_for(server, 30)

    assert asyncio.run(scenario()) == EXIT_DIED
    assert seen == {"main": [NOT_SERVING], "probe": [NOT_SERVING],
                    "undecodable": [grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_UNDECODABLE"]}
