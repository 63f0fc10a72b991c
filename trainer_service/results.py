"""A job's result: publishing what its worker produced, its checkpoints, and publishing one later.

When a worker reports its artifact the job is PUBLISHING and `Results.publish` runs
trainer_service.publisher (adapter store, handoff to serving, JSON evals) in the background; the
job then ends SUCCEEDED or FAILED with the publisher's result or error, or CANCELLED when it was
cancelled meanwhile (the publisher skips the handoff then). `checkpoints` lists a job's
checkpoints from its CHECKPOINT_SAVED events (the lowest eval_loss is the best) and
`publish_checkpoint` publishes one of a finished job as its adapter's next version.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Histogram

from trainer_service import publisher
from trainer_service.journal import Journal
from trainer_service.publisher import Handoff
from trainer_service.spec import JobSpec
from tunewire import paging
from tunewire import reasons as R
from tunewire.errors import TunewireError

log = logging.getLogger("tunewire.trainer.results")

PUBLISH_SECONDS = Histogram("tunewire_trainer_publish_seconds",
                            "Adapter publish + serving handoff time.",
                            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120))


@dataclass
class CheckpointInfo:
    step: int
    metrics: dict[str, float]
    uri: str
    best: bool
    time: float


class Results:
    def __init__(self, journal: Journal, *, adapter_store: Path, handoff: Handoff | None):
        self.journal, self.handoff = journal, handoff
        self.adapter_store = Path(adapter_store).resolve()
        self._cancelled: set[str] = set()  # jobs cancelled while publishing

    def publish(self, job_id: str, artifact: Path, metrics: dict[str, float]) -> None:
        """Publishes a PUBLISHING job's artifact in the background and ends the job."""
        self.journal.spawn(self._publish(job_id, artifact, metrics))

    def cancel(self, job_id: str) -> None:
        """The job is cancelled while publishing: no handoff, and it ends CANCELLED."""
        self._cancelled.add(job_id)

    def cancelling(self, job_id: str) -> bool:
        """Whether a cancel of this job is the publisher's to finish."""
        return job_id in self._cancelled

    async def _publish(self, job_id: str, artifact: Path, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        try:
            state, result, error = await publisher.publish(
                JobSpec.from_json(self.journal.store.get(job_id).spec), job_id, artifact, metrics,
                adapter_store=self.adapter_store, handoff=self.handoff,
                emit=functools.partial(self.journal.event, job_id),
                cancelled=lambda: job_id in self._cancelled)
        except Exception as e:  # noqa: BLE001 - a bug here must fail the job, not leave it PUBLISHING
            log.exception("publishing %s failed", job_id)
            state, result = "FAILED", None
            error = TunewireError(R.PUBLISH_FAILED, f"publishing failed: {type(e).__name__}: {e}")
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        if job_id in self._cancelled and state == "SUCCEEDED":
            state = "CANCELLED"
        self._cancelled.discard(job_id)
        self.journal.set_state(job_id, state, result=result, error=error and error.job_error(),
                               end_time=time.time())

    def checkpoints(self, job_id: str, *, page_size: int,
                    page_token: str) -> tuple[list[CheckpointInfo], str]:
        """One page of the job's checkpoints (tunewire/paging.py rules)."""
        return paging.page(self._checkpoints(job_id), page_size, page_token, f"checkpoints/{job_id}")

    def _checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """The job's checkpoints, from its CHECKPOINT_SAVED events; the lowest eval_loss is best."""
        self.journal.store.get(job_id)
        found = [CheckpointInfo(step=int(e.payload["metrics"].get("step", 0)),
                                metrics=e.payload["metrics"], uri=e.payload["data"].get("path", ""),
                                best=False, time=e.time)
                 for e in self.journal.entries(job_id)
                 if e.kind == "event" and e.payload["type"] == "CHECKPOINT_SAVED"]
        if found:
            best = min(found, key=lambda c: (c.metrics.get("eval_loss", math.inf), c.step))
            best.best = True
        return found

    async def publish_checkpoint(self, job_id: str, step: int) -> dict:
        """Publishes one checkpoint of a finished job (and hands it to serving); returns the
        result, which becomes the job's."""
        job = self.journal.store.get(job_id)
        if not job.terminal:
            raise TunewireError(R.JOB_NOT_FINISHED, f"job {job_id} is {job.state}; wait for it to end")
        found = [c for c in self._checkpoints(job_id) if c.step == step]
        if not found:
            raise TunewireError(R.CHECKPOINT_NOT_FOUND, f"job {job_id} has no checkpoint at step {step}")
        if not Path(found[0].uri).is_dir():
            raise TunewireError(R.CHECKPOINT_DELETED, f"the checkpoint at step {step} is no longer on disk")
        _, result, error = await publisher.publish(
            JobSpec.from_json(job.spec), job_id, Path(found[0].uri), found[0].metrics,
            adapter_store=self.adapter_store, handoff=self.handoff,
            emit=functools.partial(self.journal.event, job_id), cancelled=lambda: False)
        if error:
            raise error
        self.journal.store.update(job_id, result=result)
        return result
