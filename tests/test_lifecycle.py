"""`tunewire serve` as a process, from start to stop, on services of these tests' own:

- a bad setting, config file or flag exits 2 with a message naming it, before anything listens;
- a port that cannot be bound (gRPC, metrics, health) or an engine that cannot start (no
  weights, truncated weights) exits 1;
- SIGTERM while the engine starts: exit 0, without a drain (nothing was served);
- SIGTERM: health says NOT_SERVING (gRPC and the HTTP API's /health) while the service
  drains, a stream in flight on the HTTP API finishes, then the process exits 0.

    .venv/bin/python -m pytest tests/test_lifecycle.py -q
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from harness import free_port, health_status, start_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def serve(kind: str, *flags: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `tunewire serve KIND` with loopback ports (overridable by later flags) to its end."""
    return subprocess.run([sys.executable, "-m", "tunewire.cli", "serve", kind, "--host", "127.0.0.1",
                           "--port", "0", "--metrics-port", "0", *flags],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def trainer_flags(tmp: Path) -> list[str]:
    return ["--data-dir", str(tmp / "trainer"), "--data-root", str(tmp), "--model-root", str(tmp),
            "--adapter-store", str(tmp / "adapters")]


def start_up_failure(log: str) -> dict:
    """The service's one `start-up failed` log line."""
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{") and "start-up failed" in x]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_bad_settings_exit_2_and_name_the_setting(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('port = "50051"\n')
    for kind, flags, needle in [
        ("trainer", ["--max-concurrent-jobs", "0"], "max_concurrent_jobs and max_queued_jobs must be >= 1"),
        ("trainer", ["--max-loras", "4"], "--max-loras is a setting of the serving service"),
        ("serving", ["--data-root", "x"], "--data-root is a setting of the trainer service"),
        ("serving", [], "model is required"),
        ("trainer", ["--config", str(tmp_path / "missing.toml")], "missing.toml"),
        ("trainer", ["--config", str(bad_toml)], "port must be an integer"),
        ("trainer", ["--port", "x"], "invalid int value"),
    ]:
        done = serve(kind, *flags, cwd=tmp_path)
        assert done.returncode == 2 and needle in done.stderr, (flags, done.stderr[-2000:])
        assert "listening" not in done.stderr


def test_a_port_that_cannot_be_bound_exits_1(tmp_path, tiny_model_dir):
    with socket.socket() as taken:  # listening, without SO_REUSEPORT: nobody else can bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for kind, flags in [
            ("trainer", ["--port", port]),
            ("trainer", ["--metrics-port", port]),
            ("trainer", ["--health-port", port]),
            ("serving", ["--model", str(tiny_model_dir), "--adapter-store", str(tmp_path / "a"), "--port", port]),
            ("serving", ["--model", str(tiny_model_dir), "--adapter-store", str(tmp_path / "a"),
                         "--http-port", port]),
        ]:
            extra = trainer_flags(tmp_path) if kind == "trainer" else []
            done = serve(kind, *extra, *flags, cwd=tmp_path)
            assert done.returncode == 1, (flags, done.stderr[-3000:])
            failure = start_up_failure(done.stderr)
            assert failure["service"] == kind and "address" in failure["msg"].lower(), failure
            assert '"msg": "listening"' not in done.stderr


def test_an_engine_that_cannot_start_exits_1(tmp_path, tiny_model_dir):
    model = tmp_path / "not-a-model"  # a config, but no weights and no tokenizer
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    truncated = tmp_path / "truncated"  # the tiny model with half its weights file: loads fail
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    for bad in (model, truncated):
        done = serve("serving", "--model", str(bad), "--adapter-store", str(tmp_path / "a"),
                     "--enforce-eager", "--max-model-len", "256", cwd=tmp_path, timeout=300)
        assert done.returncode == 1, (bad, done.stderr[-3000:])
        assert "vLLM engine failed to start" in start_up_failure(done.stderr)["msg"]


def test_sigterm_during_start_up_stops_without_a_drain(tmp_path, tiny_model_dir):
    """A stop requested while the engine starts is a stop (exit 0), not a failure; nothing was
    served, so there is no drain to sit through."""
    serving = start_service("serving", tmp_path, "--model", str(tiny_model_dir), "--adapter-store",
                            str(tmp_path / "adapters"), "--max-model-len", "256", "--enforce-eager",
                            "--drain-seconds", "30")
    try:
        deadline = time.monotonic() + 120
        while '"msg": "listening"' not in serving.log():
            assert time.monotonic() < deadline and serving.proc.poll() is None, serving.log()[-3000:]
            time.sleep(0.05)
        assert health_status(serving.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        serving.proc.send_signal(15)
        assert serving.proc.wait(120) == 0, serving.log()[-3000:]
        log = serving.log()
        assert '"drain_seconds": 0.0' in log and '"msg": "serving"' not in log, log[-3000:]
    finally:
        serving.stop()


def test_sigterm_drains_with_health_not_serving(tmp_path, tiny_model_dir):
    http = f"http://127.0.0.1:{free_port()}"
    serving = start_service("serving", tmp_path, "--model", str(tiny_model_dir), "--adapter-store",
                            str(tmp_path / "adapters"), "--max-model-len", "256", "--enforce-eager",
                            "--drain-seconds", "3", "--http-port", http.rsplit(":", 1)[1])
    trainer = start_service("trainer", tmp_path, *trainer_flags(tmp_path), "--drain-seconds", "3")
    try:
        trainer.wait_serving(60)
        serving.wait_serving(300)
        assert httpx.get(f"{http}/health", timeout=5).status_code == 200
        # an HTTP stream in flight when SIGTERM comes: it finishes during the drain
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{http}/v1/completions", json={
                "model": Path(tiny_model_dir).name, "prompt": "x", "max_tokens": 200, "min_tokens": 200,
                "temperature": 0, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            serving.proc.send_signal(15)
            deadline = time.monotonic() + 3  # the drain lasts 3 s: NOT_SERVING shows within it
            while httpx.get(f"{http}/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, serving.log()[-3000:]
            assert health_status(serving.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        last = json.loads(rest[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length", last
        assert serving.proc.wait(120) == 0, serving.log()[-3000:]
        with pytest.raises(httpx.ConnectError):  # stopped with the gRPC server
            httpx.get(f"{http}/health", timeout=5)
        for svc in (trainer,):
            svc.proc.send_signal(15)
            seen = None
            deadline = time.monotonic() + 3  # the drain lasts 3 s: NOT_SERVING shows within it
            while time.monotonic() < deadline:
                try:
                    seen = health_status(svc.address)
                except grpc.RpcError:
                    break
                if seen == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.1)
            assert seen == health_pb2.HealthCheckResponse.NOT_SERVING, svc.log()[-3000:]
            assert svc.proc.wait(120) == 0, svc.log()[-3000:]
    finally:
        serving.stop()
        trainer.stop()

