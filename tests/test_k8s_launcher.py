"""The Kubernetes launcher: its manifests (pure functions, validated), and its API calls made by the
real `kubernetes` client against a fake API server at the HTTP edge (tests/k8s_fake_api.py),
driven through the real JobService / Scheduler / SQLite store: unique names per attempt, the
token Secret owned by its workload, API errors failing one job (never the scheduler), orphans
found by label and deleted after a restart. No cluster, no worker process: the fake API's Job
status stands for what the pods did.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from k8s_fake_api import FakeKubeApi
from manifests import validate_strictly
from trainer_service.jobs import JobService
from trainer_service.k8s_launcher import (ATTEMPT_LABEL, LABEL, MANAGED_BY, K8sSettings, KubernetesLauncher,
                                          manifests, object_name, pod_specs)
from trainer_service.launcher import LaunchError
from trainer_service.spec import Hyperparameters, JobSpec
from trainer_service.store import JobStore

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


def as_pod(pod: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ml"}, "spec": pod}


# -- manifests -------------------------------------------------------------------------------
def test_one_node_is_a_batch_job_with_the_token_in_a_secret(tmp_path):
    d = job_dir(tmp_path)
    secret, work = manifests("20261129-ABC_1", d, "trainer:50051", "s3cret", S, attempt=3)
    name = work["metadata"]["name"]
    assert name.startswith("tw-20261129-abc-1-a3-") and len(name) <= 40 and secret["metadata"]["name"] == name
    assert secret["kind"] == "Secret" and secret["stringData"] == {"token": "s3cret"}
    assert work["apiVersion"] == "batch/v1" and work["kind"] == "Job" and work["metadata"]["namespace"] == "ml"
    assert work["spec"]["backoffLimit"] == 0  # the trainer retries, not Kubernetes
    want = {MANAGED_BY[0]: MANAGED_BY[1], LABEL: "20261129-ABC_1", ATTEMPT_LABEL: "3"}
    for labels in (work["metadata"]["labels"], secret["metadata"]["labels"],
                   work["spec"]["template"]["metadata"]["labels"]):
        assert labels == want
    (pod,) = pod_specs(work)
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "trainer_service.worker", "--job-id", "20261129-ABC_1",
                            "--job-dir", str(d), "--report-address", "trainer:50051"]
    assert "s3cret" not in json.dumps(work)  # the token is only in the Secret
    env = {e["name"]: e for e in c["env"]}
    assert env["TUNEWIRE_JOB_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "token"}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    validate_strictly([secret, work], "batch job")
    # several processes on one node: torchrun --standalone in the one pod, no operator needed
    _, work = manifests("j", job_dir(tmp_path, nproc=4), "t:1", "x", S)
    assert work["kind"] == "Job"
    assert pod_specs(work)[0]["containers"][0]["command"][:5] == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]


def test_names_are_fresh_per_launch_and_valid():
    names = {object_name("20261205-0a1b2c3d4e", 1) for _ in range(20)} | {object_name("20261205-0a1b2c3d4e", 2)}
    assert len(names) == 21  # a retry, or a restart re-running attempt 1, never meets a 409
    long_ids = ["x" * 100 + "A", "x" * 100 + "B"]
    longs = [object_name(i, 12, "abcdef") for i in long_ids]
    assert longs[0] != longs[1] and all(len(n) <= 40 for n in longs)
    import re
    for n in names | set(longs):  # DNS-1123 label and RFC 1035 (TrainJob: starts with a letter)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n), n


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


# The TrainJob fields tunewire sets, by hand against Kubeflow Trainer v2.1's v1alpha1 schema
# (pkg/apis/trainer/v1alpha1/trainjob_types.go; no CRD schema in kubernetes-validate). The core
# types inside (EnvVar, ResourceRequirements, Volume, VolumeMount, Toleration) are validated
# strictly as a Pod built from them.
TRAINJOB_FIELDS = {
    "spec": {"runtimeRef", "initializer", "trainer", "labels", "annotations", "podTemplateOverrides",
             "suspend", "managedBy"},
    "runtimeRef": {"name", "apiGroup", "kind"},
    "trainer": {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"},
    "podTemplateOverride": {"targetJobs", "metadata", "spec"},
    "podTemplateOverride.spec": {"serviceAccountName", "nodeSelector", "affinity", "tolerations", "volumes",
                                 "initContainers", "containers", "schedulingGates", "imagePullSecrets"},
    "containerOverride": {"name", "env", "volumeMounts"},
}


def test_several_nodes_are_a_kubeflow_trainjob(tmp_path):
    d = job_dir(tmp_path, nproc=4)
    secret, work = manifests("j", d, "t:1", "x", S, num_nodes=3, attempt=2)
    assert (work["apiVersion"], work["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec = work["spec"]
    assert set(spec) <= TRAINJOB_FIELDS["spec"] and set(spec["runtimeRef"]) <= TRAINJOB_FIELDS["runtimeRef"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert set(t) <= TRAINJOB_FIELDS["trainer"]
    assert (t["numNodes"], t["numProcPerNode"], t["image"]) == (3, 4, S.image)
    assert t["command"][:5] == ["python", "-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=4"]
    assert "--standalone" not in t["command"]  # the runtime provides the rendezvous (PET_* env)
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    (override,) = spec["podTemplateOverrides"]
    assert set(override) <= TRAINJOB_FIELDS["podTemplateOverride"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert set(override["spec"]) <= TRAINJOB_FIELDS["podTemplateOverride.spec"]
    assert all(set(c) <= TRAINJOB_FIELDS["containerOverride"] and c["name"] == "node"
               for c in override["spec"]["containers"])
    # its pods carry the job's labels (the NetworkPolicies select on them); the token is in the Secret
    assert override["metadata"]["labels"][LABEL] == "j" and override["metadata"]["labels"][ATTEMPT_LABEL] == "2"
    assert "\"x\"" not in json.dumps(work) and secret["stringData"] == {"token": "x"}
    env = {e["name"]: e for e in t["env"]}
    assert env["TUNEWIRE_JOB_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == work["metadata"]["name"]
    (pod,) = pod_specs(work)
    validate_strictly([as_pod(pod), secret], "trainjob pod")
    # by default the node count comes from the job's spec; a namespaced runtime can be named
    s = K8sSettings(training_runtime="tunewire-torch", training_runtime_kind="TrainingRuntime")
    _, from_spec = manifests("j", job_dir(tmp_path, nproc=2, nodes=4), "t:1", "x", s)
    assert from_spec["spec"]["trainer"]["numNodes"] == 4
    assert from_spec["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"


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
            validate_strictly([as_pod(pod)], f"gpu pod {nproc}x{nodes}")
    # a given toleration for the resource is not doubled
    _, work = manifests("j", job_dir(tmp_path), "t:1", "x", S)
    assert len(pod_specs(work)[0]["tolerations"]) == 1
    cpu = K8sSettings()
    for nproc, nodes in ((1, 1), (2, 1), (2, 2)):
        _, work = manifests("j", job_dir(tmp_path, nproc, nodes), "t:1", "x", cpu)
        for pod in pod_specs(work):
            assert "nvidia.com/gpu" not in json.dumps(pod) and "dshm" not in json.dumps(pod)
            assert "tolerations" not in pod


def test_settings_are_checked():
    for bad in ({"image": ""}, {"gpus_per_pod": -1}, {"gpu_resource": "gpu"},
                {"training_runtime_kind": "Runtime"}, {"api_timeout_seconds": 0}):
        with pytest.raises(ValueError):
            K8sSettings(**bad)


# -- the API, at its HTTP edge ---------------------------------------------------------------
@pytest.fixture
def api():
    with FakeKubeApi() as fake:
        yield fake


def launcher(api: FakeKubeApi, host: str | None = None) -> KubernetesLauncher:
    return KubernetesLauncher(K8sSettings(api_timeout_seconds=5, status_error_seconds=1),
                              api_client=api.client(host), poll_seconds=0.02)


async def until(cond, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def service(tmp_path: Path, launch: KubernetesLauncher, max_retries: int = 1) -> JobService:
    models, data = tmp_path / "models", tmp_path / "data"
    (models / "m").mkdir(parents=True, exist_ok=True)
    (models / "m" / "config.json").write_text("{}")
    data.mkdir(exist_ok=True)
    (data / "d.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n"
                                          for i in range(8)))
    return JobService(JobStore(tmp_path / "jobs.sqlite3"), launch, data_dir=tmp_path / "t",
                      adapter_store=tmp_path / "store", data_root=data, model_root=models,
                      report_address="trainer:50051", handoff=None, max_concurrent=1,
                      max_retries=max_retries, cancel_grace_seconds=1)


def spec(name: str, nodes: int = 1) -> JobSpec:
    return JobSpec(base_model="m", training_data="d.jsonl", adapter_name=name,
                   hyperparameters=Hyperparameters(batch_size=2 * nodes, num_nodes=nodes))


def of_job(api: FakeKubeApi, kind: str, job_id: str) -> list[dict]:
    objs = [api.get(kind, n) for n in api.names(kind)]
    return sorted((o for o in objs if o["metadata"].get("labels", {}).get(LABEL) == job_id),
                  key=lambda o: int(o["metadata"]["labels"][ATTEMPT_LABEL]))


def job_name(api: FakeKubeApi, job_id: str) -> str:
    """The name of the job's (first) Job, from the create the fake API recorded."""
    return next(p.rsplit("/", 1)[1] for m, p, _ in api.calls if m == "DELETE" and job_id.lower() in p)


def test_retries_get_new_names_and_the_secret_goes_with_its_workload(tmp_path, api):
    async def main():
        jobs = service(tmp_path, launcher(api))
        await jobs.start()
        a = await jobs.create(spec("a"), None)
        await until(lambda: len(of_job(api, "Secret", a.id)) == 1, "the first launch")  # made last
        first = of_job(api, "Job", a.id)[0]
        secret = api.get("Secret", first["metadata"]["name"])
        # the Secret is owned by its Job (created first), so deleting the Job deletes it
        assert secret["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name":
                                                          first["metadata"]["name"], "uid": first["metadata"]["uid"]}]
        api.set_status("Job", first["metadata"]["name"], {"failed": 1})  # its pod crashed: a retry
        await until(lambda: len(of_job(api, "Secret", a.id)) == 2, "the retry")
        second = of_job(api, "Job", a.id)[1]
        assert second["metadata"]["name"] != first["metadata"]["name"]
        assert second["metadata"]["labels"][ATTEMPT_LABEL] == "2" and jobs.get(a.id).state == "RUNNING"
        assert not [c for c in api.calls if c[2] == 409]  # no launch met a Conflict
        # cancel deletes the workload and, with it, its Secret
        await jobs.cancel(a.id)
        await until(lambda: jobs.get(a.id).state == "CANCELLED", "the cancel")
        assert api.get("Job", second["metadata"]["name"]) is None
        assert api.get("Secret", second["metadata"]["name"]) is None
        await jobs.drain()
    asyncio.run(main())


def test_a_cancel_during_a_slow_launch_stops_what_it_made(tmp_path, api):
    async def main():
        jobs = service(tmp_path, launcher(api))
        release = api.hold("POST", "jobs")  # the API server is slow to create the Job
        await jobs.start()
        a = await jobs.create(spec("a"), None)
        await until(lambda: any(m == "POST" for m, _, _ in api.calls) or jobs.get(a.id).state == "RUNNING",
                    "the launch under way")
        await jobs.cancel(a.id)
        assert jobs.get(a.id).state == "CANCELLING"
        release.set()
        await until(lambda: jobs.get(a.id).state == "CANCELLED", "the cancel")
        await until(lambda: not api.names("Job") and not api.names("Secret"), "the objects' deletion")
        await jobs.drain()
    asyncio.run(main())


def test_an_api_error_fails_that_job_and_the_next_one_launches(tmp_path, api):
    async def main():
        jobs = service(tmp_path, launcher(api))
        api.fail("POST", "jobs", 403, 'jobs.batch is forbidden: User "system:serviceaccount:tunewire:trainer" '
                 'cannot create resource "jobs"')
        api.fail("POST", "secrets", 422, 'Secret "x" is invalid')
        api.fail("POST", "jobs", 500, "etcdserver: request timed out")
        await jobs.start()
        ids = [(await jobs.create(spec(n), None)).id for n in ("a", "b", "c", "d")]
        await until(lambda: len(of_job(api, "Secret", ids[3])) == 1, "the fourth job's launch")
        # a: its Job refused; b: the next Job create meets a 500; c: its Job made, its Secret refused
        for job_id, status, words in ((ids[0], "403", "forbidden"), (ids[1], "500", "timed out"),
                                      (ids[2], "422", "is invalid")):
            job = jobs.get(job_id)
            assert job.state == "FAILED" and job.error["reason"] == "LAUNCH_FAILED", job_id
            assert f"HTTP {status}" in job.error["message"] and words in job.error["message"]
            assert job.error["retryable"]
        # the half-created launch (Job made, Secret refused) left nothing behind
        assert of_job(api, "Job", ids[2]) == [] and of_job(api, "Secret", ids[2]) == []
        assert ("DELETE", f"/apis/batch/v1/namespaces/tunewire/jobs/{job_name(api, ids[2])}", 200) in api.calls
        assert [o["metadata"]["labels"][LABEL] for o in map(lambda n: api.get("Secret", n), api.names("Secret"))] == [ids[3]]
        assert jobs.get(ids[3]).state == "RUNNING"
        await jobs.drain()
    asyncio.run(main())


def test_an_unreachable_api_fails_the_job_not_the_trainer(tmp_path, api):
    async def main():
        dead = FakeKubeApi()
        host = dead.host
        dead.stop()  # its port now refuses connections
        jobs = service(tmp_path, launcher(api, host))
        await jobs.start()
        a = await jobs.create(spec("a"), None)
        await until(lambda: jobs.get(a.id).state == "FAILED", "the failure")
        assert jobs.get(a.id).error["reason"] == "LAUNCH_FAILED"
        assert "refused" in jobs.get(a.id).error["message"].lower()
        b = await jobs.create(spec("b"), None)  # the scheduler still runs
        await until(lambda: jobs.get(b.id).state == "FAILED", "the second failure")
        await jobs.drain()
    asyncio.run(main())


def test_status_errors_are_retried_then_count_as_a_crash(tmp_path, api):
    async def main():
        launch = launcher(api)
        d = job_dir(tmp_path)
        handle = await launch.launch(job_id="j1", job_dir=d, report_address="t:1", token="x", attempt=1)
        api.fail("GET", "jobs", 500, "apiserver hiccup", times=3)
        api.set_status("Job", handle.name, {"succeeded": 1})
        assert await asyncio.wait_for(handle.wait(), 10) == 0  # a few errors: still its true outcome
        handle = await launch.launch(job_id="j2", job_dir=d, report_address="t:1", token="x", attempt=1)
        api.fail("GET", "jobs", 500, "apiserver down", times=10_000)
        assert await asyncio.wait_for(handle.wait(), 10) == 1  # status_error_seconds = 1: crashed
        assert api.get("Job", handle.name) is None  # and its objects are gone
    asyncio.run(main())


def test_a_restarted_trainer_deletes_orphans_by_label_and_relaunches(tmp_path, api):
    async def main():
        jobs = service(tmp_path, launcher(api))
        await jobs.start()
        a = await jobs.create(spec("a", nodes=2), None)  # a TrainJob
        await until(lambda: len(of_job(api, "Secret", a.id)) == 1, "the launch")
        old = of_job(api, "TrainJob", a.id)[0]["metadata"]["name"]
        assert api.get("Secret", old)["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
        # a stray object of another launch (say a trainer that died mid-launch) and one not ours
        (tmp_path / "x").mkdir()
        stray = manifests("20260101-gone", job_dir(tmp_path / "x"), "t:1", "y", K8sSettings(), attempt=4)[1]
        api.add(stray)
        foreign = {"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {"name": "someone-elses", "namespace": "tunewire", "labels": {"app": "x"}},
                   "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}
        api.add(foreign)
        # the trainer dies (no drain: its tasks just stop) while the job runs
        jobs.scheduler._loop.cancel()
        for task in list(jobs.scheduler._exits.values()):
            task.cancel()
        await asyncio.sleep(0)
        assert jobs.get(a.id).state == "RUNNING"
        # a new trainer on the same store and cluster
        again = service(tmp_path, launcher(api))
        await again.start()
        await until(lambda: len(of_job(api, "TrainJob", a.id)) == 1
                    and of_job(api, "TrainJob", a.id)[0]["metadata"]["name"] != old, "the relaunch")
        assert api.get("TrainJob", old) is None and api.get("Secret", old) is None  # found by label, deleted
        assert api.get("Job", stray["metadata"]["name"]) is None
        assert api.get("Job", "someone-elses") is not None  # not ours: untouched
        lists = [p for method, p, _ in api.calls if method == "GET" and p.endswith(("/jobs", "/trainjobs"))]
        assert len(lists) == 4  # each trainer's start: one list per kind, by label (the fake applies it)
        job = again.get(a.id)
        assert job.state == "RUNNING" and job.attempts == 1  # a restart is not the job's failure
        new = of_job(api, "TrainJob", a.id)[0]
        assert new["metadata"]["labels"][ATTEMPT_LABEL] == "1"
        await again.drain()
    asyncio.run(main())


def test_launch_errors_name_the_call(tmp_path, api):
    async def main():
        launch = launcher(api)
        api.fail("POST", "trainjobs", 404, 'the server could not find the requested resource')
        with pytest.raises(LaunchError, match=r"creating TrainJob tw-j-a1-\w+ failed: HTTP 404"):
            await launch.launch(job_id="j", job_dir=job_dir(tmp_path, nodes=2), report_address="t:1",
                                token="x", attempt=1)
    asyncio.run(main())


def test_the_orphan_search_never_stops_a_start(tmp_path, api):
    async def main():
        d = job_dir(tmp_path)
        old = await launcher(api).launch(job_id="j1", job_dir=d, report_address="t:1", token="x", attempt=1)
        api.fail("GET", "jobs", 403, 'jobs.batch is forbidden: cannot list resource "jobs"')
        assert await launcher(api).stop_orphans([]) == []  # logged; the trainer starts anyway
        # without Kubeflow Trainer installed (its API answers 404) the Jobs are still found
        api.fail("GET", "trainjobs", 404, "the server could not find the requested resource")
        assert await launcher(api).stop_orphans([]) == [old.name]
        assert api.names("Job") == [] and api.names("Secret") == []
    asyncio.run(main())
