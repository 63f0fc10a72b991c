"""GPUs per job: the scheduler's GPU accounting, the worker's CUDA_VISIBLE_DEVICES, and the
create-time refusals of what the jobs' device cannot do (QLoRA, fp16, too many GPUs).

The device count is the only thing faked: `trainer_service.gpus.visible_gpus` says which GPU ids
exist. The JobService, Scheduler, Journal and store are real; the launcher at the edge is one
these tests control (its "workers" exit when told to), and builds each worker's environment
with the LocalLauncher's own `worker_env`. The refusals go through the real gRPC servicer and
its error mapping, on an in-process server. No model is loaded and nothing trains.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from trainer_service import gpus as gpus_mod
from trainer_service.config import TrainerConfig
from trainer_service.jobs import JobService
from trainer_service.launcher import worker_env
from trainer_service.servicer import TrainerServicer
from trainer_service.spec import Hyperparameters, JobSpec
from trainer_service.store import JobStore
from tunewire.grpc_util import ServerInterceptor
from tunewire.status import error_info
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.timeout(60)


class Worker:
    """A launched worker that exits when the test says so (or when it is stopped)."""

    def __init__(self, job_id: str, gpus: tuple[str, ...], env: dict[str, str], pid: int):
        self.job_id, self.gpus, self.env, self.pid = job_id, gpus, env, pid
        self._rc: asyncio.Future = asyncio.get_running_loop().create_future()

    def exit(self, rc: int) -> None:
        if not self._rc.done():
            self._rc.set_result(rc)

    async def wait(self) -> int:
        return await self._rc

    def terminate(self) -> None:
        self.exit(-15)

    def kill(self) -> None:
        self.exit(-9)


class EdgeLauncher:
    """The Launcher protocol, recording each launch; `fail` makes the next launch raise OSError."""

    def __init__(self):
        self.launches: asyncio.Queue[Worker] = asyncio.Queue()
        self.fail = False

    async def launch(self, *, job_id, job_dir, report_address, token, gpus=()):
        if self.fail:
            self.fail = False
            raise OSError("no such file: python")
        n = JobSpec.from_json((Path(job_dir) / "spec.json").read_text()).hyperparameters.num_processes
        w = Worker(job_id, gpus, worker_env(token, threads=0, ranks=n, gpus=gpus), 1000 + self.launches.qsize())
        self.launches.put_nowait(w)
        return w

    async def next(self) -> Worker:
        return await asyncio.wait_for(self.launches.get(), 10)


async def settle() -> None:
    """Lets the scheduler's loop run to quiescence (no I/O waits on its path: the launcher and
    the store are synchronous)."""
    for _ in range(50):
        await asyncio.sleep(0)


def setup(tmp_path: Path, monkeypatch, visible: list[str], **cfg):
    monkeypatch.setattr(gpus_mod, "visible_gpus", lambda device="auto": [] if device == "cpu" else list(visible))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    models, data = tmp_path / "models", tmp_path / "data"
    (models / "m").mkdir(parents=True)
    (models / "m" / "config.json").write_text("{}")
    data.mkdir(parents=True)
    (data / "d.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n"
                                          for i in range(8)))
    config = TrainerConfig(**cfg)
    launcher = EdgeLauncher()
    jobs = JobService(JobStore(tmp_path / "jobs.sqlite3"), launcher, data_dir=tmp_path / "t",
                      adapter_store=tmp_path / "store", data_root=data, model_root=models,
                      report_address="127.0.0.1:1", handoff=None, max_concurrent=config.max_concurrent_jobs,
                      max_retries=0, cancel_grace_seconds=1, gpus=gpus_mod.gpu_settings(config))
    return jobs, launcher


def spec(name: str, *, nproc: int = 1, priority: int = 0, **h) -> JobSpec:
    return JobSpec(base_model="m", training_data="d.jsonl", adapter_name=name, priority=priority,
                   hyperparameters=Hyperparameters(batch_size=2 * nproc, num_processes=nproc, **h))


def state(jobs: JobService, job_id: str) -> tuple[str, int]:
    job = jobs.get(job_id)
    return job.state, job.progress.get("queue_position", 0)


def test_two_gpus_two_jobs_then_the_queue_waits_for_free_ones(tmp_path, monkeypatch):
    async def main():
        jobs, launcher = setup(tmp_path, monkeypatch, ["0", "1"], max_concurrent_jobs=4)
        await jobs.start()
        a = await jobs.create(spec("a"), None)
        wa = await launcher.next()
        b = await jobs.create(spec("b"), None)
        wb = await launcher.next()
        # two 1-GPU jobs at once, each on its own GPU, and its worker sees only that one
        assert (wa.job_id, wb.job_id) == (a.id, b.id)
        assert (wa.gpus, wb.gpus) == (("0",), ("1",))
        assert (wa.env["CUDA_VISIBLE_DEVICES"], wb.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
        assert "OMP_NUM_THREADS" not in wa.env  # thread sharing is for CPU jobs
        worker_json = json.loads((tmp_path / "t" / "jobs" / a.id / "worker.json").read_text())
        assert worker_json == {"serving": False, "device": "auto"}

        # a third waits, first in the queue, until a GPU is free; a crash frees it
        c = await jobs.create(spec("c"), None)
        await settle()
        assert launcher.launches.empty() and state(jobs, c.id) == ("QUEUED", 1)
        wa.exit(1)
        wc = await launcher.next()
        assert wc.job_id == c.id and wc.gpus == ("0",)
        assert jobs.get(a.id).state == "FAILED" and jobs.get(a.id).error["reason"] == "WORKER_CRASHED"

        # a 2-process job waits for two free GPUs; the smaller job behind it waits too (no
        # backfill), though one GPU is free after the cancel of b
        d = await jobs.create(spec("d", nproc=2), None)
        e = await jobs.create(spec("e"), None)
        await jobs.cancel(b.id)
        await settle()
        assert jobs.get(b.id).state == "CANCELLED"
        assert jobs.scheduler.free_gpus() == ["1"]
        assert launcher.launches.empty()
        assert (state(jobs, d.id), state(jobs, e.id)) == (("QUEUED", 1), ("QUEUED", 2))
        await jobs.cancel(c.id)
        wd = await launcher.next()
        assert wd.job_id == d.id and wd.gpus == ("0", "1") and wd.env["CUDA_VISIBLE_DEVICES"] == "0,1"
        await settle()
        assert launcher.launches.empty() and state(jobs, e.id) == ("QUEUED", 1)
        wd.exit(0)  # gone without a final report: a crash too; both GPUs come back
        we = await launcher.next()
        assert we.job_id == e.id and we.gpus == ("0",)
        # drain stops the worker and frees its GPU; the job is re-queued for later
        await jobs.drain()
        assert jobs.scheduler.free_gpus() == ["0", "1"] and jobs.get(e.id).state == "QUEUED"

    asyncio.run(main())


def test_priority_order_and_launch_failure_free_the_gpus(tmp_path, monkeypatch):
    async def main():
        jobs, launcher = setup(tmp_path, monkeypatch, ["0", "1"], max_concurrent_jobs=4, gpus_per_job=2)
        await jobs.start()
        a = await jobs.create(spec("a"), None)
        wa = await launcher.next()
        assert wa.gpus == ("0", "1")  # gpus_per_job = 2 reserves two for a 1-process job
        low = await jobs.create(spec("low"), None)
        high = await jobs.create(spec("high", priority=5), None)
        await settle()
        assert (state(jobs, high.id), state(jobs, low.id)) == (("QUEUED", 1), ("QUEUED", 2))
        launcher.fail = True
        wa.exit(1)
        # high's launch fails (FAILED LAUNCH_FAILED) and gives its GPUs back: low gets them
        wl = await launcher.next()
        assert wl.job_id == low.id and wl.gpus == ("0", "1")
        assert jobs.get(high.id).state == "FAILED" and jobs.get(high.id).error["reason"] == "LAUNCH_FAILED"
        assert jobs.scheduler.held_gpus(high.id) == ()
        wl.exit(1)
        await settle()
        assert jobs.scheduler.free_gpus() == ["0", "1"]
        await jobs.drain()

    asyncio.run(main())


@pytest.mark.parametrize("visible,device", [(["0", "1"], "cpu"), ([], "auto")])
def test_cpu_mode_is_unchanged(tmp_path, monkeypatch, visible, device):
    """device = "cpu" (GPUs or not) or no GPU at all: no accounting, no CUDA_VISIBLE_DEVICES set,
    the ranks share the cores as before, max_concurrent_jobs is the only limit."""
    async def main():
        jobs, launcher = setup(tmp_path, monkeypatch, visible, max_concurrent_jobs=2, device=device)
        assert not jobs.gpus.accounting
        await jobs.start()
        a = await jobs.create(spec("a", nproc=2), None)
        b = await jobs.create(spec("b", nproc=2), None)
        wa, wb = await launcher.next(), await launcher.next()
        assert wa.gpus == wb.gpus == ()
        assert "CUDA_VISIBLE_DEVICES" not in wa.env
        assert wa.env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
        c = await jobs.create(spec("c"), None)
        await settle()
        assert state(jobs, c.id) == ("QUEUED", 1)
        worker_json = json.loads((tmp_path / "t" / "jobs" / a.id / "worker.json").read_text())
        assert worker_json["device"] == device
        wa.exit(1)
        assert (await launcher.next()).job_id == c.id
        assert jobs.get(b.id).state == "RUNNING"
        await jobs.drain()

    asyncio.run(main())


def test_worker_sees_exactly_its_gpus():
    """The environment the LocalLauncher gives a real subprocess."""
    env = worker_env("tok", threads=0, ranks=2, gpus=("1", "3"))
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'],"
                          " os.environ['CUDA_DEVICE_ORDER'], os.environ['TUNEWIRE_JOB_TOKEN'])"],
                         env=env, capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["1,3", "PCI_BUS_ID", "tok"]


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,-1,7")
    assert gpus_mod.visible_gpus() == ["2", "5"]  # CUDA stops at the first invalid id
    assert gpus_mod.visible_gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus_mod.visible_gpus() == []


def test_gpus_setting_picks_visible_ones(monkeypatch):
    monkeypatch.setattr(gpus_mod, "visible_gpus", lambda device="auto": ["0", "1", "2", "3"])
    assert gpus_mod.gpu_settings(TrainerConfig(gpus="3,1")).pool == ("3", "1")
    assert gpus_mod.gpu_settings(TrainerConfig()).pool == ("0", "1", "2", "3")
    with pytest.raises(ValueError, match="7 not visible"):
        gpus_mod.gpu_settings(TrainerConfig(gpus="1,7"))
    k8s = gpus_mod.gpu_settings(TrainerConfig(launcher="kubernetes", k8s_gpus_per_pod=1))
    assert not k8s.accounting and k8s.unavailable() == ""


# -- create-time refusals, through the gRPC servicer ----------------------------------------
def _proto(**h) -> tpb.TrainingJob:
    return tpb.TrainingJob(base_model="m", adapter_name="x", training_data=tpb.DatasetRef(path="d.jsonl"),
                           lora=tpb.LoraMethod(r=4), hyperparameters=tpb.Hyperparameters(**h))


async def _create_error(jobs: JobService, job: tpb.TrainingJob):
    server = grpc.aio.server(interceptors=[ServerInterceptor()])
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(jobs), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job), timeout=20)
    finally:
        await server.stop(0)
    return e.value.code(), error_info(e.value)[0], e.value.details()


@pytest.mark.parametrize("cfg", [{}, {"device": "cpu"}, {"launcher": "kubernetes"}])
def test_qlora_and_fp16_are_refused_without_a_gpu(tmp_path, monkeypatch, cfg):
    """This machine: no GPU (nor bitsandbytes, unless installed): nf4 is INVALID_ARGUMENT
    QUANTIZATION_UNAVAILABLE saying why and how; fp16 is FAILED_PRECONDITION DEVICE_UNAVAILABLE."""
    async def main():
        jobs, _ = setup(tmp_path, monkeypatch, [], **cfg)
        code, reason, msg = await _create_error(jobs, _proto(batch_size=2, quantization=tpb.QUANTIZATION_NF4))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "QUANTIZATION_UNAVAILABLE")
        assert ("k8s_gpus_per_pod" if cfg.get("launcher") else "GPU") in msg
        if importlib.util.find_spec("bitsandbytes") is None:
            assert "pip install 'tunewire[qlora]'" in msg
        code, reason, msg = await _create_error(jobs, _proto(batch_size=2, precision=tpb.PRECISION_FP16))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_UNAVAILABLE")
        assert "fp16" in msg
        assert jobs.store.queued() == []

    asyncio.run(main())


def test_more_gpus_than_exist_or_cuda_without_gpus_are_refused(tmp_path, monkeypatch):
    async def main():
        jobs, _ = setup(tmp_path, monkeypatch, ["0", "1"])
        code, reason, msg = await _create_error(jobs, _proto(batch_size=3, num_processes=3))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_UNAVAILABLE")
        assert "needs 3 GPUs" in msg and "has 2" in msg
        jobs, _ = setup(tmp_path / "2", monkeypatch, [], device="cuda")
        code, reason, _ = await _create_error(jobs, _proto(batch_size=2))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_UNAVAILABLE")

    asyncio.run(main())


def test_the_warmup_step_times_on_a_free_gpu_or_else_the_cpu(tmp_path, monkeypatch):
    """ValidateDataset's warm-up subprocess never lands on a GPU a running job holds."""
    async def main():
        jobs, launcher = setup(tmp_path, monkeypatch, ["0", "1"], max_concurrent_jobs=4)
        await jobs.start()
        assert jobs._warmup_device()[1]["CUDA_VISIBLE_DEVICES"] == "0"
        await jobs.create(spec("a"), None)
        await launcher.next()
        device, env = jobs._warmup_device()
        assert (device, env["CUDA_VISIBLE_DEVICES"]) == ("auto", "1")
        await jobs.create(spec("b"), None)
        await launcher.next()
        assert jobs._warmup_device() == ("cpu", None)  # both GPUs held
        await jobs.drain()

    asyncio.run(main())
    cpu_jobs, _ = setup(tmp_path / "cpu", monkeypatch, [], device="cpu")
    assert cpu_jobs._warmup_device() == ("cpu", None)
