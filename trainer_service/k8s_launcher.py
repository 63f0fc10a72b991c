"""Kubernetes launcher: each launch of a training job becomes Kubernetes objects instead of a local process.

    launcher = KubernetesLauncher(K8sSettings(namespace="tunewire", image="ghcr.io/acme/tunewire:cpu"))

What the objects are (a batch/v1 Job, or a Kubeflow Trainer v2 TrainJob across nodes, plus a
Secret with the job's report token) is k8s_manifests'; this module makes the API calls, through
the official `kubernetes` client (imported lazily: nothing needs it unless this launcher is used).
The pods run `python -m trainer_service.worker` like the local launcher and report to the
trainer's `TrainerWorkerService` over gRPC with the per-job token.

Retries and restarts:
- Every launch gets fresh names (k8s_manifests.object_name), so a retry or a restarted trainer
  never meets a 409 Conflict from an earlier attempt's objects.
- The workload is created first, then its Secret with an ownerReference to the workload's uid:
  deleting the workload (cancel, TTL, kubectl) deletes the Secret too. The pods cannot start
  before the Secret exists (their env refers to it; the kubelet retries), so the order is
  race-free. If the Secret cannot be created, the workload is deleted again.
- Any API failure of a launch (403, 409, 422, 500, connection refused, timeout) is a LaunchError
  naming the call, the HTTP status and the API's message: the scheduler fails that job
  LAUNCH_FAILED and goes on.
- `stop_orphans` (trainer start-up) lists the Jobs and TrainJobs labelled managed-by=tunewire
  and deletes every one this trainer did not launch: the scheduler re-queues the jobs that were
  running, to resume from their last checkpoint under new names (no re-adoption: the old pods
  reported to the trainer that died, with tokens of a launch the new trainer does not watch).
- Status polling survives API hiccups: a status that cannot be read is retried, and only after
  `status_error_seconds` of failures does the worker count as crashed (and its objects deleted).

Shared storage: the job directory (spec, checkpoints, worker.log) must be on a volume that the
trainer and the worker pods both mount at the same path (`data_pvc`, ReadWriteMany), and so
must the adapter store and the model cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from trainer_service.k8s_manifests import (  # noqa: F401 - re-exported: the launcher's vocabulary
    ATTEMPT_LABEL, LABEL, MANAGED_BY, TRAINJOB, K8sSettings, batch_job, manifests, object_name,
    owner_reference, pod_specs, token_secret, train_job)
from trainer_service.launcher import LaunchError

log = logging.getLogger("tunewire.trainer.k8s")


def describe(e: BaseException) -> str:
    """An API failure in one line: HTTP status, reason and the API's own message when it has one."""
    status = getattr(e, "status", None)
    if status is not None and hasattr(e, "body"):  # kubernetes.client.exceptions.ApiException
        message = ""
        try:
            message = json.loads(e.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = str(e.body or "")[:200]
        return f"HTTP {status} {e.reason or ''}: {message}".strip().rstrip(":")
    return f"{type(e).__name__}: {e}"[:300]  # no HTTP answer at all (refused, timed out, DNS)


class _K8sWorker:
    """A WorkerHandle over one launch's workload: wait() polls its status; terminate/kill delete it."""

    pid = 0  # no local process: orphans after a trainer restart are found by label

    def __init__(self, launcher: KubernetesLauncher, name: str, kind: str):
        self.launcher, self.name, self.kind = launcher, name, kind

    async def wait(self) -> int:
        failing_since = None
        try:
            while True:
                try:
                    status = await asyncio.to_thread(self.launcher.status, self.name, self.kind)
                    failing_since = None
                except Exception as e:  # noqa: BLE001 - the API, not the job: retry for a while
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.launcher.s.status_error_seconds:
                        log.error("status of %s unreadable for %.0f s: %s; counting it as crashed",
                                  self.name, self.launcher.s.status_error_seconds, describe(e))
                        await asyncio.to_thread(self.launcher.delete_quietly, self.name, self.kind, 0)
                        return 1
                    log.warning("status of %s: %s; retrying", self.name, describe(e))
                    status = None
                if status is not None:
                    return status
                await asyncio.sleep(self.launcher.poll_seconds)
        finally:
            self.launcher.live.discard(self.name)

    def terminate(self) -> None:
        self._delete(30)

    def kill(self) -> None:
        self._delete(0)

    def _delete(self, grace_seconds: int) -> None:
        """Deletes in a thread: an API call must not block the trainer's event loop (wait() sees
        the object gone and returns)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.launcher.delete_quietly(self.name, self.kind, grace_seconds)
            return
        loop.run_in_executor(None, self.launcher.delete_quietly, self.name, self.kind, grace_seconds)


class KubernetesLauncher:
    """Launcher protocol on a cluster (in-cluster config, else ~/.kube/config, else `api_client`)."""

    multi_node = True        # num_nodes > 1 becomes a TrainJob across pods
    numbers_attempts = True  # launch() takes attempt=N: it is in the objects' names and labels

    def __init__(self, settings: K8sSettings, *, poll_seconds: float = 5.0, api_client=None):
        self.s, self.poll_seconds = settings, poll_seconds
        from kubernetes import client, config  # the optional `kubernetes` package

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.core, self.batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.live: set[str] = set()  # names of the workloads this trainer launched and still watches

    # -- launch ----------------------------------------------------------------------------
    async def launch(self, *, job_id: str, job_dir: Path, report_address: str, token: str,
                     gpus: tuple[str, ...] = (), attempt: int = 1) -> _K8sWorker:
        secret, work = manifests(job_id, job_dir, report_address, token, self.s, attempt=attempt)
        name, kind = work["metadata"]["name"], work["kind"]
        try:
            created = await asyncio.to_thread(self._create_work, work)
        except Exception as e:  # noqa: BLE001 - every API failure fails this launch, clearly
            raise LaunchError(f"creating {kind} {name} failed: {describe(e)}") from e
        self.live.add(name)
        try:
            secret["metadata"]["ownerReferences"] = [owner_reference(work, created["metadata"]["uid"])]
            await asyncio.to_thread(self.core.create_namespaced_secret, self.s.namespace, secret,
                                    _request_timeout=self.s.api_timeout_seconds)
        except Exception as e:  # noqa: BLE001 - undo the half-created launch
            self.live.discard(name)
            await asyncio.to_thread(self.delete_quietly, name, kind, 0)
            raise LaunchError(f"creating Secret {name} failed: {describe(e)}; {kind} {name} "
                              f"deleted again") from e
        log.info("created %s %s", kind, name, extra={"job": job_id, "attempt": attempt})
        return _K8sWorker(self, name, kind)

    def _create_work(self, work: dict) -> dict:
        """Creates the workload; returns it as the API answered (with its uid) as a dict."""
        t = self.s.api_timeout_seconds
        if work["kind"] == "Job":
            made = self.batch.create_namespaced_job(self.s.namespace, work, _request_timeout=t)
            return self.batch.api_client.sanitize_for_serialization(made)
        return self.custom.create_namespaced_custom_object(*TRAINJOB[:2], self.s.namespace, TRAINJOB[2],
                                                           work, _request_timeout=t)

    # -- status and deletion ---------------------------------------------------------------
    def status(self, name: str, kind: str) -> int | None:
        """None while running; 0 on success; 1 on failure or when the object is gone. Other API
        errors raise (the handle retries them)."""
        from kubernetes.client.exceptions import ApiException

        t = self.s.api_timeout_seconds
        try:
            if kind == "Job":
                st = self.batch.read_namespaced_job_status(name, self.s.namespace, _request_timeout=t).status
                return None if st is None else 0 if st.succeeded else (1 if st.failed else None)
            obj = self.custom.get_namespaced_custom_object_status(*TRAINJOB[:2], self.s.namespace,
                                                                  TRAINJOB[2], name, _request_timeout=t)
        except ApiException as e:
            if e.status == 404:
                return 1  # deleted (cancelled, or by hand) under us
            raise
        done = {c["type"]: c["status"] == "True" for c in (obj.get("status") or {}).get("conditions", [])}
        return 0 if done.get("Complete") else (1 if done.get("Failed") else None)

    def delete(self, name: str, kind: str, *, grace_seconds: int) -> None:
        """Deletes the workload (foreground: its pods go first) and its Secret; gone is fine."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        ns, t = self.s.namespace, self.s.api_timeout_seconds
        body = client.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=grace_seconds)
        calls = [(lambda: self.batch.delete_namespaced_job(name, ns, body=body, _request_timeout=t))
                 if kind == "Job" else
                 (lambda: self.custom.delete_namespaced_custom_object(*TRAINJOB[:2], ns, TRAINJOB[2], name,
                                                                      body=body, _request_timeout=t)),
                 # owned by the workload, so the garbage collector would delete it too; sooner here
                 lambda: self.core.delete_namespaced_secret(name, ns, _request_timeout=t)]
        for call in calls:
            try:
                call()
            except ApiException as e:
                if e.status != 404:
                    raise

    def delete_quietly(self, name: str, kind: str, grace_seconds: int) -> None:
        """delete(), logging instead of raising: cancel and clean-up paths must not crash."""
        try:
            self.delete(name, kind, grace_seconds=grace_seconds)
        except Exception as e:  # noqa: BLE001
            log.error("deleting %s %s failed: %s", kind, name, describe(e))

    # -- after a restart -------------------------------------------------------------------
    def list_managed(self) -> list[tuple[str, str, dict]]:
        """(kind, name, labels) of every Job and TrainJob labelled managed-by=tunewire here."""
        from kubernetes.client.exceptions import ApiException

        selector, t = f"{MANAGED_BY[0]}={MANAGED_BY[1]}", self.s.api_timeout_seconds
        found = [("Job", j.metadata.name, j.metadata.labels or {}) for j in
                 self.batch.list_namespaced_job(self.s.namespace, label_selector=selector,
                                                _request_timeout=t).items]
        try:
            objs = self.custom.list_namespaced_custom_object(*TRAINJOB[:2], self.s.namespace, TRAINJOB[2],
                                                             label_selector=selector, _request_timeout=t)
        except ApiException as e:
            if e.status != 404:  # 404: Kubeflow Trainer is not installed, so there are none
                raise
            objs = {"items": []}
        found += [("TrainJob", o["metadata"]["name"], o["metadata"].get("labels") or {})
                  for o in objs.get("items", [])]
        return found

    async def stop_orphans(self, jobs: Sequence) -> list[str]:
        """Deletes every tunewire workload in the namespace that this trainer is not watching
        (at start-up: all of them; `jobs`, those the store held as running, are re-queued by the
        scheduler). Returns the deleted names. API errors are logged, never raised: the trainer
        starts anyway, and a later launch uses fresh names."""
        try:
            found = await asyncio.to_thread(self.list_managed)
        except Exception as e:  # noqa: BLE001
            log.error("cannot list orphaned training objects: %s", describe(e))
            return []
        running = {j.id for j in jobs}
        deleted = []
        for kind, name, lab in found:
            if name in self.live:
                continue
            job = lab.get(LABEL, "")
            log.warning("deleting orphaned %s %s (job %s, attempt %s%s)", kind, name, job,
                        lab.get(ATTEMPT_LABEL, "?"), ", re-queued" if job in running else "")
            await asyncio.to_thread(self.delete_quietly, name, kind, 0)
            deleted.append(name)
        return deleted
