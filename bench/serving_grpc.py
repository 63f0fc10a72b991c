"""The gRPC side of bench/serving.py: `tunewire serve serving` as a subprocess, and a client.

    proc, address, metrics_url = start_server(args, store, log_path)
    wait_serving(proc, address, log_path, timeout=400)
    ttft_s, latency_s, tokens, extra = await Client(address, max_tokens=32).stream(prompt)
    stop_server(proc)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(args, store: Path, port: int, metrics_port: int) -> list[str]:
    """`tunewire` arguments (`serve serving ...`) of the bench's service: args.model, the LoRA
    limits, max_model_len, max_num_seqs, kv_cache_gib, enforce_eager. bench/serving_frontends.py
    parses the same list with tunewire's own parser to build its in-process engine's settings."""
    argv = ["serve", "serving", "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--model", args.model,
            "--adapter-store", str(store), "--max-loras", str(args.max_loras),
            "--max-cpu-loras", str(args.max_cpu_loras), "--max-model-len", str(args.max_model_len),
            "--max-queued-requests", "1024", "--max-num-seqs", str(args.max_num_seqs),
            "--kv-cache-gib", str(args.kv_cache_gib)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    return argv


def start_server(args, store: Path, log_path: Path):
    """(process, gRPC address, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "tunewire.cli", *serve_argv(args, store, port, metrics_port)]
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
