"""A job's journal: the one writer of the JobStore's history, and what each entry sets off.

Every state change, metric point and event of a job is appended here; the store gives it the
job's next `seq` in the same transaction (what makes WatchTrainingJob's replay exact).
Appending also keeps the job gauges of /metrics current, wakes the job's WatchTrainingJob
streams, and when the job reaches a terminal state writes its metrics.csv and loss_curve.png
(trainer_service.artifacts) into its directory. A stream ends after the terminal state and after
those files are written, so a client that saw the end can read them.

    journal = Journal(store, jobs_dir=Path("var/trainer/jobs"))
    journal.set_state(job_id, "RUNNING", start_time=time.time())
    journal.event(job_id, "REQUEUED", "the trainer restarted while the job ran")
    async for entry in journal.watch(job_id, after_seq=0): ...

The scheduler (workers), the results (publishing) and the client API (jobs.py) all record
through one Journal, which also keeps the background tasks they start (`spawn`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from trainer_service import artifacts
from trainer_service.store import STATES, TERMINAL, Entry, JobStore

log = logging.getLogger("tunewire.trainer.jobs")

JOBS = Gauge("tunewire_trainer_jobs", "Training jobs by state.", ["state"])
STEPS = Counter("tunewire_trainer_steps_total", "Optimizer steps reported by workers.")
STEP_SECONDS = Histogram("tunewire_trainer_step_seconds", "Optimizer step time.",
                         buckets=(.01, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64))
LOSS = Gauge("tunewire_trainer_loss", "Training loss at the last step of a running job.", ["job"])
TOKENS_PER_S = Gauge("tunewire_trainer_tokens_per_second",
                     "Real (non-pad) tokens per second at the last step of a running job.", ["job"])
# Per running job like the two above (the series goes when the job stops running, so the label
# set stays bounded by max_concurrent_jobs); 0 on a CPU. With several ranks, rank 0's reading.
PEAK_GPU_MEMORY = Gauge("tunewire_trainer_peak_gpu_memory_bytes",
                        "Peak GPU memory allocated by a running job's worker so far (0 on a CPU).", ["job"])
MFU = Gauge("tunewire_trainer_mfu", "Model FLOPs utilisation at the last step of a running job: "
            "achieved / the GPU's peak FLOP/s (0 on a CPU).", ["job"])
RUNNING_GAUGES = (LOSS, TOKENS_PER_S, PEAK_GPU_MEMORY, MFU)


class Journal:
    def __init__(self, store: JobStore, jobs_dir: Path):
        self.store, self.jobs_dir = store, Path(jobs_dir)
        self._changed: dict[str, asyncio.Event] = {}   # job id -> set when its history grows
        self._files: dict[str, asyncio.Task] = {}      # job id -> its artifacts being written
        self._tasks: set[asyncio.Task] = set()

    def append(self, job_id: str, kind: str, payload: dict, **fields) -> Entry:
        """Adds a history entry (and sets job columns `fields` in the same transaction)."""
        entry = self.store.append(job_id, kind, payload, **fields)
        ev = self._changed.pop(job_id, None)  # wake watchers; the next wait uses a fresh Event
        if ev:
            ev.set()
        return entry

    def set_state(self, job_id: str, state: str, *, error: dict | None = None, **fields) -> None:
        self.append(job_id, "state", {"state": state, "error": error}, state=state, error=error,
                    **fields)
        if state in TERMINAL or state == "QUEUED":
            for gauge in RUNNING_GAUGES:  # keep per-job labels to running jobs only
                try:
                    gauge.remove(job_id)
                except KeyError:
                    pass
        counts = self.store.count_by_state()
        for st in STATES:
            JOBS.labels(st).set(counts.get(st, 0))
        if state in TERMINAL:  # metrics.csv and loss_curve.png beside the job's other files
            files = self.spawn(asyncio.to_thread(artifacts.write_job_artifacts, self.entries(job_id),
                                                 self.jobs_dir / job_id, f"trainingJobs/{job_id}"))
            self._files[job_id] = files
            files.add_done_callback(lambda _: self._files.pop(job_id, None))
        log.info("job state", extra={"job": job_id, "state": state,
                                     "reason": (error or {}).get("reason", "")})

    def event(self, job_id: str, kind: str, message: str, data: dict | None = None,
              metrics: dict | None = None) -> None:
        payload = {"type": kind, "message": message, "data": data or {}}
        if metrics:
            payload["metrics"] = metrics
        self.append(job_id, "event", payload)

    def metric(self, job_id: str, point: dict, progress: dict) -> None:
        """A worker's step: the metric point, the job's progress, and the step gauges."""
        if point.get("step_seconds"):
            STEP_SECONDS.observe(point["step_seconds"])
        self.append(job_id, "metric", point, progress=progress)
        STEPS.inc()
        LOSS.labels(job_id).set(point["loss"])
        TOKENS_PER_S.labels(job_id).set(point["tokens_per_second"])
        PEAK_GPU_MEMORY.labels(job_id).set(point.get("peak_gpu_memory_bytes", 0))
        MFU.labels(job_id).set(point.get("mfu", 0.0))

    def entries(self, job_id: str) -> list[Entry]:
        """The job's whole history, oldest first."""
        out, seq = [], 0
        while batch := self.store.history(job_id, seq):
            out += batch
            seq = batch[-1].seq
        return out

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Entry]:
        """The job's history after `after_seq`, then each new entry as it is appended; ends
        after the terminal state, once the job's metrics.csv and loss curve are written."""
        self.store.get(job_id)  # NOT_FOUND before the stream starts
        seq = after_seq
        while True:
            waiter = self._changed.setdefault(job_id, asyncio.Event())
            entries = self.store.history(job_id, seq)
            for e in entries:
                yield e
                seq = e.seq
            if entries:
                continue
            job = self.store.get(job_id)
            if job.terminal and seq >= job.last_seq:
                if files := self._files.get(job_id):
                    await asyncio.wait({files})  # its own failure is logged, not the stream's
                return
            await waiter.wait()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Runs `coro` in the background, kept referenced until done; a failure is logged."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
