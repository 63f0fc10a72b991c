"""What each training job becomes on a cluster: the Kubernetes launcher's manifests, as pure functions.

    secret, work = manifests(job_id, job_dir, "trainer:50051", token, K8sSettings(), attempt=2)

One node → a `batch/v1` Job (one pod; `num_processes` > 1 runs torchrun --standalone in it, no
operator needed). `num_nodes` > 1 → a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/
v1alpha1) that refers to a training runtime (`torch-distributed` by default) and fills the
trainer's image, command, env, numNodes, numProcPerNode and resourcesPerNode; volumes, node
selector, tolerations and the pods' labels go in podTemplateOverrides. The legacy
`kubeflow.org/v1` PyTorchJob is dropped (docs/operations.md says why). The worker's token
travels in a per-job Secret, never in the workload or on a command line.

Names are unique per launch: `tw-<job>-a<attempt>-<nonce>` (the attempt for people reading
`kubectl get`, a random nonce because a trainer restart re-runs an attempt number while the
orphan of the last run may still be terminating), so no launch ever meets a 409 Conflict. Every
object carries the labels of `labels()` (managed-by, job, attempt), by which the launcher finds
orphans after a restart.

TrainJob schema (v1alpha1, Kubeflow Trainer v2.1, pkg/apis/trainer/v1alpha1/trainjob_types.go;
https://www.kubeflow.org/docs/components/trainer/operator-guides/podtemplate-overrides/):
spec.runtimeRef {name, apiGroup, kind}; spec.trainer {image, command, args, env, numNodes,
resourcesPerNode, numProcPerNode}; spec.labels; spec.podTemplateOverrides[] {targetJobs[]
{name}, metadata, spec {serviceAccountName, nodeSelector, affinity, tolerations, volumes,
initContainers[], containers[] {name, env, volumeMounts}, schedulingGates, imagePullSecrets}};
status.conditions types Complete / Failed. The runtime's trainer step is the replicated job and
container named "node"; its torch plugin sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / ...,
which torchrun reads. A TrainJob cannot set the pods' securityContext: the runtime's pod template
does (k8s/README.md).
"""

from __future__ import annotations

import hashlib
import re
import secrets as _secrets
from dataclasses import dataclass, field
from pathlib import Path

from trainer_service.launcher import num_processes

LABEL = "tunewire.dev/job"              # every object and pod of a job (NetworkPolicies select on it)
ATTEMPT_LABEL = "tunewire.dev/attempt"  # which launch of the job (1, 2, ...)
MANAGED_BY = ("app.kubernetes.io/managed-by", "tunewire")  # how orphans are found after a restart
UID = 10001  # the images' user (docker/Dockerfile.*)
RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")  # group, version, plural
TRAINJOB_STEP = "node"  # the runtime's trainer replicated job and container (torch-distributed)
MAX_NAME = 40  # JobSet derives "<name>-node-<i>-<j>-<pod suffix>" from it: room below 63


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
    gpus_per_pod: int = 0                       # GPUs per pod at least (0 = CPU pods); one per rank
    gpu_resource: str = "nvidia.com/gpu"        # the device plugin's extended resource
    shm_size: str = "16Gi"                      # GPU pods: /dev/shm size (counts against memory)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    backoff_limit: int = 0                      # the trainer does retries (max_worker_retries), not k8s
    ttl_seconds_after_finished: int = 3600
    training_runtime: str = "torch-distributed"  # multi-node: the runtime a TrainJob refers to
    training_runtime_kind: str = "ClusterTrainingRuntime"  # or "TrainingRuntime" (namespaced)
    api_timeout_seconds: float = 30.0           # per API call: a hung API server fails the launch
    status_error_seconds: float = 300.0         # a job whose status cannot be read this long has failed

    def __post_init__(self):
        if not self.image or not self.namespace:
            raise ValueError("K8sSettings: image and namespace are required")
        if self.gpus_per_pod < 0 or self.backoff_limit < 0:
            raise ValueError("K8sSettings: gpus_per_pod and backoff_limit must be >= 0")
        if "/" not in self.gpu_resource:
            raise ValueError('K8sSettings: gpu_resource is an extended resource like "nvidia.com/gpu"')
        if self.training_runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            raise ValueError("K8sSettings: training_runtime_kind is ClusterTrainingRuntime or TrainingRuntime")
        if self.api_timeout_seconds <= 0 or self.status_error_seconds <= 0:
            raise ValueError("K8sSettings: api_timeout_seconds and status_error_seconds must be > 0")


def object_name(job_id: str, attempt: int = 1, nonce: str | None = None) -> str:
    """A fresh name for one launch of a job: DNS-1123 and RFC 1035 (TrainJob), <= MAX_NAME."""
    nonce = nonce if nonce is not None else _secrets.token_hex(3)
    suffix = f"-a{attempt}" + (f"-{nonce}" if nonce else "")
    base = re.sub(r"[^a-z0-9-]+", "-", f"tw-{job_id}".lower()).strip("-")
    room = MAX_NAME - len(suffix)
    if len(base) > room:  # keep names of long ids distinct: a hash of the whole id
        base = base[:room - 7].rstrip("-") + "-" + hashlib.sha256(job_id.encode()).hexdigest()[:6]
    return base + suffix


def labels(job_id: str, attempt: int) -> dict[str, str]:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", job_id)[:63].strip("-_.")  # a valid label value
    return {MANAGED_BY[0]: MANAGED_BY[1], LABEL: value, ATTEMPT_LABEL: str(attempt)}


def token_secret(name: str, job_id: str, attempt: int, token: str, s: K8sSettings,
                 owner: dict | None = None) -> dict:
    """The job's report token; `owner` (owner_reference) makes it go with its workload."""
    meta = {"name": name, "namespace": s.namespace, "labels": labels(job_id, attempt)}
    if owner:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta,
            "stringData": {"token": token}}


def owner_reference(work: dict, uid: str) -> dict:
    """A reference to the created workload. No blockOwnerDeletion: setting it needs `update` on the
    owner's finalizers (an RBAC right the trainer does not need otherwise); the garbage collector
    deletes the Secret after its owner either way."""
    return {"apiVersion": work["apiVersion"], "kind": work["kind"], "name": work["metadata"]["name"],
            "uid": uid}


def pod_gpus(s: K8sSettings, nproc_per_node: int) -> int:
    """GPUs one pod gets: one per rank, at least gpus_per_pod; 0 for CPU pods."""
    return max(nproc_per_node, s.gpus_per_pod) if s.gpus_per_pod else 0


def _resources(s: K8sSettings, nproc: int) -> dict:
    res = {"cpu": s.cpu, "memory": s.memory}
    if gpus := pod_gpus(s, nproc):
        res[s.gpu_resource] = str(gpus)
    return {"requests": res, "limits": dict(res)}


def _env(name: str) -> list[dict]:
    return [{"name": "TUNEWIRE_JOB_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"}]


def _storage(s: K8sSettings, gpus: int) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): the shared claims, writable /tmp and /cache (HOME and caches of
    the images), and for GPU pods a memory-backed /dev/shm (NCCL needs more than 64 MiB)."""
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": s.data_pvc}},
               {"name": "adapters", "persistentVolumeClaim": {"claimName": s.adapters_pvc}},
               {"name": "models", "persistentVolumeClaim": {"claimName": s.models_pvc, "readOnly": True}},
               {"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "data", "mountPath": s.data_mount},
              {"name": "adapters", "mountPath": s.adapters_mount},
              {"name": "models", "mountPath": s.models_mount, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/cache"}]
    if gpus:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _tolerations(s: K8sSettings, gpus: int) -> list[dict]:
    tolerations = [dict(t) for t in s.tolerations]
    # GPU nodes are commonly tainted <resource>:NoSchedule; harmless where they are not
    if gpus and not any(t.get("key") == s.gpu_resource for t in tolerations):
        tolerations.append({"key": s.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _worker_args(job_id: str, job_dir: Path, report_address: str) -> list[str]:
    return ["-m", "trainer_service.worker", "--job-id", job_id, "--job-dir", str(job_dir),
            "--report-address", report_address]


def batch_job(name: str, job_id: str, attempt: int, job_dir: Path, report_address: str, s: K8sSettings,
              *, nproc: int = 1) -> dict:
    """One pod: the worker, or torchrun --standalone with `nproc` ranks in it."""
    command = ["python", *_worker_args(job_id, job_dir, report_address)]
    if nproc > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    gpus = pod_gpus(s, nproc)
    volumes, mounts = _storage(s, gpus)
    container = {"name": "worker", "image": s.image, "command": command, "env": _env(name),
                 "resources": _resources(s, nproc), "securityContext": RESTRICTED, "volumeMounts": mounts}
    pod = {"restartPolicy": "Never", "serviceAccountName": s.service_account,
           "automountServiceAccountToken": False,
           "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                               "seccompProfile": {"type": "RuntimeDefault"}},
           "containers": [container], "volumes": volumes}
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if tolerations := _tolerations(s, gpus):
        pod["tolerations"] = tolerations
    meta = {"name": name, "namespace": s.namespace, "labels": labels(job_id, attempt)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": s.backoff_limit, "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
                     "template": {"metadata": {"labels": labels(job_id, attempt)}, "spec": pod}}}


def train_job(name: str, job_id: str, attempt: int, job_dir: Path, report_address: str, s: K8sSettings,
              *, num_nodes: int, nproc_per_node: int) -> dict:
    """torchrun in each of `num_nodes` pods, through Kubeflow Trainer v2 (module docstring)."""
    if num_nodes < 1 or nproc_per_node < 1:
        raise ValueError("num_nodes and nproc_per_node must be >= 1")
    # The runtime's torch plugin passes the rendezvous as PET_* env vars; torchrun reads them.
    command = ["python", "-m", "torch.distributed.run", f"--nnodes={num_nodes}",
               f"--nproc_per_node={nproc_per_node}", *_worker_args(job_id, job_dir, report_address)]
    gpus = pod_gpus(s, nproc_per_node)
    volumes, mounts = _storage(s, gpus)
    pod = {"serviceAccountName": s.service_account, "volumes": volumes,
           "containers": [{"name": TRAINJOB_STEP, "volumeMounts": mounts}]}
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if tolerations := _tolerations(s, gpus):
        pod["tolerations"] = tolerations
    return {"apiVersion": f"{TRAINJOB[0]}/{TRAINJOB[1]}", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": s.namespace, "labels": labels(job_id, attempt)},
            "spec": {"runtimeRef": {"name": s.training_runtime, "apiGroup": TRAINJOB[0],
                                    "kind": s.training_runtime_kind},
                     "trainer": {"image": s.image, "command": command, "env": _env(name),
                                 "numNodes": num_nodes, "numProcPerNode": nproc_per_node,
                                 "resourcesPerNode": _resources(s, nproc_per_node)},
                     "labels": labels(job_id, attempt),
                     "podTemplateOverrides": [{"targetJobs": [{"name": TRAINJOB_STEP}],
                                               "metadata": {"labels": labels(job_id, attempt)},
                                               "spec": pod}]}}


def manifests(job_id: str, job_dir: Path, report_address: str, token: str, s: K8sSettings,
              *, num_nodes: int | None = None, attempt: int = 1, name: str | None = None) -> list[dict]:
    """[the token Secret, the Job or TrainJob] of one launch. The launcher creates the workload
    first and the Secret after it, owned by it (k8s_launcher). `num_nodes` defaults to the job
    spec's `hyperparameters.num_nodes`; `name` to a fresh object_name."""
    name = name or object_name(job_id, attempt)
    nproc = num_processes(job_dir)
    if num_nodes is None:
        num_nodes = _num_nodes(job_dir)
    if num_nodes == 1:
        work = batch_job(name, job_id, attempt, job_dir, report_address, s, nproc=nproc)
    else:
        work = train_job(name, job_id, attempt, job_dir, report_address, s, num_nodes=num_nodes,
                         nproc_per_node=nproc)
    return [token_secret(name, job_id, attempt, token, s), work]


def pod_specs(work: dict) -> list[dict]:
    """The pod spec(s) a workload asks for. A TrainJob's pods come from its runtime's template
    merged with what the TrainJob sets: this returns that part as one pod spec (its container
    named "node"), so tests and readers check both kinds alike and validate it as a Pod."""
    if work["kind"] == "Job":
        return [work["spec"]["template"]["spec"]]
    trainer, over = work["spec"]["trainer"], work["spec"]["podTemplateOverrides"][0]["spec"]
    pod = {k: v for k, v in over.items() if k != "containers"}
    pod["containers"] = [{"name": TRAINJOB_STEP, "image": trainer["image"], "command": trainer["command"],
                          "env": trainer["env"], "resources": trainer["resourcesPerNode"],
                          "volumeMounts": over["containers"][0]["volumeMounts"]}]
    return [pod]


def _num_nodes(job_dir: Path) -> int:
    from trainer_service.spec import JobSpec

    try:
        return JobSpec.from_json((Path(job_dir) / "spec.json").read_text()).hyperparameters.num_nodes
    except Exception:  # noqa: BLE001 - a bad spec is the worker's to report
        return 1
