"""The trainer service process: job store + scheduler + gRPC servicers (+ health, reflection,
metrics), and the gRPC handoff client to serving.

    tunewire serve trainer [--config configs/trainer.example.toml] [--port 50051]
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import grpc

from trainer_service.config import TrainerConfig
from trainer_service.jobs import HandoffError, JobService
from trainer_service.launcher import LocalLauncher
from trainer_service.servicer import TrainerServicer, WorkerServicer
from trainer_service.store import JobStore
from tunewire.grpc_util import error_info, run_server
from tunewire.logs import setup_logging
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2, trainer_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tunewire.trainer")


class ServingHandoff:
    """Hands a published adapter to serving with `ServingService.LoadAdapter`."""

    def __init__(self, address: str, timeout: float):
        self.address, self.timeout = address, timeout

    async def load_adapter(self, *, name: str, version: str, uri: str, manifest_sha256: str) -> str:
        """LoadAdapter on every serving replica: the alias flip is per replica, so all of them
        must hear of the new version (a headless Service name resolves to every pod)."""
        targets = await asyncio.to_thread(serving_endpoints, self.address)
        results = await asyncio.gather(*(self._load_one(t, name=name, version=version, uri=uri,
                                                        manifest_sha256=manifest_sha256) for t in targets),
                                       return_exceptions=True)
        failed = [f"{t}: {r}" for t, r in zip(targets, results) if isinstance(r, Exception)]
        if failed:
            raise HandoffError(f"{len(failed)} of {len(targets)} serving replicas refused: " + "; ".join(failed))
        a = results[0]
        where = f" on {len(targets)} replicas" if len(targets) > 1 else ""
        return f"serving loaded {a.name}@{a.version} (rank {a.rank}){where} in {a.load_ms:.0f} ms"

    async def _load_one(self, target: str, **request):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = serving_pb2_grpc.ServingServiceStub(channel)
            try:
                resp = await stub.LoadAdapter(serving_pb2.LoadAdapterRequest(**request),
                                              timeout=self.timeout, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                reason, _ = error_info(e)
                raise HandoffError(f"{e.code().name} {reason}: {e.details()}".strip()) from e
        return resp.adapter

    async def generate(self, *, adapter: str, prompt: str, messages: list[dict], max_tokens: int) -> str:
        async with grpc.aio.insecure_channel(self.address) as channel:
            try:
                resp = await serving_pb2_grpc.ServingServiceStub(channel).Generate(serving_pb2.GenerateRequest(
                    adapter=adapter, prompt=prompt,
                    messages=[serving_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                    sampling=serving_pb2.SamplingParams(max_tokens=max_tokens)), timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                raise HandoffError(f"{e.code().name}: {e.details()}") from e
        return resp.text


def serving_endpoints(address: str) -> list[str]:
    """'host:port' → 'ip:port' for every IPv4 address the host resolves to (IPv6 if none): a
    Kubernetes headless Service name resolves to every serving pod. Unresolvable → as given."""
    host, _, port = address.rpartition(":")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), family, socket.SOCK_STREAM)
        except (socket.gaierror, ValueError):
            continue
        ips = sorted({i[4][0] for i in infos})
        if ips:
            return [f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}" for ip in ips]
    return [address]


async def serve(cfg: TrainerConfig) -> None:
    store = JobStore(cfg.db_path)
    handoff = ServingHandoff(cfg.serving_address, cfg.handoff_timeout_seconds) if cfg.serving_address else None
    holder: dict[str, JobService] = {}

    def add(server: grpc.aio.Server, port: int):
        # Workers report to the bound port (known only after binding when cfg.port is 0).
        jobs = JobService(store, LocalLauncher(threads=cfg.worker_threads),
                          data_dir=Path(cfg.data_dir), adapter_store=Path(cfg.adapter_store),
                          data_root=Path(cfg.data_root),
                          report_address=f"{cfg.host}:{port}", handoff=handoff,
                          max_concurrent=cfg.max_concurrent_jobs, max_queued=cfg.max_queued_jobs,
                          max_retries=cfg.max_worker_retries, max_upload_bytes=cfg.max_upload_bytes,
                          cancel_grace_seconds=cfg.cancel_grace_seconds)
        holder["jobs"] = jobs
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(jobs), server)
        worker_pb2_grpc.add_TrainerWorkerServiceServicer_to_server(WorkerServicer(jobs), server)
        return [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
                worker_pb2.DESCRIPTOR.services_by_name["TrainerWorkerService"].full_name]

    async def startup():
        await holder["jobs"].start()

    async def drain():
        await holder["jobs"].drain()

    async def shutdown():
        store.close()

    await run_server(name="trainer", host=cfg.host, port=cfg.port, metrics_port=cfg.metrics_port,
                     add_servicers=add, startup=startup, drain=drain, shutdown=shutdown,
                     drain_seconds=cfg.drain_seconds)


def main(cfg: TrainerConfig) -> None:
    setup_logging(cfg.log_level)
    asyncio.run(serve(cfg))
