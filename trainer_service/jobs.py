"""Job orchestration: create, schedule, run out of process, record progress, publish, cancel.

`JobService` is the trainer's domain core (no gRPC): the servicers call it, workers' reports reach
it through the worker servicer, and it is the only writer of the `JobStore`. A bounded scheduler
runs at most `max_concurrent` workers through a `Launcher`; when a worker reports success the
adapter is published to the store with a manifest and handed to serving through a `Handoff`.

Lifecycle: QUEUED → RUNNING → PUBLISHING → SUCCEEDED, or FAILED / CANCELLING → CANCELLED.
On shutdown running jobs are stopped and re-queued; on start-up leftovers of a crash are too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


import psutil
from prometheus_client import Counter, Gauge, Histogram

from trainer_service.launcher import Launcher, WorkerHandle
from trainer_service import artifacts, data, publisher
from trainer_service.publisher import Handoff, HandoffError
from trainer_service.spec import METHOD_FORMATS, Hyperparameters, JobSpec
from trainer_service.uploads import Upload
from trainer_service.store import STATES, TERMINAL, Entry, Job, JobStore
from tunewire import paging
from tunewire import reasons as R
from tunewire.errors import TunewireError, invalid

log = logging.getLogger("tunewire.trainer.jobs")

JOBS = Gauge("tunewire_trainer_jobs", "Training jobs by state.", ["state"])
CREATED = Counter("tunewire_trainer_jobs_created_total", "Training jobs created.")
CHECKPOINTS = Counter("tunewire_trainer_checkpoints_total", "Checkpoints saved by workers.")
RESUMES = Counter("tunewire_trainer_resumes_total", "Workers that resumed from a checkpoint.")
RETRIES = Counter("tunewire_trainer_worker_retries_total", "Jobs re-queued after their worker died.")
STEP_SECONDS = Histogram("tunewire_trainer_step_seconds", "Optimizer step time.",
                         buckets=(.01, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64))
PUBLISH_SECONDS = Histogram("tunewire_trainer_publish_seconds",
                            "Adapter publish + serving handoff time.", buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120))
DATASET_FAILURES = Counter("tunewire_trainer_dataset_failures_total",
                           "Jobs failed by their data, by reason.", ["reason"])
STEPS = Counter("tunewire_trainer_steps_total", "Optimizer steps reported by workers.")
LOSS = Gauge("tunewire_trainer_loss", "Training loss at the last step of a running job.", ["job"])
TOKENS_PER_S = Gauge("tunewire_trainer_tokens_per_second",
                     "Real (non-pad) tokens per second at the last step of a running job.", ["job"])


@dataclass
class CheckpointInfo:
    step: int
    metrics: dict[str, float]
    uri: str
    best: bool
    time: float


def _stop_orphan(job: Job) -> None:
    """Kills the process group of a worker left over from a crashed trainer, if it is still ours."""
    if not job.worker_pid:
        return
    try:
        proc = psutil.Process(job.worker_pid)
        if job.id not in " ".join(proc.cmdline()):
            return  # the pid was reused by something else
        os.killpg(job.worker_pid, signal.SIGKILL)
        proc.wait(10)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JobService:
    def __init__(self, store: JobStore, launcher: Launcher, *, data_dir: Path, adapter_store: Path,
                 data_root: Path,
                 model_root: Path = Path("~/.cache/tunewire/models"),
                 report_address: str, handoff: Handoff | None, max_concurrent: int = 1,
                 max_queued: int = 100, max_retries: int = 2, cancel_grace_seconds: float = 10.0,
                 max_upload_bytes: int = 256 << 20, max_dataset_bytes: int = 1 << 30):
        self.store, self.launcher, self.handoff = store, launcher, handoff
        self.data_dir, self.adapter_store = Path(data_dir).resolve(), Path(adapter_store).resolve()
        self.data_root = Path(data_root).resolve()  # datasets may only be read from under here
        self.model_root = Path(model_root).expanduser().resolve()  # and base models from under here
        self.max_dataset_bytes = max_dataset_bytes
        self.report_address = report_address
        self.max_concurrent, self.max_queued, self.max_retries = max_concurrent, max_queued, max_retries
        self.max_upload_bytes = max_upload_bytes
        self._cancel_publish: set[str] = set()   # jobs cancelled while publishing
        self.cancel_grace_seconds = cancel_grace_seconds
        self._workers: dict[str, WorkerHandle] = {}
        self._tokens: dict[str, str] = {}          # job id -> token of the running worker
        self._changed: dict[str, asyncio.Event] = {}
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._draining = False
        self._scheduler: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        for job in self.store.in_states("RUNNING", "PUBLISHING"):
            # The trainer died (kill -9, OOM, node loss) while this job ran. Its worker may still
            # be alive, reporting to nobody: stop it, then resume from the last checkpoint.
            _stop_orphan(job)
            self._event(job.id, "REQUEUED", "the trainer restarted while the job ran; it resumes "
                        "from its last checkpoint")
            self._set_state(job.id, "QUEUED", attempts=max(job.attempts - 1, 0))  # not its fault
        for job in self.store.in_states("CANCELLING"):
            self._set_state(job.id, "CANCELLED", end_time=time.time())
        self._scheduler = asyncio.create_task(self._schedule_loop())
        self._kick.set()

    async def drain(self) -> None:
        """Stops launching; running workers are stopped and their jobs re-queued."""
        self._draining = True
        if self._scheduler:
            self._scheduler.cancel()
        for handle in list(self._workers.values()):
            handle.terminate()
        await self._wait_workers(self.cancel_grace_seconds)

    async def _wait_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._workers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for handle in list(self._workers.values()):
            handle.kill()
        while self._workers:
            await asyncio.sleep(0.05)

    # -- client API ------------------------------------------------------------------------
    async def create(self, spec: JobSpec, request_id: str | None) -> Job:
        spec = await asyncio.to_thread(self._check_inputs, spec)
        if request_id is None or not self.store.find_request(request_id):
            queued = len(self.store.queued())
            if queued >= self.max_queued:
                raise TunewireError(R.QUEUE_FULL, f"{queued} jobs are queued (max_queued_jobs "
                                    f"{self.max_queued}); retry after some finish",
                                    metadata={"queued": str(queued)}, retry_after_s=60)
        job, created = self.store.create(spec.to_json(), "", request_id, spec.priority)
        if created:
            CREATED.inc()
            self._set_state(job.id, "QUEUED")
            self._kick.set()
        return self.get(job.id)

    def _check_inputs(self, spec: JobSpec) -> JobSpec:
        """Create-time checks that need the disk: the base model exists, the data files lie under
        the data root, and the method can learn from the data's format. Returns the spec with the
        data paths resolved."""
        if spec.hyperparameters.num_nodes > 1 and not getattr(self.launcher, "multi_node", False):
            raise TunewireError(R.MULTI_NODE_UNSUPPORTED,
                                "num_nodes > 1 needs the Kubernetes launcher (launcher = \"kubernetes\")",
                                metadata={"num_nodes": str(spec.hyperparameters.num_nodes)})
        base = self.resolve_model(spec.base_model, "training_job.base_model")
        spec = dataclasses.replace(spec, base_model=str(base))
        train = data.resolve_data_path(spec.training_data, self.data_root, "training_job.training_data.path")
        val = (data.resolve_data_path(spec.validation_data, self.data_root, "training_job.validation_data.path")
               if spec.validation_data else "")
        for f, path in (("training_job.training_data.path", train), ("training_job.validation_data.path", val)):
            if path and path.stat().st_size > self.max_dataset_bytes:
                raise TunewireError(R.DATASET_TOO_LARGE, f"{path.name} is over {self.max_dataset_bytes} bytes",
                                    field_violations={f: f"larger than max_dataset_bytes ({self.max_dataset_bytes})"})
        fmt = data.scan_file(train).format
        if fmt and fmt not in METHOD_FORMATS[spec.method]:
            raise TunewireError(
                R.METHOD_DATA_MISMATCH, f"{spec.method} cannot learn from {fmt} rows; it needs "
                f"{' or '.join(METHOD_FORMATS[spec.method])}",
                field_violations={"training_job.training_data.path": f"{fmt} data does not fit {spec.method}"})
        return dataclasses.replace(spec, training_data=str(train), validation_data=str(val) if val else "")

    def resolve_model(self, path: str, field: str) -> Path:
        """A base model directory named in a request, confined to the model root (absolute, or
        relative to the root; symlinks resolved before the check)."""
        if not path:
            raise invalid(field, "is required")
        try:
            real = (self.model_root / Path(path).expanduser()).resolve()
        except (OSError, ValueError, RuntimeError):
            raise invalid(field, f"{path!r} is not a usable path", R.MODEL_PATH_INVALID) from None
        if not real.is_relative_to(self.model_root):
            raise invalid(field, f"{path!r} is outside the model directory", R.MODEL_PATH_INVALID)
        if not (real / "config.json").is_file():
            raise invalid(field, f"no model directory at {path}")
        return real

    def upload(self, filename: str) -> Upload:
        return Upload(self.data_root, filename, self.max_upload_bytes)

    def validate_dataset(self, base_model: str, training_data: str, validation_data: str, *,
                         max_seq_length: int, batch_size: int, num_epochs: int, max_steps: int,
                         measure_step_time: bool = False):
        """The pre-flight report (blocking: run it in a thread). Paths are confined to the data root.
        With measure_step_time a warm-up step is timed in a subprocess (this process loads no model)."""
        from trainer_service import preflight  # tokenizers: loaded only when asked
        from tunewire import loading

        base_model = str(self.resolve_model(base_model, "base_model"))
        train = data.resolve_data_path(training_data, self.data_root, "training_data.path")
        val = data.resolve_data_path(validation_data, self.data_root, "validation_data.path") if validation_data else None
        tokenizer = loading.load_tokenizer(base_model)
        eos = loading.stop_ids(base_model, tokenizer)
        args = dict(validation_path=val, eos_ids=eos, batch_size=batch_size, num_epochs=num_epochs,
                    max_steps=max_steps)
        report = preflight.validate_dataset(train, tokenizer, max_seq_length, **args)
        if not (measure_step_time and report.ok and report.format in METHOD_FORMATS["lora"]):
            return report
        spec = JobSpec(base_model=base_model, training_data=str(train), adapter_name="warmup",
                       hyperparameters=Hyperparameters(batch_size=batch_size, max_seq_length=max_seq_length))
        done = subprocess.run([sys.executable, "-m", "trainer_service.warmup"], input=spec.to_json(),
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise TunewireError(R.WARMUP_FAILED, f"the warm-up step failed: {done.stderr.strip()[-500:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["step_seconds"]
        return preflight.validate_dataset(train, tokenizer, max_seq_length, step_seconds=seconds, **args)

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        return self._with_queue_position([job])[0]

    def list(self, *, state: str | None, page_size: int, page_token: str) -> tuple[list[Job], str]:
        jobs, nxt = self.store.list(state=state, page_size=page_size, page_token=page_token)
        return self._with_queue_position(jobs), nxt

    def _with_queue_position(self, jobs: list[Job]) -> list[Job]:
        if any(j.state == "QUEUED" for j in jobs):
            order = {j.id: i + 1 for i, j in enumerate(self.store.queued())}
            for j in jobs:
                j.progress = {**j.progress, "queue_position": order.get(j.id, 0)}
        return jobs

    async def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.terminal:
            raise TunewireError(R.JOB_ALREADY_TERMINAL, f"job {job_id} is already {job.state}")
        if job.state == "PUBLISHING":  # the publisher finishes the cancel at its next step
            self._cancel_publish.add(job_id)
            self._event(job_id, "CANCEL_REQUESTED", "stopping the publication")
            self._set_state(job_id, "CANCELLING")
        elif job.state == "QUEUED" and job_id not in self._workers:
            self._set_state(job_id, "CANCELLED", end_time=time.time())
        elif job.state != "CANCELLING":
            self._event(job_id, "CANCEL_REQUESTED", "stopping the worker")
            self._set_state(job_id, "CANCELLING")
            handle = self._workers.get(job_id)
            if handle:
                handle.terminate()
                self._spawn(self._kill_after(job_id, handle))
        return self.get(job_id)

    async def _kill_after(self, job_id: str, handle: WorkerHandle) -> None:
        await asyncio.sleep(self.cancel_grace_seconds)
        if self._workers.get(job_id) is handle:
            log.warning("worker ignored SIGTERM; killing", extra={"job": job_id})
            handle.kill()

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Entry]:
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
                return
            await waiter.wait()

    # -- worker reports --------------------------------------------------------------------
    def authenticate(self, job_id: str, token: str) -> Job:
        job = self.store.get(job_id)
        if not token or not hmac.compare_digest(job.token_hash, _hash(token)):
            raise TunewireError(R.WORKER_TOKEN_INVALID, "bad worker token for this job")
        return job

    def report_started(self, job_id: str, *, trainable: int, total: int, total_steps: int, pid: int) -> None:
        self.store.update(job_id, trainable_params=trainable, total_params=total,
                          progress={**self.store.get(job_id).progress, "total_steps": total_steps})
        self._event(job_id, "WORKER_STARTED", f"worker pid {pid} started training",
                    {"trainable_params": str(trainable), "total_params": str(total),
                     "total_steps": str(total_steps), "pid": str(pid)})

    def report_metric(self, job_id: str, point: dict) -> None:
        if point["step"] <= self.store.get(job_id).progress.get("step", 0):
            return  # a resumed worker redoes steps after its checkpoint: they are recorded already
        if point.get("step_seconds"):
            STEP_SECONDS.observe(point["step_seconds"])
        progress = {"step": point["step"], "total_steps": point["total_steps"],
                    "epoch": point["epoch"], "tokens_seen": point["tokens_seen"], "loss": point["loss"],
                    "eta_seconds": point.get("step_seconds", 0.0) * (point["total_steps"] - point["step"])}
        self._append(job_id, "metric", point, progress=progress)
        STEPS.inc()
        LOSS.labels(job_id).set(point["loss"])
        TOKENS_PER_S.labels(job_id).set(point["tokens_per_second"])

    def report_event(self, job_id: str, kind: str, message: str, data: dict,
                     metrics: dict | None = None) -> None:
        self._event(job_id, kind, message, data, metrics)
        if kind == "CHECKPOINT_SAVED":
            CHECKPOINTS.inc()
        elif kind == "RESUMED":
            RESUMES.inc()

    def checkpoints(self, job_id: str, *, page_size: int, page_token: str) -> tuple[list[CheckpointInfo], str]:
        """One page of the job's checkpoints (tunewire/paging.py rules)."""
        return paging.page(self._checkpoints(job_id), page_size, page_token, f"checkpoints/{job_id}")

    def _checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """The job's checkpoints, from its CHECKPOINT_SAVED events; the lowest eval_loss is best."""
        self.store.get(job_id)
        found = [CheckpointInfo(step=int(e.payload["metrics"].get("step", 0)), metrics=e.payload["metrics"],
                                uri=e.payload["data"].get("path", ""), best=False, time=e.time)
                 for e in self._all_history(job_id)
                 if e.kind == "event" and e.payload["type"] == "CHECKPOINT_SAVED"]
        if found:
            best = min(found, key=lambda c: (c.metrics.get("eval_loss", math.inf), c.step))
            best.best = True
        return found

    async def publish_checkpoint(self, job_id: str, step: int) -> dict:
        """Publishes one checkpoint of a finished job (and hands it to serving); returns the result."""
        job = self.store.get(job_id)
        if not job.terminal:
            raise TunewireError(R.JOB_NOT_FINISHED, f"job {job_id} is {job.state}; wait for it to end")
        found = [c for c in self._checkpoints(job_id) if c.step == step]
        if not found:
            raise TunewireError(R.CHECKPOINT_NOT_FOUND, f"job {job_id} has no checkpoint at step {step}")
        if not Path(found[0].uri).is_dir():
            raise TunewireError(R.CHECKPOINT_DELETED, f"the checkpoint at step {step} is no longer on disk")
        state, result, error = await publisher.publish(
            JobSpec.from_json(job.spec), job_id, Path(found[0].uri), found[0].metrics,
            adapter_store=self.adapter_store, handoff=self.handoff,
            emit=lambda kind, msg, data=None, m=None: self._event(job_id, kind, msg, data, m),
            cancelled=lambda: False)
        if error:
            raise error
        self.store.update(job_id, result=result)
        return result

    def _all_history(self, job_id: str) -> list[Entry]:
        out, seq = [], 0
        while batch := self.store.history(job_id, seq):
            out += batch
            seq = batch[-1].seq
        return out

    def report_failed(self, job_id: str, error: dict) -> None:
        if error.get("user_error") and error["reason"].startswith("DATASET"):
            DATASET_FAILURES.labels(error["reason"]).inc()
        if self.store.get(job_id).state in ("RUNNING", "CANCELLING"):
            self._set_state(job_id, "FAILED", error=error, end_time=time.time())

    def report_finished(self, job_id: str, adapter_dir: str, metrics: dict[str, float]) -> None:
        if self.store.get(job_id).state != "RUNNING":  # e.g. CANCELLING: the cancel wins
            return
        job_dir = (self.data_dir / "jobs" / job_id).resolve()
        path = Path(adapter_dir).resolve()
        if job_dir not in path.parents:
            raise TunewireError(R.ADAPTER_DIR_OUTSIDE_JOB, f"{adapter_dir} is outside the job directory")
        self._set_state(job_id, "PUBLISHING")
        self._spawn(self._publish(job_id, path, metrics))

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
                await self._launch(job)

    async def _launch(self, job: Job) -> None:
        job_dir = self.data_dir / "jobs" / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "spec.json").write_text(job.spec)
        # What the worker cannot know by itself: with serving, JSON evals run there after the handoff.
        (job_dir / "worker.json").write_text(json.dumps({"serving": self.handoff is not None}))
        token = secrets.token_urlsafe(32)  # a new token per launch: an orphan's reports bounce
        self.store.update(job.id, token_hash=_hash(token), attempts=job.attempts + 1)
        self._set_state(job.id, "RUNNING", start_time=time.time())
        try:
            handle = await self.launcher.launch(job_id=job.id, job_dir=job_dir,
                                                report_address=self.report_address, token=token)
        except OSError as e:
            self._set_state(job.id, "FAILED", end_time=time.time(),
                            error=TunewireError(R.LAUNCH_FAILED, str(e)).job_error())
            return
        self._workers[job.id] = handle
        self.store.update(job.id, worker_pid=handle.pid)
        self._spawn(self._reap(job.id, handle))

    async def _reap(self, job_id: str, handle: WorkerHandle) -> None:
        rc = await handle.wait()
        del self._workers[job_id]
        state = self.store.get(job_id).state
        if self._draining and state in ("RUNNING", "CANCELLING"):
            if state == "RUNNING":
                self._event(job_id, "REQUEUED", "the trainer is shutting down; the job resumes from "
                            "its last checkpoint when it is back")
                attempts = max(self.store.get(job_id).attempts - 1, 0)  # a shutdown is no failure
                self._set_state(job_id, "QUEUED", attempts=attempts)
            else:
                self._set_state(job_id, "CANCELLED", end_time=time.time())
        elif state == "CANCELLING" and job_id not in self._cancel_publish:  # else the publisher ends it
            self._set_state(job_id, "CANCELLED", end_time=time.time())
        elif state == "RUNNING":  # exited without a final report: crashed or killed
            attempts = self.store.get(job_id).attempts
            if attempts <= self.max_retries:
                RETRIES.inc()
                self._event(job_id, "REQUEUED", f"worker exited with code {rc}; retry {attempts} of "
                            f"{self.max_retries}, resuming from the last checkpoint")
                self._set_state(job_id, "QUEUED")
            else:
                self._set_state(job_id, "FAILED", end_time=time.time(), error=TunewireError(
                    R.WORKER_CRASHED, f"worker exited with code {rc} before finishing, "
                    f"{attempts} attempts; see worker.log").job_error())
        self._kick.set()

    async def _publish(self, job_id: str, artifact: Path, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        try:
            state, result, error = await publisher.publish(
                JobSpec.from_json(self.store.get(job_id).spec), job_id, artifact, metrics,
                adapter_store=self.adapter_store, handoff=self.handoff,
                emit=lambda kind, msg, data=None, m=None: self._event(job_id, kind, msg, data, m),
                cancelled=lambda: job_id in self._cancel_publish)
        except Exception as e:  # noqa: BLE001 - a bug here must fail the job, not leave it PUBLISHING
            log.exception("publishing %s failed", job_id)
            state, result = "FAILED", None
            error = TunewireError(R.PUBLISH_FAILED, f"publishing failed: {type(e).__name__}: {e}")
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        if job_id in self._cancel_publish and state == "SUCCEEDED":
            state = "CANCELLED"
        self._cancel_publish.discard(job_id)
        self._set_state(job_id, state, result=result, error=error and error.job_error(),
                        end_time=time.time())

    def _append(self, job_id: str, kind: str, payload: dict, **fields) -> Entry:
        entry = self.store.append(job_id, kind, payload, **fields)
        ev = self._changed.pop(job_id, None)  # wake watchers; the next wait uses a fresh Event
        if ev:
            ev.set()
        return entry

    def _set_state(self, job_id: str, state: str, *, error: dict | None = None, **fields) -> None:
        self._append(job_id, "state", {"state": state, "error": error}, state=state, error=error, **fields)
        if state in TERMINAL or state == "QUEUED":
            for gauge in (LOSS, TOKENS_PER_S):  # keep per-job labels to running jobs only
                try:
                    gauge.remove(job_id)
                except KeyError:
                    pass
        self._update_state_gauge()
        if state in TERMINAL:  # metrics.csv and loss_curve.png beside the job's other files
            entries = self._all_history(job_id)
            self._spawn(asyncio.to_thread(artifacts.write_job_artifacts, entries,
                                          self.data_dir / "jobs" / job_id, f"trainingJobs/{job_id}"))
        log.info("job state", extra={"job": job_id, "state": state,
                                     "reason": (error or {}).get("reason", "")})

    def _update_state_gauge(self) -> None:
        counts = self.store.count_by_state()
        for st in STATES:
            JOBS.labels(st).set(counts.get(st, 0))

    def _event(self, job_id: str, kind: str, message: str, data: dict | None = None,
               metrics: dict | None = None) -> None:
        payload = {"type": kind, "message": message, "data": data or {}}
        if metrics:
            payload["metrics"] = metrics
        self._append(job_id, "event", payload)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["Handoff", "HandoffError", "JobService", "TERMINAL"]  # re-exported for the server
