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
from trainer_service.gpus import gpu_settings
from trainer_service.jobs import JobService
from trainer_service.launcher import LocalLauncher
from trainer_service.publisher import HandoffError
from trainer_service.servicer import TrainerServicer, WorkerServicer
from trainer_service.store import JobStore
from tunewire.grpc_util import ServerInterceptor, run_server
from tunewire.status import error_info
from tunewire.logs import setup_logging
from tunewire.security import ServerSecurity, channel
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2, trainer_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tunewire.trainer")


class ServingHandoff:
    """Hands a published adapter to serving with `ServingService.LoadAdapter`. `tls` holds
    `channel`'s ca_file/cert_file/key_file/token_file (empty = plaintext, no token)."""

    def __init__(self, address: str, timeout: float, **tls: str):
        self.address, self.timeout, self.tls = address, timeout, tls
        # replicas are dialled by IP: the certificate is checked against the Service's name
        self.server_name = address.rpartition(":")[0].strip("[]")

    def _channel(self, target: str) -> grpc.aio.Channel:
        return channel(target, server_name=self.server_name, **self.tls)

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
        async with self._channel(target) as ch:
            stub = serving_pb2_grpc.ServingServiceStub(ch)
            try:
                resp = await stub.LoadAdapter(serving_pb2.LoadAdapterRequest(**request),
                                              timeout=self.timeout, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                reason, _ = error_info(e)
                raise HandoffError(f"{e.code().name} {reason}: {e.details()}".strip()) from e
        return resp.adapter

    async def generate(self, *, adapter: str, prompt: str, messages: list[dict], max_tokens: int) -> str:
        async with self._channel(self.address) as ch:
            try:
                resp = await serving_pb2_grpc.ServingServiceStub(ch).Generate(serving_pb2.GenerateRequest(
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


def k8s_settings(cfg: TrainerConfig):
    """The Kubernetes launcher's settings from the trainer's (job pods mount trainer-data at data_dir)."""
    from trainer_service.k8s_launcher import K8sSettings

    return K8sSettings(namespace=cfg.k8s_namespace, image=cfg.k8s_image, gpus_per_pod=cfg.k8s_gpus_per_pod,
                       gpu_resource=cfg.k8s_gpu_resource, cpu=cfg.k8s_cpu, memory=cfg.k8s_memory,
                       node_selector=dict(s.split("=", 1) for s in cfg.k8s_node_selector),
                       data_mount=cfg.data_dir)


def make_launcher(cfg: TrainerConfig):
    """The configured launcher: local subprocesses, or Kubernetes objects (see k8s_launcher)."""
    if cfg.launcher == "kubernetes":
        from trainer_service.k8s_launcher import KubernetesLauncher

        return KubernetesLauncher(k8s_settings(cfg))
    return LocalLauncher(threads=cfg.worker_threads)


async def serve(cfg: TrainerConfig) -> int:
    store = JobStore(cfg.db_path)
    handoff = ServingHandoff(cfg.serving_address, cfg.handoff_timeout_seconds,
                             ca_file=cfg.serving_tls_ca_file, cert_file=cfg.serving_tls_cert_file,
                             key_file=cfg.serving_tls_key_file,
                             token_file=cfg.serving_token_file) if cfg.serving_address else None
    security = ServerSecurity.from_config(cfg)
    gpus = gpu_settings(cfg)
    log.info("devices", extra={"device": cfg.device, "gpus": ",".join(gpus.pool),
                               "gpus_per_job": cfg.gpus_per_job, "accounting": gpus.accounting})
    holder: dict[str, JobService] = {}
    # With TLS on, workers (local subprocesses) report on a plaintext port bound to loopback
    # that serves only TrainerWorkerService, so they need no CA or client certificate: nothing
    # outside this pod/host can reach it, and each report still carries its per-job token.
    reports = grpc.aio.server(interceptors=[ServerInterceptor()]) if security.tls else None

    def add(server: grpc.aio.Server, port: int):
        # Workers report to the bound port (known only after binding when cfg.port is 0).
        report_address = f"{cfg.host}:{port}"
        if reports:
            # Kubernetes job pods cannot reach loopback: with worker_port set, the report server
            # listens on every interface (a NetworkPolicy admits only job pods to it).
            bind = f"{cfg.host}:{cfg.worker_port}" if cfg.worker_port else "127.0.0.1:0"
            report_address = f"127.0.0.1:{reports.add_insecure_port(bind)}"
        # Where workers dial: this host for local subprocesses; the trainer's Service for pods.
        report_address = cfg.worker_report_address or report_address
        log.info("worker reports", extra={"report_address": report_address})
        jobs = JobService(store, make_launcher(cfg),
                          data_dir=Path(cfg.data_dir), adapter_store=Path(cfg.adapter_store),
                          data_root=Path(cfg.data_root), model_root=Path(cfg.model_root),
                          report_address=report_address, handoff=handoff,
                          max_concurrent=cfg.max_concurrent_jobs, max_queued=cfg.max_queued_jobs,
                          max_retries=cfg.max_worker_retries, max_upload_bytes=cfg.max_upload_bytes,
                          max_dataset_bytes=cfg.max_dataset_bytes,
                          cancel_grace_seconds=cfg.cancel_grace_seconds, gpus=gpus)
        holder["jobs"] = jobs
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(jobs), server)
        worker_pb2_grpc.add_TrainerWorkerServiceServicer_to_server(WorkerServicer(jobs.scheduler), server)
        if reports:
            worker_pb2_grpc.add_TrainerWorkerServiceServicer_to_server(WorkerServicer(jobs.scheduler),
                                                                       reports)
        return [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
                worker_pb2.DESCRIPTOR.services_by_name["TrainerWorkerService"].full_name]

    async def startup():
        if reports:
            await reports.start()
        await holder["jobs"].start()

    async def drain():
        await holder["jobs"].drain()

    async def shutdown():
        if reports:
            await reports.stop(0)
        store.close()

    return await run_server(name="trainer", host=cfg.host, port=cfg.port, metrics_port=cfg.metrics_port,
                     add_servicers=add, startup=startup, drain=drain, shutdown=shutdown,
                     drain_seconds=cfg.drain_seconds, security=security, health_port=cfg.health_port,
                     max_message_bytes=cfg.max_message_bytes)


def main(cfg: TrainerConfig) -> int:
    """Runs the service until it is stopped; the process exit status (1: it could not start)."""
    setup_logging(cfg.log_level)
    return asyncio.run(serve(cfg))
