"""Test harness: start tunewire services as real subprocesses on 127.0.0.1 and wait for health;
`Serving`, a serving subprocess (tiny model, small limits) with a store to publish adapters into."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tunewire import adapters
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc
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

    @property
    def http_port(self) -> int:
        """The --http-port it was started with (0: no HTTP API)."""
        args = self.proc.args
        return int(args[args.index("--http-port") + 1]) if "--http-port" in args else 0

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


def scrape_metrics(metrics_port: int) -> dict[str, float]:
    """A service's /metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def series(name: str, **labels: str) -> str:
    """The scrape_metrics key of one series: prometheus_client writes the labels sorted by name,
    whatever order the metric declares them in."""
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def wait_http_serving(svc: Service, timeout: float, each=None) -> list[int]:
    """Polls serving's HTTP /health until 200; returns every status it answered (503 while the
    engine starts). `each(status)`, if given, runs after each answer."""
    import httpx

    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"service exited with {svc.proc.returncode}:\n{svc.log()[-4000:]}")
        try:
            seen.append(httpx.get(f"http://127.0.0.1:{svc.http_port}/health", timeout=2).status_code)
        except httpx.TransportError:  # not listening yet
            time.sleep(0.05)
            continue
        if each:
            each(seen[-1])
        if seen[-1] == 200:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"HTTP /health not 200 after {timeout}s ({seen[-5:]}):\n{svc.log()[-4000:]}")


class Serving:
    """A serving subprocess with small limits: 3 resident adapters, 4 requests running and 4
    queued, 3 adapters with their own metric label; `flags` add to (or override) them."""

    def __init__(self, tmp: Path, model: Path, *flags: str):
        self.tmp, self.model, self.store = tmp, model, tmp / "adapters"
        self.store.mkdir()
        self.svc = start_service(
            "serving", tmp, "--model", str(model), "--adapter-store", str(self.store),
            "--max-model-len", "512", "--enforce-eager", "--max-loras", "2", "--max-cpu-loras", "3",
            "--max-concurrent-requests", "4", "--max-queued-requests", "4",
            "--schema-compile-timeout-s", "0.5", "--metrics-top-adapters", "3", "--drain-seconds", "1",
            *flags)
        self.svc.wait_serving(300)
        if self.svc.http_port:  # it follows gRPC's health a moment later
            wait_http_serving(self.svc, 30)
        self.channel = grpc.insecure_channel(self.svc.address)
        self.stub = serving_pb2_grpc.ServingServiceStub(self.channel)
        self._n = 0

    def publish(self, name: str, *, r: int = 8, targets=("q_proj", "v_proj"), seed: int = 0, **lora) -> Path:
        """A random (non-zero) peft LoRA adapter published as the next version of `name`."""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self._n += 1
        src = self.tmp / f"src-{name}-{self._n}"
        torch.manual_seed(seed)
        get_peft_model(AutoModelForCausalLM.from_pretrained(self.model),
                       LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                  init_lora_weights=False, **lora)).save_pretrained(src)
        dest, _ = adapters.publish(src, self.store, name, base_model_dir=self.model)
        return dest

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.svc.metrics_port)

    def unfinished(self) -> float:
        return self.metrics()["tunewire_serving_engine_unfinished_requests"]

    def wait_engine_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.unfinished() == 0, "the engine kept a request after abort/deadline"

    def adapters(self, **kw) -> dict[str, spb.Adapter]:
        return {f"{a.name}@{a.version}": a for a in self.stub.ListAdapters(
            spb.ListAdaptersRequest(**kw)).adapters}

    @classmethod
    def for_module(cls, tmp_path_factory, model_dir, name: str, *flags: str):
        """A module fixture's body: the service while the module's tests run, then stopped."""
        s = cls(tmp_path_factory.mktemp(name), Path(model_dir), *flags)
        yield s
        s.channel.close()
        s.svc.stop()


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
