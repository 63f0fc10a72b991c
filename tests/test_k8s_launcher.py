"""The Kubernetes launcher's manifest builders (pure functions): what each training job becomes on
a cluster. No cluster and no `kubernetes` package are needed: the client calls are thin."""

from __future__ import annotations

import json

import pytest

from trainer_service.k8s_launcher import K8sSettings, manifests, object_name
from trainer_service.spec import Hyperparameters, JobSpec

pytestmark = pytest.mark.timeout(60)
S = K8sSettings(namespace="ml", image="registry.example/tunewire:1.0", gpus_per_pod=1,
                node_selector={"nvidia.com/gpu.present": "true"},
                tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},))


def job_dir(tmp_path, nproc=1, nodes=1):
    spec = JobSpec(base_model="/models/m", training_data="d.jsonl", adapter_name="a",
                   hyperparameters=Hyperparameters(num_processes=nproc, num_nodes=nodes,
                                                   batch_size=2 * nproc * nodes))
    (tmp_path / "spec.json").write_text(spec.to_json())
    return tmp_path


def pod_specs(work):
    if work["kind"] == "Job":
        return [work["spec"]["template"]["spec"]]
    return [r["template"]["spec"] for r in work["spec"]["pytorchReplicaSpecs"].values()]


def test_one_process_is_a_batch_job_with_the_token_in_a_secret(tmp_path):
    d = job_dir(tmp_path)
    secret, work = manifests("20261129-ABC_1", d, "trainer:50051", "s3cret", S)
    name = object_name("20261129-ABC_1")
    assert name == "tw-20261129-abc-1" and len(name) <= 63
    assert secret["kind"] == "Secret" and secret["stringData"] == {"token": "s3cret"}
    assert work["apiVersion"] == "batch/v1" and work["kind"] == "Job" and work["metadata"]["namespace"] == "ml"
    assert work["spec"]["backoffLimit"] == 0  # the trainer retries, not Kubernetes
    (pod,) = pod_specs(work)
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "trainer_service.worker", "--job-id", "20261129-ABC_1",
                            "--job-dir", str(d), "--report-address", "trainer:50051"]
    assert "s3cret" not in json.dumps(work)  # the token is only in the Secret
    env = {e["name"]: e for e in c["env"]}
    assert env["TUNEWIRE_JOB_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "token"}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False


def test_every_pod_is_restricted_and_gets_gpus_and_storage(tmp_path):
    for nproc in (1, 2):
        _, work = manifests("j", job_dir(tmp_path, nproc), "t:1", "x", S, num_nodes=1)
        for pod in pod_specs(work):
            c = pod["containers"][0]
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"]["type"] == "RuntimeDefault"
            # one GPU per rank (gpus_per_pod = 1 is the floor), requests = limits
            assert c["resources"]["limits"]["nvidia.com/gpu"] == str(nproc)
            assert c["resources"]["requests"]["nvidia.com/gpu"] == str(nproc)
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"]
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            assert claims["data"] == "trainer-data" and claims["adapters"] == "adapters"
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data", "/adapters", "/models", "/tmp", "/cache"}
            assert pod["securityContext"]["runAsUser"] == 10001  # the images' user


def test_several_processes_or_nodes_are_a_pytorchjob(tmp_path):
    d = job_dir(tmp_path, nproc=4)
    _, work = manifests("j", d, "t:1", "x", S, num_nodes=3)
    assert (work["apiVersion"], work["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = work["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    assert work["spec"]["nprocPerNode"] == "4"
    cmd = specs["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=4"]
    assert "--standalone" not in cmd  # the operator provides the rendezvous
    assert all(r["template"]["spec"]["containers"][0]["name"] == "pytorch" for r in specs.values())
    _, single_node = manifests("j", d, "t:1", "x", S)
    assert "Worker" not in single_node["spec"]["pytorchReplicaSpecs"]
    # by default the node count comes from the job's spec
    _, from_spec = manifests("j", job_dir(tmp_path, nproc=2, nodes=4), "t:1", "x", S)
    assert from_spec["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3


def test_gpu_pods_train_on_their_gpus(tmp_path):
    """A GPU pod: its GPUs (at least gpus_per_pod, one per rank), the GPU taint tolerated, a
    memory-backed /dev/shm for NCCL; cpu/memory from the settings. CPU pods get none of it."""
    s = K8sSettings(gpus_per_pod=2, cpu="12", memory="96Gi", gpu_resource="nvidia.com/gpu", shm_size="8Gi")
    for nproc, nodes, want in ((1, 1, "2"), (2, 1, "2"), (4, 2, "4")):
        _, work = manifests("j", job_dir(tmp_path, nproc, nodes), "t:1", "x", s)
        for pod in pod_specs(work):
            c = pod["containers"][0]
            assert c["resources"]["requests"] == c["resources"]["limits"] == {
                "cpu": "12", "memory": "96Gi", "nvidia.com/gpu": want}
            assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # a given toleration for the resource is not doubled
    _, work = manifests("j", job_dir(tmp_path), "t:1", "x", S)
    assert len(pod_specs(work)[0]["tolerations"]) == 1
    cpu = K8sSettings()
    for nproc in (1, 2):
        _, work = manifests("j", job_dir(tmp_path, nproc), "t:1", "x", cpu)
        for pod in pod_specs(work):
            assert "nvidia.com/gpu" not in json.dumps(pod) and "dshm" not in json.dumps(pod)
            assert "tolerations" not in pod


def test_settings_are_checked():
    with pytest.raises(ValueError):
        K8sSettings(image="")
    with pytest.raises(ValueError):
        K8sSettings(gpus_per_pod=-1)
    with pytest.raises(ValueError):
        K8sSettings(gpu_resource="gpu")
