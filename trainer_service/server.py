"""The trainer service process: job store + scheduler + gRPC servicers (+ health, reflection,
metrics), and the gRPC handoff client to serving.

    tunewire serve trainer [--config configs/trainer.example.toml] [--port 50051]
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import replace
from pathlib import Path

import grpc

from trainer_service.config import TrainerConfig
from trainer_service.gpus import gpu_settings
from trainer_service.jobs import JobService
from trainer_service.launcher import LocalLauncher
from trainer_service.publisher import HandoffError, HandoffOutcome, ReplicaOutcome
from trainer_service.servicer import TrainerServicer, WorkerServicer
from trainer_service.serving_check import CAPABILITIES_TIMEOUT_S, ServingCapabilities
from trainer_service.store import JobStore
from tunewire import deployments
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.grpc_util import ServerInterceptor, run_server, server_options
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
        # a comma-separated list names each replica (no Service): the first answers `generate`
        self.address, self.timeout, self.tls = address.split(",")[0].strip(), timeout, tls
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        # replicas are dialled by IP: the certificate is checked against the Service's name
        self.server_name = self.address.rpartition(":")[0].strip("[]")

    def _channel(self, target: str) -> grpc.aio.Channel:
        return channel(target, server_name=self.server_name, **self.tls)

    async def endpoints(self) -> list[str]:
        """Every replica: each listed address, a headless Service name resolved to its pods."""
        return [t for a in self.addresses for t in await asyncio.to_thread(serving_endpoints, a)]

    async def load_adapter(self, *, name: str, version: str, uri: str, manifest_sha256: str,
                           adapter_store: Path, source: str) -> HandoffOutcome:
        """Deploys a published version to every serving replica (a headless Service name resolves
        to every pod): 1. each replica stages it (LoadAdapter stage=true: validated and resident,
        nothing flips); 2. only when all of them accepted, it is recorded as the name's deployment
        in the shared store (tunewire/deployments.py); 3. waits until every replica reports that
        generation applied, or the handoff timeout (per phase). A refusal in 1 records nothing: the previous
        version keeps serving everywhere. A replica that staged but is not serving by the
        timeout is listed with serving=false; the deployment stands (it follows the record)."""
        targets = await self.endpoints()
        staged = await asyncio.gather(*(self._stage_one(t, name=name, version=version, uri=uri,
                                                         manifest_sha256=manifest_sha256) for t in targets))
        refused = [o for o in staged if not o.loaded]
        if refused:
            why = "; ".join(f"{o.address}{f' ({o.replica_id})' if o.replica_id else ''}: {o.message}"
                            for o in refused)
            return HandoffOutcome(replicas=tuple(staged), message=(
                f"{len(refused)} of {len(targets)} serving replicas refused {name}@{version}, so it was "
                f"not deployed and the previous version keeps serving: {why}"))
        try:
            record = await asyncio.to_thread(deployments.record, adapter_store, name, version, source=source)
        except (TunewireError, OSError) as e:
            return HandoffOutcome(replicas=tuple(staged), message=f"the deployment could not be recorded: {e}")
        generation = record.adapters[name].generation
        deadline = asyncio.get_running_loop().time() + self.timeout  # each phase gets the timeout
        outcomes = await asyncio.gather(*(self._await_generation(o, generation, deadline) for o in staged))
        late = [o for o in outcomes if not o.serving]
        msg = f"serving deployed {name}@{version} (generation {generation}) on {len(targets) - len(late)} of {len(targets)} replicas"
        if late:
            msg += f"; not serving it after {self.timeout:.0f} s: " + "; ".join(f"{o.address}: {o.message}" for o in late)
        return HandoffOutcome(replicas=tuple(outcomes), deployment_generation=generation, message=msg)

    def _stub(self, ch: grpc.aio.Channel) -> serving_pb2_grpc.ServingServiceStub:
        return serving_pb2_grpc.ServingServiceStub(ch)

    async def _stage_one(self, target: str, **request) -> ReplicaOutcome:
        replica_id = ""
        async with self._channel(target) as ch:
            try:
                info = await self._stub(ch).GetModelInfo(serving_pb2.GetModelInfoRequest(),
                                                         timeout=self.timeout, wait_for_ready=True)
                replica_id = info.replica_id
                resp = await self._stub(ch).LoadAdapter(serving_pb2.LoadAdapterRequest(stage=True, **request),
                                                        timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                reason, _ = error_info(e)
                return ReplicaOutcome(address=target, replica_id=replica_id, reason=reason or R.SERVING_UNAVAILABLE,
                                      message=f"{e.code().name} {reason}: {e.details()}".strip())
        a = resp.adapter
        return ReplicaOutcome(address=target, replica_id=replica_id, loaded=True,
                              message=f"staged {a.name}@{a.version} (rank {a.rank}) in {a.load_ms:.0f} ms")

    async def _await_generation(self, staged: ReplicaOutcome, generation: int, deadline: float) -> ReplicaOutcome:
        """`staged` with serving=true once the replica's applied generation reaches `generation`."""
        loop, seen, last = asyncio.get_running_loop(), 0, ""
        async with self._channel(staged.address) as ch:
            while True:
                try:
                    info = await self._stub(ch).GetModelInfo(serving_pb2.GetModelInfoRequest(),
                                                             timeout=max(0.1, min(5.0, deadline - loop.time())))
                    seen = info.deployment_generation
                    if seen >= generation:
                        return replace(staged, serving=True, message=f"{staged.message}; serving generation {seen}")
                except grpc.aio.AioRpcError as e:
                    last = f"{e.code().name}: {e.details()}"
                if loop.time() >= deadline:
                    return replace(staged, reason=R.DEPLOYMENT_NOT_APPLIED,
                                   message=f"at generation {seen}, not {generation}{f' ({last})' if last else ''}")
                await asyncio.sleep(0.1)

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

    async def capabilities(self) -> ServingCapabilities:
        """What every serving replica can load (GetModelInfo on each): a LoRA job is checked
        against it at create (trainer_service/serving_check.py). A replica that does not answer
        within CAPABILITIES_TIMEOUT_S → SERVING_UNAVAILABLE (retryable; publish_only skips the check)."""
        targets = await self.endpoints()

        async def one(target: str) -> ServingCapabilities:
            async with self._channel(target) as ch:
                info = await serving_pb2_grpc.ServingServiceStub(ch).GetModelInfo(
                    serving_pb2.GetModelInfoRequest(), timeout=min(self.timeout, CAPABILITIES_TIMEOUT_S))
            return ServingCapabilities(
                base_model_fingerprints=frozenset({info.base_model_fingerprint}),
                max_lora_rank=info.max_lora_rank,
                # empty: a serving from before these fields; its targets are checked at the handoff
                deployable_target_modules=frozenset(info.lora_deployable_target_modules) or None,
                dora_supported=info.lora_dora_supported, bias_supported=info.lora_bias_supported,
                replicas=(f"{target} ({info.replica_id})" if info.replica_id else target,))

        answers = await asyncio.gather(*(one(t) for t in targets), return_exceptions=True)
        failed = [(t, a) for t, a in zip(targets, answers) if isinstance(a, BaseException)]
        if failed:
            for _, a in failed:
                if not isinstance(a, grpc.aio.AioRpcError):
                    raise a
            why = "; ".join(f"{t}: {a.code().name} {a.details()}" for t, a in failed)
            raise TunewireError(R.SERVING_UNAVAILABLE, f"cannot check the job against serving at "
                                f"{self.address} ({len(failed)} of {len(targets)} replicas did not "
                                f"answer GetModelInfo: {why}); retry, or set publish_only",
                                metadata={"serving_address": self.address}, retry_after_s=5)
        return ServingCapabilities.common(answers)


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

    kind, _, runtime = cfg.k8s_training_runtime.rpartition("/")
    return K8sSettings(namespace=cfg.k8s_namespace, image=cfg.k8s_image, gpus_per_pod=cfg.k8s_gpus_per_pod,
                       gpu_resource=cfg.k8s_gpu_resource, cpu=cfg.k8s_cpu, memory=cfg.k8s_memory,
                       node_selector=dict(s.split("=", 1) for s in cfg.k8s_node_selector),
                       data_mount=cfg.data_dir, training_runtime=runtime,
                       training_runtime_kind=kind or "ClusterTrainingRuntime")


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
    reports = grpc.aio.server(interceptors=[ServerInterceptor(cfg.max_message_bytes)],
                              options=server_options(cfg.max_message_bytes)) if security.tls else None

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
