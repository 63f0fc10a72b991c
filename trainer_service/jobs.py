"""The trainer's client API, free of gRPC: create, get, list, cancel and watch jobs, validate and
upload datasets, list and publish checkpoints.

`JobService` is what TrainerService's servicer calls. It checks a request against the disk
(base models under model_root, data files under data_root, the method against the data's row
format), records through the `Journal`, and leaves the rest to the parts it puts together:

    Scheduler  queued jobs → launched workers → their reports → exit, retry or re-queue
    Results    publishing a worker's artifact (or a checkpoint chosen later), the checkpoints
    Journal    the one writer of the job store: history, gauges, watchers, per-job files

    jobs = JobService(JobStore("var/trainer/jobs.sqlite3"), LocalLauncher(), data_dir=...,
                      adapter_store=..., data_root=..., report_address="127.0.0.1:50051",
                      handoff=None)
    await jobs.start()                  # recovers what a crashed trainer left, starts scheduling
    job = await jobs.create(spec, request_id=None)
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import Counter

from trainer_service import preflight
from trainer_service.data_paths import resolve_data_path
from trainer_service.data_rows import scan_file
from trainer_service.gpus import GpuSettings
from trainer_service.journal import Journal
from trainer_service.launcher import Launcher
from trainer_service.publisher import Handoff
from trainer_service.results import CheckpointInfo, Results
from trainer_service.scheduler import Scheduler
from trainer_service.serving_check import CapabilitySource, check_job
from trainer_service.spec import METHOD_FORMATS, Hyperparameters, JobSpec
from trainer_service.store import Entry, Job, JobStore
from trainer_service.uploads import Upload
from tunewire import loading
from tunewire import reasons as R
from tunewire.errors import TunewireError, invalid

CREATED = Counter("tunewire_trainer_jobs_created_total", "Training jobs created.")
TRAIN_FIELD, VALIDATION_FIELD = "training_job.training_data.path", "training_job.validation_data.path"


class JobService:
    def __init__(self, store: JobStore, launcher: Launcher, *, data_dir: Path, adapter_store: Path,
                 data_root: Path, model_root: Path = Path("~/.cache/tunewire/models"),
                 report_address: str, handoff: Handoff | None, max_concurrent: int = 1,
                 max_queued: int = 100, max_retries: int = 2, cancel_grace_seconds: float = 10.0,
                 max_upload_bytes: int = 256 << 20, max_dataset_bytes: int = 1 << 30,
                 gpus: GpuSettings = GpuSettings()):
        self.store, self.launcher = store, launcher
        self.data_root = Path(data_root).resolve()  # datasets may only be read from under here
        self.model_root = Path(model_root).expanduser().resolve()  # and base models from under here
        self.max_queued, self.max_upload_bytes = max_queued, max_upload_bytes
        self.max_dataset_bytes = max_dataset_bytes
        self.gpus = gpus  # the device setting and the GPUs jobs get (trainer_service.gpus)
        self.journal = Journal(store, Path(data_dir).resolve() / "jobs")
        self.results = Results(self.journal, adapter_store=adapter_store, handoff=handoff)
        # LoRA jobs are checked against serving at create: ServingHandoff is also a CapabilitySource
        self.serving: CapabilitySource | None = handoff
        self.scheduler = Scheduler(self.journal, launcher, self.results, report_address=report_address,
                                   serving=handoff is not None, max_concurrent=max_concurrent,
                                   max_retries=max_retries, cancel_grace_seconds=cancel_grace_seconds,
                                   gpus=gpus)

    async def start(self) -> None:
        await self.scheduler.start()

    async def drain(self) -> None:
        """Stops launching; running workers are stopped and their jobs re-queued."""
        await self.scheduler.drain()

    # -- jobs ------------------------------------------------------------------------------
    async def create(self, spec: JobSpec, request_id: str | None) -> Job:
        spec = await asyncio.to_thread(self._check_inputs, spec)
        if request_id is None or not self.store.find_request(request_id):
            await self._check_serving(spec)
            queued = len(self.store.queued())
            if queued >= self.max_queued:
                raise TunewireError(R.QUEUE_FULL, f"{queued} jobs are queued (max_queued_jobs "
                                    f"{self.max_queued}); retry after some finish",
                                    metadata={"queued": str(queued)}, retry_after_s=60)
        job, created = self.store.create(spec.to_json(), "", request_id, spec.priority)
        if created:
            CREATED.inc()
            self.journal.set_state(job.id, "QUEUED")
            self.scheduler.kick()
        return self.get(job.id)

    async def _check_serving(self, spec: JobSpec) -> None:
        """A LoRA job whose adapter serving could not load is refused now, not after training:
        INCOMPATIBLE_WITH_SERVING, or SERVING_UNAVAILABLE when serving does not answer
        (trainer_service.serving_check). Without serving, or publish_only, nothing to check."""
        if self.serving is None or spec.method != "lora" or spec.publish_only:
            return
        caps = await self.serving.capabilities()
        await asyncio.to_thread(check_job, spec, caps)

    def _check_inputs(self, spec: JobSpec) -> JobSpec:
        """Create-time checks that need the disk: the base model exists, the data files lie under
        the data root, and the method can learn from the data's format. Returns the spec with the
        paths resolved."""
        if spec.hyperparameters.num_nodes > 1 and not getattr(self.launcher, "multi_node", False):
            raise TunewireError(R.MULTI_NODE_UNSUPPORTED, "num_nodes > 1 needs the Kubernetes "
                                "launcher (launcher = \"kubernetes\")",
                                metadata={"num_nodes": str(spec.hyperparameters.num_nodes)})
        self._check_device(spec.hyperparameters)
        base = self.resolve_model(spec.base_model, "training_job.base_model")
        train = resolve_data_path(spec.training_data, self.data_root, TRAIN_FIELD)
        val = (resolve_data_path(spec.validation_data, self.data_root, VALIDATION_FIELD)
               if spec.validation_data else None)
        for f, path in ((TRAIN_FIELD, train), (VALIDATION_FIELD, val)):
            if path and path.stat().st_size > self.max_dataset_bytes:
                raise TunewireError(R.DATASET_TOO_LARGE, f"{path.name} is over {self.max_dataset_bytes} "
                                    f"bytes", field_violations={
                                        f: f"larger than max_dataset_bytes ({self.max_dataset_bytes})"})
        fmt = scan_file(train).format
        if fmt and fmt not in METHOD_FORMATS[spec.method]:
            raise TunewireError(
                R.METHOD_DATA_MISMATCH, f"{spec.method} cannot learn from {fmt} rows; it needs "
                f"{' or '.join(METHOD_FORMATS[spec.method])}",
                field_violations={TRAIN_FIELD: f"{fmt} data does not fit {spec.method}"})
        return dataclasses.replace(spec, base_model=str(base), training_data=str(train),
                                   validation_data=str(val) if val else "")

    def _check_device(self, h: Hyperparameters) -> None:
        """What the jobs' device cannot do is refused here, not after a queue wait: QLoRA without
        bitsandbytes or a CUDA GPU, fp16 or device = "cuda" without a GPU, more GPUs than exist."""
        field = "training_job.hyperparameters."
        no_gpu = self.gpus.unavailable()
        if h.quantization == "nf4":
            why = []
            if importlib.util.find_spec("bitsandbytes") is None:  # found, not imported
                why.append("bitsandbytes is not installed (pip install 'tunewire[qlora]' where the "
                           "workers run)")
            if no_gpu:
                why.append(f"the workers get no CUDA GPU: {no_gpu}")
            if why:
                raise TunewireError(R.QUANTIZATION_UNAVAILABLE, "quantization = nf4 (QLoRA) cannot "
                                    "run here: " + "; ".join(why), field_violations={
                                        field + "quantization": "nf4 needs bitsandbytes and a CUDA GPU"})
        if no_gpu and (h.precision == "fp16" or self.gpus.device == "cuda"):
            what = "precision fp16" if h.precision == "fp16" else 'the trainer\'s device = "cuda"'
            raise TunewireError(R.DEVICE_UNAVAILABLE, f"{what} needs a CUDA GPU, and {no_gpu}; "
                                "fp32 or bf16 train on a CPU", metadata={"precision": h.precision})
        if self.gpus.accounting:
            need, have = self.gpus.job_gpus(h.num_processes), len(self.gpus.pool)
            if need > have:
                raise TunewireError(R.DEVICE_UNAVAILABLE, f"the job needs {need} GPUs (num_processes "
                                    f"{h.num_processes}, gpus_per_job {self.gpus.per_job}) and the "
                                    f"trainer has {have}; lower num_processes",
                                    metadata={"gpus_needed": str(need), "gpus": str(have)})

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
        try:
            found = (real / "config.json").is_file()
        except OSError:  # e.g. ENAMETOOLONG: is_file only swallows "not there"
            raise invalid(field, f"{path[:200]!r} is not a usable path", R.MODEL_PATH_INVALID) from None
        if not found:
            raise invalid(field, f"no model directory at {path}")
        return real

    def get(self, job_id: str) -> Job:
        return self._with_queue_position([self.store.get(job_id)])[0]

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
            self.results.cancel(job_id)
            self.journal.event(job_id, "CANCEL_REQUESTED", "stopping the publication")
            self.journal.set_state(job_id, "CANCELLING")
        elif job.state == "QUEUED" and not self.scheduler.running(job_id):
            self.journal.set_state(job_id, "CANCELLED", end_time=time.time())
        elif job.state != "CANCELLING":
            self.journal.event(job_id, "CANCEL_REQUESTED", "stopping the worker")
            self.journal.set_state(job_id, "CANCELLING")
            self.scheduler.stop_worker(job_id)
        return self.get(job_id)

    def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Entry]:
        return self.journal.watch(job_id, after_seq)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoints(self, job_id: str, *, page_size: int,
                    page_token: str) -> tuple[list[CheckpointInfo], str]:
        return self.results.checkpoints(job_id, page_size=page_size, page_token=page_token)

    async def publish_checkpoint(self, job_id: str, step: int) -> dict:
        return await self.results.publish_checkpoint(job_id, step)

    # -- datasets --------------------------------------------------------------------------
    def upload(self, filename: str) -> Upload:
        return Upload(self.data_root, filename, self.max_upload_bytes)

    def _warmup_device(self) -> tuple[str, dict | None]:
        """Where the timed warm-up step runs: with GPU accounting, on a GPU no job holds (not
        reserved: a job launched meanwhile may share it for those seconds), else on the CPU
        rather than on a GPU a running job owns; without accounting, the trainer's device."""
        if not self.gpus.accounting:
            return self.gpus.device, None
        free = self.scheduler.free_gpus()
        if not free:
            return "cpu", None
        return self.gpus.device, dict(os.environ, CUDA_VISIBLE_DEVICES=free[0])

    def validate_dataset(self, base_model: str, training_data: str, validation_data: str, *,
                         max_seq_length: int, batch_size: int, num_epochs: int, max_steps: int,
                         measure_step_time: bool = False) -> preflight.DatasetReport:
        """The pre-flight report (blocking: run it in a thread). Paths are confined to the data
        root. With measure_step_time a warm-up step is timed in a subprocess
        (trainer_service.warmup: this process loads no model)."""
        base_model = str(self.resolve_model(base_model, "base_model"))
        train = resolve_data_path(training_data, self.data_root, "training_data.path")
        val = (resolve_data_path(validation_data, self.data_root, "validation_data.path")
               if validation_data else None)
        tokenizer = loading.load_tokenizer(base_model)
        eos = loading.stop_ids(base_model, tokenizer)
        args = dict(validation_path=val, eos_ids=eos, batch_size=batch_size, num_epochs=num_epochs,
                    max_steps=max_steps)
        report = preflight.validate_dataset(train, tokenizer, max_seq_length, **args)
        if not (measure_step_time and report.ok and report.format in METHOD_FORMATS["lora"]):
            return report
        spec = JobSpec(base_model=base_model, training_data=str(train), adapter_name="warmup",
                       hyperparameters=Hyperparameters(batch_size=batch_size,
                                                       max_seq_length=max_seq_length))
        device, env = self._warmup_device()
        done = subprocess.run([sys.executable, "-m", "trainer_service.warmup", "--device", device],
                              input=spec.to_json(), capture_output=True, text=True, timeout=900,
                              env=env)
        if done.returncode != 0:
            raise TunewireError(R.WARMUP_FAILED, f"the warm-up step failed: {done.stderr.strip()[-500:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["step_seconds"]
        return preflight.validate_dataset(train, tokenizer, max_seq_length, step_seconds=seconds, **args)
