"""Crash safety for real: kill -9 of a worker and of the trainer itself mid-job. The job resumes
from its last checkpoint, the stream's seq stays gapless and every step is reported exactly once,
and a RESUMED event shows the probe loss before and after."""

from __future__ import annotations

import json
import os
import signal

import grpc
import psutil
import pytest

from harness import is_metric, start_service, states, wait_for, watch_all, worker_pids
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 24


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"answer {i % 5}"}) + "\n"
                            for i in range(32)))
    return path


def _job(model, data, max_steps=STEPS):
    return tpb.TrainingJob(
        base_model=str(model), adapter_name="crash", training_data=tpb.DatasetRef(path=str(data)),
        lora=tpb.LoraMethod(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        eval=tpb.EvalSettings(eval_every_steps=4, early_stopping_patience=0),
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=max_steps, batch_size=4,
                                            max_seq_length=32))


def _start(tmp_path, *extra):
    svc = start_service("trainer", tmp_path, "--data-root", str(tmp_path), "--data-dir", str(tmp_path / "t"), "--adapter-store",
                        str(tmp_path / "store"), "--drain-seconds", "0.2", *extra)
    try:
        svc.wait_serving(60)
    except BaseException:
        svc.stop()
        raise
    return svc, trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(svc.address))


def _wait_step(stub, job_id, step) -> int:
    """Follows the stream until a metric of at least `step`; returns the worker's pid."""
    return worker_pids(wait_for(stub, job_id, is_metric(step)))[-1]


def _check_resumed_run(entries):
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [e.metric.step for e in entries if e.WhichOneof("payload") == "metric"] == list(range(1, STEPS + 1))
    resumed = [e.event for e in entries if e.WhichOneof("payload") == "event"
               and e.event.type == tpb.JobEvent.TYPE_RESUMED]
    assert len(resumed) == 1
    m = resumed[0].metrics
    assert m["step"] >= 4 and m["abs_diff"] <= 1e-4 * max(1, m["loss_before"])
    assert states(entries)[-1] == "SUCCEEDED"


def test_kill_9_of_a_worker_resumes_the_job(tmp_path, tiny_model_dir, data):
    trainer, stub = _start(tmp_path)
    try:
        job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=_job(tiny_model_dir, data))).training_job
        pid = _wait_step(stub, job.id, 10)
        os.kill(pid, signal.SIGKILL)
        entries = watch_all(stub, job.id, timeout=300)
        _check_resumed_run(entries)
        requeued = [e.event.message for e in entries if e.WhichOneof("payload") == "event"
                    and e.event.type == tpb.JobEvent.TYPE_REQUEUED]
        assert len(requeued) == 1 and "code -9" in requeued[0]
    finally:
        trainer.stop()


def test_kill_9_of_the_trainer_resumes_the_job_after_restart(tmp_path, tiny_model_dir, data):
    trainer, stub = _start(tmp_path)
    try:
        job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=_job(tiny_model_dir, data))).training_job
        pid = _wait_step(stub, job.id, 10)
    finally:
        trainer.proc.kill()  # kill -9 of the trainer, whatever happened before
        trainer.proc.wait()
    trainer, stub = _start(tmp_path)
    try:
        entries = watch_all(stub, job.id, timeout=300)
        _check_resumed_run(entries)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        trainer.stop()


def test_a_worker_that_keeps_dying_fails_the_job_after_the_retries(tmp_path, tiny_model_dir, data):
    trainer, stub = _start(tmp_path, "--max-worker-retries", "1")
    try:
        job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(
            training_job=_job(tiny_model_dir, data, max_steps=100000))).training_job
        killed = []

        def kill_each_worker(e) -> bool:  # each attempt dies at its start
            for pid in worker_pids([e]):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return len(killed) == 2

        wait_for(stub, job.id, kill_each_worker, timeout=180)
        entries = watch_all(stub, job.id, timeout=120)
        final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
        assert states(entries)[-1] == "FAILED"
        assert final.error.reason == "WORKER_CRASHED" and final.error.retryable and not final.error.user_error
    finally:
        trainer.stop()
