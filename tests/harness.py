"""Test harness: start tunewire services as real subprocesses on 127.0.0.1 and wait for health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tunewire.status import error_info
from tunewire.trainer.v1 import trainer_pb2 as tpb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str, service: str = "", timeout: float = 2.0):
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


@dataclass
class Service:
    proc: subprocess.Popen
    address: str
    metrics_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.address} not SERVING after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(kind: str, log_dir: Path, *flags: str, env: dict | None = None) -> Service:
    port, metrics_port = free_port(), free_port()
    log_path = Path(log_dir) / f"{kind}-{port}.log"
    if kind == "trainer" and "--model-root" not in flags:
        # test models live under pytest's base temp dir: confine base models to it
        flags = ("--model-root", str(Path(log_dir).resolve().parent), *flags)
    cmd = [sys.executable, "-m", "tunewire.cli", "serve", kind, "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    return Service(proc, f"127.0.0.1:{port}", metrics_port, log_path)


def watch_all(stub, job_id, after_seq=0, timeout=600) -> list:
    """The whole WatchTrainingJob stream of a job, until it ends at a terminal state."""
    return list(stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job_id, after_seq=after_seq),
                                      timeout=timeout))


def states(entries) -> list[str]:
    return [tpb.TrainingJob.State.Name(e.state_change.state)[6:] for e in entries
            if e.WhichOneof("payload") == "state_change"]


def expect_error(fn, code, reason=None):
    """Calls fn, expects a gRPC error with `code` (and ErrorInfo `reason`); returns (reason, fields)."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    got_reason, fields = error_info(e.value)
    if reason:
        assert got_reason == reason, (got_reason, e.value.details())
    return got_reason, fields


def wait_for(stub, job_id, until, timeout=120) -> list:
    """Follows the job's stream until an entry for which `until(entry)` is true; returns the
    entries up to it (the stream is cancelled then). Fails if the stream ends first."""
    seen = []
    stream = stub.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job_id), timeout=timeout)
    try:
        for e in stream:
            seen.append(e)
            if until(e):
                return seen
    finally:
        stream.cancel()
    raise AssertionError(f"the stream of {job_id} ended first: {states(seen)}")


def is_metric(step: int):
    return lambda e: e.WhichOneof("payload") == "metric" and e.metric.step >= step


def worker_pids(entries) -> list[int]:
    return [int(e.event.data["pid"]) for e in entries if e.WhichOneof("payload") == "event"
            and e.event.type == tpb.JobEvent.TYPE_WORKER_STARTED]
