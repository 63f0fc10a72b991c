"""Launchers start a job's training worker somewhere else than the server process.

`LocalLauncher` runs `python -m trainer_service.worker` as a subprocess in its own session (so
cancel can signal the whole process group). The worker finds its spec in the job directory and
reports back to the trainer's `TrainerWorkerService` with the per-job token it gets in its
environment (never on the command line, where `ps` would show it).

A job whose spec asks for `num_processes` > 1 runs under torchrun instead
(`python -m torch.distributed.run --standalone --nproc_per_node N -m trainer_service.worker ...`):
torchrun leads the session and starts one worker per rank, so signalling the group still reaches
every process, and it exits non-zero when any rank fails.

GPUs: the scheduler hands each launch the GPU ids the job may use (`gpus`, from
trainer_service.gpus); the worker's `CUDA_VISIBLE_DEVICES` is set to exactly those, so it sees
them as cuda:0..n-1 and each torchrun rank takes cuda:LOCAL_RANK (tunewire.devices.resolve_device).
`CUDA_DEVICE_ORDER=PCI_BUS_ID` (unless set) makes the ids mean what nvidia-smi lists. CPU jobs
(no ids) share the cores: OMP_NUM_THREADS = threads / ranks, as before.

A launch that cannot start its worker raises (OSError locally, LaunchError from the Kubernetes
launcher): the scheduler fails that job LAUNCH_FAILED with the message and goes on. At start-up
the scheduler hands `stop_orphans` the jobs a dead trainer left running: the local launcher
kills their process groups (if the pid is still theirs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import psutil

from trainer_service.spec import JobSpec
from trainer_service.store import Job

log = logging.getLogger("tunewire.trainer.launcher")


class WorkerHandle(Protocol):
    pid: int

    async def wait(self) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class LaunchError(Exception):
    """The worker could not be started; the message says what refused and why."""


class Launcher(Protocol):
    async def launch(self, *, job_id: str, job_dir: Path, report_address: str,
                     token: str, gpus: tuple[str, ...] = ()) -> WorkerHandle: ...

    async def stop_orphans(self, jobs: Sequence[Job]) -> object:
        """At start-up, before any launch: stops the workers an earlier trainer left behind;
        `jobs` are those the store still held as running (the scheduler re-queues them)."""


class _LocalWorker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.pid = proc.pid

    async def wait(self) -> int:
        return await self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # the worker and anything it started
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class LocalLauncher:
    """One subprocess per job on this machine."""

    multi_node = False  # torchrun --standalone: every process on this machine

    def __init__(self, *, threads: int = 0):
        self.threads = threads  # torch threads per worker; 0 = all cores

    async def launch(self, *, job_id: str, job_dir: Path, report_address: str,
                     token: str, gpus: tuple[str, ...] = ()) -> WorkerHandle:
        n = num_processes(job_dir)
        env = worker_env(token, threads=self.threads, ranks=n, gpus=gpus)
        cmd = ["-m", "trainer_service.worker", "--job-id", job_id, "--job-dir", str(job_dir),
               "--report-address", report_address]
        if n > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *cmd]
        out = open(job_dir / "worker.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True)
        finally:
            out.close()
        return _LocalWorker(proc)

    async def stop_orphans(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            stop_local_orphan(job)


def worker_env(token: str, *, threads: int, ranks: int, gpus: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a local worker: the trainer's, plus its token, its GPUs, its threads."""
    env = dict(os.environ, TUNEWIRE_JOB_TOKEN=token, PYTHONUNBUFFERED="1")
    if threads:
        env["TUNEWIRE_TRAIN_THREADS"] = str(threads)
    if gpus:
        # exactly the job's GPUs: never another job's (the scheduler gives each id to one job)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    elif ranks > 1:
        # A CPU job's threads are shared out among its ranks (the recipe sets the same number).
        env["OMP_NUM_THREADS"] = str(max(1, (threads or os.cpu_count() or 1) // ranks))
    return env


def num_processes(job_dir: Path) -> int:
    """The job's `hyperparameters.num_processes`; 1 when the spec cannot be read (the worker
    then fails on it and says why)."""
    try:
        return JobSpec.from_json((Path(job_dir) / "spec.json").read_text()).hyperparameters.num_processes
    except Exception as e:  # noqa: BLE001 - a bad spec is the worker's to report
        log.warning("cannot read the job's spec: %s", e, extra={"job_dir": str(job_dir)})
        return 1


def stop_local_orphan(job: Job) -> None:
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
