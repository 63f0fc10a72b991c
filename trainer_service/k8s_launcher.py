"""Kubernetes launcher: each training job becomes a Kubernetes object instead of a local process.

    launcher = KubernetesLauncher(K8sSettings(namespace="tunewire", image="ghcr.io/acme/tunewire:cpu"))

One process → a `batch/v1` Job; `num_processes` > 1 (and/or `num_nodes` > 1) → a Kubeflow
`kubeflow.org/v1` PyTorchJob (torchrun in every pod: `num_nodes` pods × `nproc_per_node`
processes). Either way the pods run the same `python -m trainer_service.worker` as the local
launcher and report to the trainer's `TrainerWorkerService` over gRPC with the per-job token,
which travels in a per-job Secret (never in the manifest or on a command line). Cancel deletes
the object (foreground propagation: its pods go with it).

The manifest builders are pure functions (tested offline); the `kubernetes` client calls are
thin and imported lazily, so nothing here needs a cluster or the package unless the launcher is
used. Shared storage: the job directory (spec, checkpoints, worker.log) must be on a volume that
the trainer and the worker pods both mount at the same path (`data_pvc`, ReadWriteMany), and so
must the adapter store and the model cache.

GPU pods (`gpus_per_pod` >= 1): each pod requests and is limited to max(nproc_per_node,
gpus_per_pod) GPUs (`gpu_resource`, one rank per GPU), tolerates that resource's NoSchedule taint,
and gets a memory-backed /dev/shm (NCCL and torch's data loading need more than the container
runtime's 64 MiB). The worker trains on them because the scheduler writes the trainer's `device`
setting into the job's worker.json, on the shared volume.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer_service.launcher import num_processes

log = logging.getLogger("tunewire.trainer.k8s")
LABEL = "tunewire.dev/job"
UID = 10001  # the images' user (docker/Dockerfile.*)
RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


@dataclass(frozen=True)
class K8sSettings:
    namespace: str = "tunewire"                 # where jobs run (the trainer's namespace)
    image: str = "tunewire:cpu"                 # the worker image (same code as the trainer)
    service_account: str = "tunewire-worker"    # no API rights needed by workers
    data_pvc: str = "trainer-data"              # RWX claim holding the trainer's data_dir
    data_mount: str = "/data"                   # mounted here in trainer and workers alike
    adapters_pvc: str = "adapters"              # RWX adapter store
    adapters_mount: str = "/adapters"
    models_pvc: str = "models"                  # base models (read-only)
    models_mount: str = "/models"
    cpu: str = "2"                              # requests = limits per pod
    memory: str = "8Gi"
    gpus_per_pod: int = 0                       # GPUs per pod at least (0 = CPU pods); see GPU pods above
    gpu_resource: str = "nvidia.com/gpu"        # the device plugin's extended resource
    shm_size: str = "16Gi"                      # GPU pods: /dev/shm size (counts against memory)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    backoff_limit: int = 0                      # the trainer does retries (max_worker_retries), not k8s
    ttl_seconds_after_finished: int = 3600

    def __post_init__(self):
        if not self.image or not self.namespace:
            raise ValueError("K8sSettings: image and namespace are required")
        if self.gpus_per_pod < 0 or self.backoff_limit < 0:
            raise ValueError("K8sSettings: gpus_per_pod and backoff_limit must be >= 0")
        if "/" not in self.gpu_resource:
            raise ValueError('K8sSettings: gpu_resource is an extended resource like "nvidia.com/gpu"')


def object_name(job_id: str) -> str:
    """A DNS-1123 name for the job's Kubernetes objects."""
    name = re.sub(r"[^a-z0-9-]", "-", f"tw-{job_id}".lower()).strip("-")
    return name[:63].rstrip("-")


def token_secret(job_id: str, token: str, s: K8sSettings) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": object_name(job_id), "namespace": s.namespace, "labels": {LABEL: job_id}},
            "stringData": {"token": token}}


def pod_gpus(s: K8sSettings, nproc_per_node: int) -> int:
    """GPUs one pod gets: one per rank, at least gpus_per_pod; 0 for CPU pods."""
    return max(nproc_per_node, s.gpus_per_pod) if s.gpus_per_pod else 0


def _pod_spec(job_id: str, command: list[str], s: K8sSettings, restart: str, nproc: int = 1) -> dict:
    resources = {"cpu": s.cpu, "memory": s.memory}
    gpus = pod_gpus(s, nproc)
    if gpus:
        resources[s.gpu_resource] = str(gpus)
    container = {
        "name": "worker", "image": s.image, "command": command,
        "env": [{"name": "TUNEWIRE_JOB_TOKEN", "valueFrom": {"secretKeyRef": {
                    "name": object_name(job_id), "key": "token"}}},
                {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {"requests": resources, "limits": resources},
        "securityContext": RESTRICTED,
        "volumeMounts": [{"name": "data", "mountPath": s.data_mount},
                         {"name": "adapters", "mountPath": s.adapters_mount},
                         {"name": "models", "mountPath": s.models_mount, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "cache", "mountPath": "/cache"}],  # HOME and caches (images)
    }
    spec = {
        "restartPolicy": restart, "serviceAccountName": s.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": s.data_pvc}},
                    {"name": "adapters", "persistentVolumeClaim": {"claimName": s.adapters_pvc}},
                    {"name": "models", "persistentVolumeClaim": {"claimName": s.models_pvc, "readOnly": True}},
                    {"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
    }
    if s.node_selector:
        spec["nodeSelector"] = dict(s.node_selector)
    tolerations = [dict(t) for t in s.tolerations]
    if gpus:
        # GPU nodes are commonly tainted <resource>:NoSchedule; harmless where they are not
        if not any(t.get("key") == s.gpu_resource for t in tolerations):
            tolerations.append({"key": s.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}})
    if tolerations:
        spec["tolerations"] = tolerations
    return spec


def _worker_args(job_id: str, job_dir: Path, report_address: str) -> list[str]:
    return ["-m", "trainer_service.worker", "--job-id", job_id, "--job-dir", str(job_dir),
            "--report-address", report_address]


def batch_job(job_id: str, job_dir: Path, report_address: str, s: K8sSettings) -> dict:
    """One worker process in one pod."""
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": object_name(job_id), "namespace": s.namespace, "labels": {LABEL: job_id}},
            "spec": {"backoffLimit": s.backoff_limit, "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
                     "template": {"metadata": {"labels": {LABEL: job_id}},
                                  "spec": _pod_spec(job_id, ["python", *_worker_args(job_id, job_dir, report_address)],
                                                    s, "Never")}}}


def pytorch_job(job_id: str, job_dir: Path, report_address: str, s: K8sSettings, *,
                num_nodes: int, nproc_per_node: int) -> dict:
    """torchrun across `num_nodes` pods (Kubeflow training-operator sets MASTER_ADDR, RANK, ...)."""
    if num_nodes < 1 or nproc_per_node < 1:
        raise ValueError("num_nodes and nproc_per_node must be >= 1")
    # The operator passes the rendezvous through env vars; torchrun reads them (no --standalone).
    command = ["python", "-m", "torch.distributed.run", f"--nnodes={num_nodes}",
               f"--nproc_per_node={nproc_per_node}", *_worker_args(job_id, job_dir, report_address)]

    def replica(n: int) -> dict:
        return {"replicas": n, "restartPolicy": "Never",
                "template": {"metadata": {"labels": {LABEL: job_id}},
                             "spec": _pod_spec(job_id, command, s, "Never", nproc_per_node)}}

    specs = {"Master": replica(1)}
    if num_nodes > 1:
        specs["Worker"] = replica(num_nodes - 1)
    for r in specs.values():  # the operator requires the container to be named "pytorch"
        r["template"]["spec"]["containers"][0]["name"] = "pytorch"
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": object_name(job_id), "namespace": s.namespace, "labels": {LABEL: job_id}},
            "spec": {"nprocPerNode": str(nproc_per_node),
                     "runPolicy": {"backoffLimit": s.backoff_limit,
                                   "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
                                   "cleanPodPolicy": "Running"},
                     "pytorchReplicaSpecs": specs}}


def manifests(job_id: str, job_dir: Path, report_address: str, token: str, s: K8sSettings,
              *, num_nodes: int | None = None) -> list[dict]:
    """Everything the job needs, in creation order: its token Secret, then the Job or PyTorchJob.
    `num_nodes` defaults to the job spec's `hyperparameters.num_nodes`."""
    nproc = num_processes(job_dir)
    if num_nodes is None:
        num_nodes = _num_nodes(job_dir)
    if num_nodes == 1 and nproc == 1:
        work = batch_job(job_id, job_dir, report_address, s)
    else:
        work = pytorch_job(job_id, job_dir, report_address, s, num_nodes=num_nodes, nproc_per_node=nproc)
    return [token_secret(job_id, token, s), work]


def _num_nodes(job_dir: Path) -> int:
    from trainer_service.spec import JobSpec

    try:
        return JobSpec.from_json((Path(job_dir) / "spec.json").read_text()).hyperparameters.num_nodes
    except Exception:  # noqa: BLE001 - a bad spec is the worker's to report
        return 1


class _K8sWorker:
    """A WorkerHandle over a Kubernetes object: wait() polls its status; terminate/kill delete it."""

    pid = 0  # no local process: orphan handling after a trainer restart goes through the API

    def __init__(self, launcher: KubernetesLauncher, job_id: str, kind: str):
        self.launcher, self.job_id, self.kind = launcher, job_id, kind

    async def wait(self) -> int:
        while True:
            status = await asyncio.to_thread(self.launcher.status, self.job_id, self.kind)
            if status is not None:
                return status
            await asyncio.sleep(self.launcher.poll_seconds)

    def terminate(self) -> None:
        self.launcher.delete(self.job_id, self.kind, grace_seconds=30)

    def kill(self) -> None:
        self.launcher.delete(self.job_id, self.kind, grace_seconds=0)


class KubernetesLauncher:
    """Launcher protocol on a cluster (in-cluster config, else ~/.kube/config)."""

    multi_node = True  # num_nodes > 1 becomes a PyTorchJob across pods

    def __init__(self, settings: K8sSettings, *, poll_seconds: float = 5.0):
        self.s, self.poll_seconds = settings, poll_seconds
        from kubernetes import client, config  # the optional `kubernetes` package

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.core, self.batch, self.custom = client.CoreV1Api(), client.BatchV1Api(), client.CustomObjectsApi()

    async def launch(self, *, job_id: str, job_dir: Path, report_address: str, token: str):
        secret, work = manifests(job_id, job_dir, report_address, token, self.s)
        await asyncio.to_thread(self.core.create_namespaced_secret, self.s.namespace, secret)
        if work["kind"] == "Job":
            await asyncio.to_thread(self.batch.create_namespaced_job, self.s.namespace, work)
        else:
            await asyncio.to_thread(self.custom.create_namespaced_custom_object, "kubeflow.org", "v1",
                                    self.s.namespace, "pytorchjobs", work)
        log.info("created %s %s", work["kind"], work["metadata"]["name"], extra={"job": job_id})
        return _K8sWorker(self, job_id, work["kind"])

    def status(self, job_id: str, kind: str) -> int | None:
        """None while running; 0 on success; 1 on failure or when the object is gone."""
        from kubernetes.client.exceptions import ApiException

        name = object_name(job_id)
        try:
            if kind == "Job":
                st = self.batch.read_namespaced_job_status(name, self.s.namespace).status
                return 0 if st.succeeded else (1 if st.failed else None)
            obj = self.custom.get_namespaced_custom_object_status("kubeflow.org", "v1", self.s.namespace,
                                                                  "pytorchjobs", name)
        except ApiException as e:
            if e.status == 404:
                return 1  # deleted (cancelled) under us
            raise
        done = {c["type"]: c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])}
        return 0 if done.get("Succeeded") else (1 if done.get("Failed") else None)

    def delete(self, job_id: str, kind: str, *, grace_seconds: int) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        name, body = object_name(job_id), client.V1DeleteOptions(
            propagation_policy="Foreground", grace_period_seconds=grace_seconds)
        for call in ((lambda: self.batch.delete_namespaced_job(name, self.s.namespace, body=body))
                     if kind == "Job" else
                     (lambda: self.custom.delete_namespaced_custom_object(
                         "kubeflow.org", "v1", self.s.namespace, "pytorchjobs", name, body=body)),
                     lambda: self.core.delete_namespaced_secret(name, self.s.namespace)):
            try:
                call()
            except ApiException as e:
                if e.status != 404:
                    raise
