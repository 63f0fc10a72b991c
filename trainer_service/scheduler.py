"""The worker lifecycle: queued jobs → launched workers → their reports → exit, retry or re-queue.

`Scheduler` runs at most `max_concurrent` workers through a `Launcher` (higher priority first,
then older), each launch with a new token, so the reports of an orphan from an earlier launch
bounce. Workers report over TrainerWorkerService (the servicer calls the `report_*` methods
after `authenticate`); a finished report hands the artifact to `Results` for publishing. A
worker that exits without a final report crashed: its job is re-queued, and its next worker
resumes from the last checkpoint, up to `max_retries` times, then FAILED WORKER_CRASHED.

On start-up the leftovers of a trainer that died (kill -9, OOM, node loss) are re-queued, their
orphaned workers stopped first; on drain (SIGTERM) running workers are stopped and their jobs
re-queued, to resume when the trainer is back. Neither counts as one of the job's attempts.

GPUs (local launcher, `GpuSettings.accounting`): each launch takes `job_gpus(num_processes)`
free GPU ids, which the launcher makes the worker's CUDA_VISIBLE_DEVICES, and gets them back
when the worker exits, whatever the way (finished, crashed, cancelled, drained, failed to
launch): no GPU ever runs two jobs. Strict priority order, no backfill: when the job at the head
of the queue needs more GPUs than are free, it and every job behind it wait (QUEUED, with their
queue_position), even a smaller one that would fit, so a big job is never starved by a stream
of small ones. A job that needs more GPUs than the pool has is refused at create (jobs.py).

Lifecycle: QUEUED → RUNNING → PUBLISHING → SUCCEEDED, or FAILED / CANCELLING → CANCELLED.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from pathlib import Path

from prometheus_client import Counter

from trainer_service.gpus import GpuSettings
from trainer_service.journal import Journal
from trainer_service.launcher import Launcher, WorkerHandle, stop_local_orphan
from trainer_service.spec import JobSpec
from trainer_service.results import Results
from trainer_service.store import Job
from tunewire import reasons as R
from tunewire.errors import TunewireError

log = logging.getLogger("tunewire.trainer.scheduler")

CHECKPOINTS = Counter("tunewire_trainer_checkpoints_total", "Checkpoints saved by workers.")
RESUMES = Counter("tunewire_trainer_resumes_total", "Workers that resumed from a checkpoint.")
RETRIES = Counter("tunewire_trainer_worker_retries_total", "Jobs re-queued after their worker died.")
DATASET_FAILURES = Counter("tunewire_trainer_dataset_failures_total",
                           "Jobs failed by their data, by reason.", ["reason"])


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# compared against for a report of an unknown job, so that it costs what a known one does
_NO_JOB_HASH = token_hash("")


class Scheduler:
    def __init__(self, journal: Journal, launcher: Launcher, results: Results, *,
                 report_address: str, serving: bool, max_concurrent: int = 1, max_retries: int = 2,
                 cancel_grace_seconds: float = 10.0, gpus: GpuSettings = GpuSettings()):
        self.journal, self.store, self.launcher, self.results = journal, journal.store, launcher, results
        self.report_address = report_address
        self.serving = serving  # with serving, JSON evals run there after the handoff
        self.max_concurrent, self.max_retries = max_concurrent, max_retries
        self.cancel_grace_seconds = cancel_grace_seconds
        self.gpus = gpus
        self._held: dict[str, tuple[str, ...]] = {}  # job id -> the GPU ids its worker has
        self._workers: dict[str, WorkerHandle] = {}
        self._exits: dict[str, asyncio.Task] = {}   # job id -> the task that waits for its worker
        self._kick = asyncio.Event()
        self._draining = False
        self._loop: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        orphans = self.store.in_states("RUNNING", "PUBLISHING")
        # The trainer died while these jobs ran. Their workers may still be alive, reporting to
        # nobody: the launcher stops them (local: the process groups; kubernetes: every object
        # it finds by label), then the jobs resume from their last checkpoint.
        stop = getattr(self.launcher, "stop_orphans", None)
        if stop:
            await stop(orphans)
        else:  # a launcher without the hook: its workers are local processes, if anything
            for job in orphans:
                stop_local_orphan(job)
        for job in orphans:
            self.journal.event(job.id, "REQUEUED", "the trainer restarted while the job ran; it "
                               "resumes from its last checkpoint")
            self.journal.set_state(job.id, "QUEUED", attempts=max(job.attempts - 1, 0))  # not its fault
        for job in self.store.in_states("CANCELLING"):
            self.journal.set_state(job.id, "CANCELLED", end_time=time.time())
        self._loop = asyncio.create_task(self._schedule_loop())
        self.kick()

    async def drain(self) -> None:
        """Stops launching; running workers are stopped and their jobs re-queued."""
        self._draining = True
        if self._loop:
            self._loop.cancel()
        for handle in list(self._workers.values()):
            handle.terminate()
        exits = set(self._exits.values())
        if exits:
            _, late = await asyncio.wait(exits, timeout=self.cancel_grace_seconds)
            for handle in list(self._workers.values()):
                handle.kill()
            if late:
                await asyncio.wait(late)

    def kick(self) -> None:
        """Something changed that may let a queued job start."""
        self._kick.set()

    def running(self, job_id: str) -> bool:
        return job_id in self._workers

    def free_gpus(self) -> list[str]:
        """GPU ids no worker holds, in the pool's order."""
        held = {g for ids in self._held.values() for g in ids}
        return [g for g in self.gpus.pool if g not in held]

    def held_gpus(self, job_id: str) -> tuple[str, ...]:
        return self._held.get(job_id, ())

    def stop_worker(self, job_id: str) -> None:
        """SIGTERM to the job's worker, SIGKILL if it is still there after the grace period."""
        handle = self._workers.get(job_id)
        if handle:
            handle.terminate()
            self.journal.spawn(self._kill_after(handle, self._exits[job_id]))

    async def _kill_after(self, handle: WorkerHandle, exited: asyncio.Task) -> None:
        done, _ = await asyncio.wait({exited}, timeout=self.cancel_grace_seconds)
        if not done:
            log.warning("worker ignored SIGTERM; killing", extra={"pid": handle.pid})
            handle.kill()

    # -- worker reports --------------------------------------------------------------------
    def authenticate(self, job_id: str, token: str) -> Job:
        """The job a report is for, if `token` is its current worker's. An unknown job gets the
        same answer as a bad token (same code, reason, message, and a hash compare all the
        same), so a caller without a token cannot probe which job ids exist."""
        try:
            job: Job | None = self.store.get(job_id)
        except TunewireError as e:
            if e.reason != R.JOB_NOT_FOUND:
                raise
            job = None
        expected = job.token_hash if job else _NO_JOB_HASH
        if not (hmac.compare_digest(expected, token_hash(token)) and token and job):
            raise TunewireError(R.WORKER_TOKEN_INVALID, "bad worker token for this job")
        return job

    def report_started(self, job_id: str, *, trainable: int, total: int, total_steps: int,
                       pid: int) -> None:
        self.store.update(job_id, trainable_params=trainable, total_params=total,
                          progress={**self.store.get(job_id).progress, "total_steps": total_steps})
        self.journal.event(job_id, "WORKER_STARTED", f"worker pid {pid} started training",
                           {"trainable_params": str(trainable), "total_params": str(total),
                            "total_steps": str(total_steps), "pid": str(pid)})

    def report_metric(self, job_id: str, point: dict) -> None:
        if point["step"] <= self.store.get(job_id).progress.get("step", 0):
            return  # a resumed worker redoes steps after its checkpoint: they are recorded already
        remaining = point["total_steps"] - point["step"]
        self.journal.metric(job_id, point, progress={
            "step": point["step"], "total_steps": point["total_steps"], "epoch": point["epoch"],
            "tokens_seen": point["tokens_seen"], "loss": point["loss"],
            "eta_seconds": point.get("step_seconds", 0.0) * remaining})

    def report_event(self, job_id: str, kind: str, message: str, data: dict,
                     metrics: dict | None = None) -> None:
        self.journal.event(job_id, kind, message, data, metrics)
        if kind == "CHECKPOINT_SAVED":
            CHECKPOINTS.inc()
        elif kind == "RESUMED":
            RESUMES.inc()

    def report_failed(self, job_id: str, error: dict) -> None:
        if error.get("user_error") and error["reason"].startswith("DATASET"):
            DATASET_FAILURES.labels(error["reason"]).inc()
        if self.store.get(job_id).state in ("RUNNING", "CANCELLING"):
            self.journal.set_state(job_id, "FAILED", error=error, end_time=time.time())

    def report_finished(self, job_id: str, adapter_dir: str, metrics: dict[str, float]) -> None:
        if self.store.get(job_id).state != "RUNNING":  # e.g. CANCELLING: the cancel wins
            return
        job_dir = (self.journal.jobs_dir / job_id).resolve()
        path = Path(adapter_dir).resolve()
        if job_dir not in path.parents:
            raise TunewireError(R.ADAPTER_DIR_OUTSIDE_JOB, f"{adapter_dir} is outside the job directory")
        self.journal.set_state(job_id, "PUBLISHING")
        self.results.publish(job_id, path, metrics)

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.get(job_id).state == "CANCELLING" or self._draining

    # -- internals -------------------------------------------------------------------------
    async def _schedule_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            for job in self.store.queued():
                if len(self._workers) >= self.max_concurrent or self._draining:
                    break
                gpus: tuple[str, ...] = ()
                if self.gpus.accounting:
                    free = self.free_gpus()
                    need = self.gpus.job_gpus(_num_processes(job))
                    if need > len(free):
                        break  # no backfill: the jobs behind wait too (module docstring)
                    gpus = tuple(free[:need])
                await self._launch(job, gpus)

    async def _launch(self, job: Job, gpus: tuple[str, ...] = ()) -> None:
        job_dir = self.journal.jobs_dir / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "spec.json").write_text(job.spec)
        # What the worker cannot know by itself: with serving, JSON evals run there after the handoff.
        # ... and the device setting, which the worker resolves (tunewire.devices.resolve_device).
        # A publish_only job is never handed to serving, so its worker runs the JSON eval itself.
        serving = self.serving and not JobSpec.from_json(job.spec).publish_only
        (job_dir / "worker.json").write_text(json.dumps({"serving": serving,
                                                         "device": self.gpus.device}))
        token = secrets.token_urlsafe(32)  # a new token per launch: an orphan's reports bounce
        self.store.update(job.id, token_hash=token_hash(token), attempts=job.attempts + 1)
        self.journal.set_state(job.id, "RUNNING", start_time=time.time())
        if gpus:
            self._held[job.id] = gpus  # taken before the first await: the next launch sees them
            log.info("GPUs assigned", extra={"job": job.id, "gpus": ",".join(gpus)})
        extra: dict = {"gpus": gpus} if gpus else {}
        if getattr(self.launcher, "numbers_attempts", False):
            extra["attempt"] = job.attempts + 1  # in the Kubernetes objects' names and labels
        try:
            handle = await self.launcher.launch(job_id=job.id, job_dir=job_dir,
                                                report_address=self.report_address, token=token, **extra)
        except Exception as e:  # noqa: BLE001 - any launcher failure fails this job, not the loop
            self._held.pop(job.id, None)
            log.error("launch failed: %s", e, extra={"job": job.id})
            self.journal.set_state(job.id, "FAILED", end_time=time.time(),
                                   error=TunewireError(R.LAUNCH_FAILED, str(e) or type(e).__name__).job_error())
            return
        except BaseException:
            self._held.pop(job.id, None)
            raise
        self._workers[job.id] = handle
        self.store.update(job.id, worker_pid=handle.pid)
        self._exits[job.id] = self.journal.spawn(self._reap(job.id, handle))
        if self.store.get(job.id).state == "CANCELLING":  # cancelled while the launch was under way
            self.stop_worker(job.id)

    async def _reap(self, job_id: str, handle: WorkerHandle) -> None:
        try:
            rc = await handle.wait()
        finally:
            self._held.pop(job_id, None)  # the worker is gone: its GPUs are free again
        del self._workers[job_id]
        self._exits.pop(job_id, None)
        state = self.store.get(job_id).state
        if self._draining and state in ("RUNNING", "CANCELLING"):
            if state == "RUNNING":
                self.journal.event(job_id, "REQUEUED", "the trainer is shutting down; the job "
                                   "resumes from its last checkpoint when it is back")
                attempts = max(self.store.get(job_id).attempts - 1, 0)  # a shutdown is no failure
                self.journal.set_state(job_id, "QUEUED", attempts=attempts)
            else:
                self.journal.set_state(job_id, "CANCELLED", end_time=time.time())
        elif state == "CANCELLING" and not self.results.cancelling(job_id):  # else the publisher ends it
            self.journal.set_state(job_id, "CANCELLED", end_time=time.time())
        elif state == "RUNNING":  # exited without a final report: crashed or killed
            attempts = self.store.get(job_id).attempts
            if attempts <= self.max_retries:
                RETRIES.inc()
                self.journal.event(job_id, "REQUEUED", f"worker exited with code {rc}; retry "
                                   f"{attempts} of {self.max_retries}, resuming from the last "
                                   f"checkpoint")
                self.journal.set_state(job_id, "QUEUED")
            else:
                self.journal.set_state(job_id, "FAILED", end_time=time.time(), error=TunewireError(
                    R.WORKER_CRASHED, f"worker exited with code {rc} before finishing, "
                    f"{attempts} attempts; see worker.log").job_error())
        self.kick()


def _num_processes(job: Job) -> int:
    """The job's ranks (a spec that cannot be read is the worker's to report: 1)."""
    try:
        return JobSpec.from_json(job.spec).hyperparameters.num_processes
    except Exception:  # noqa: BLE001
        return 1
