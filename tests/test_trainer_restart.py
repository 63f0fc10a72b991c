"""The trainer on its own (no serving): jobs survive a restart, and a publish-only trainer
succeeds without a handoff. Real trainer subprocesses, real workers, real SQLite."""

from __future__ import annotations

import json

import grpc
import pytest

from harness import is_metric, start_service, states, wait_for, watch_all
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _spec(model, data, max_steps):
    return tpb.TrainingJob(
        base_model=str(model), adapter_name="restart", training_data=tpb.DatasetRef(path=str(data)),
        lora=tpb.LoraMethod(r=4, target_modules=["q_proj"]),
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=max_steps, batch_size=2,
                                            max_seq_length=32))


def _is_requeued(e) -> bool:
    return e.WhichOneof("payload") == "event" and e.event.type == tpb.JobEvent.TYPE_REQUEUED


def test_jobs_survive_a_trainer_restart(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    flags = ("--data-root", str(tmp_path), "--data-dir", str(tmp_path / "trainer"), "--adapter-store", str(tmp_path / "store"),
             "--drain-seconds", "0.5")
    trainer = start_service("trainer", tmp_path, *flags)
    try:
        trainer.wait_serving(60)
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))
        long_job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(
            training_job=_spec(tiny_model_dir, data, 100000))).training_job
        short_job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(
            training_job=_spec(tiny_model_dir, data, 3))).training_job
        queued = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=short_job.id)).training_job
        assert queued.progress.queue_position == 1
        wait_for(stub, long_job.id, is_metric(1))
    finally:
        rc = trainer.stop()  # SIGTERM: the worker is stopped, the job goes back to the queue
    assert rc == 0

    trainer = start_service("trainer", tmp_path, *flags)
    try:
        trainer.wait_serving(60)
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))
        seen = {"requeued": False}

        def training_again(e) -> bool:  # a metric after it was re-queued
            seen["requeued"] |= _is_requeued(e)
            return seen["requeued"] and e.WhichOneof("payload") == "metric"

        entries = wait_for(stub, long_job.id, training_again)
        kinds = [(e.WhichOneof("payload"), e.state_change.state if e.HasField("state_change") else e.event.type)
                 for e in entries if e.WhichOneof("payload") != "metric"]
        assert ("event", tpb.JobEvent.TYPE_REQUEUED) in kinds
        requeued_at = kinds.index(("event", tpb.JobEvent.TYPE_REQUEUED))
        assert ("state_change", tpb.TrainingJob.STATE_QUEUED) in kinds[requeued_at:]
        assert ("state_change", tpb.TrainingJob.STATE_RUNNING) in kinds[requeued_at:]
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))

        stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=long_job.id))
        assert states(watch_all(stub, short_job.id, timeout=120))[-1] == "SUCCEEDED"
        short = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=short_job.id)).training_job
        assert short.state == tpb.TrainingJob.STATE_SUCCEEDED
        assert not short.result.serving_loaded and "no serving endpoint" in short.result.serving_message
        assert (tmp_path / "store" / "restart" / short.result.version / "manifest.json").is_file()
    finally:
        rc = trainer.stop()
    assert rc == 0
