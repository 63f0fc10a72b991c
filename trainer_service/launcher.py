"""Launchers start a job's training worker somewhere else than the server process.

`LocalLauncher` runs `python -m trainer_service.worker` as a subprocess in its own session (so
cancel can signal the whole process group). The worker finds its spec in the job directory and
reports back to the trainer's `TrainerWorkerService` with the per-job token it gets in its
environment (never on the command line, where `ps` would show it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Protocol


class WorkerHandle(Protocol):
    pid: int

    async def wait(self) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class Launcher(Protocol):
    async def launch(self, *, job_id: str, job_dir: Path, report_address: str,
                     token: str) -> WorkerHandle: ...


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

    def __init__(self, *, threads: int = 0):
        self.threads = threads  # torch threads per worker; 0 = all cores

    async def launch(self, *, job_id: str, job_dir: Path, report_address: str,
                     token: str) -> WorkerHandle:
        env = dict(os.environ, TUNEWIRE_JOB_TOKEN=token, PYTHONUNBUFFERED="1")
        if self.threads:
            env["TUNEWIRE_TRAIN_THREADS"] = str(self.threads)
        log = open(job_dir / "worker.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "trainer_service.worker", "--job-id", job_id,
                "--job-dir", str(job_dir), "--report-address", report_address,
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        finally:
            log.close()
        return _LocalWorker(proc)
