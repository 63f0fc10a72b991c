"""The trainer's queue and evaluations over gRPC: priorities, queue positions, a full queue,
cancelling a queued job, and checkpoints with metrics. A real trainer subprocess and workers."""

from __future__ import annotations

import json

import grpc
import pytest

from harness import expect_error, start_service, states, wait_for, watch_all
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _job(model, data, name, max_steps, priority=0, **eval_kw):
    return tpb.TrainingJob(
        base_model=str(model), adapter_name=name, training_data=tpb.DatasetRef(path=str(data)),
        lora=tpb.LoraMethod(r=4, target_modules=["q_proj", "v_proj"]), priority=priority,
        eval=tpb.EvalSettings(**eval_kw),
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=max_steps, batch_size=4,
                                            max_seq_length=32))


def test_priorities_full_queue_cancel_queued_and_checkpoints(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i % 3}"}) + "\n"
                            for i in range(24)))
    trainer = start_service("trainer", tmp_path, "--data-root", str(tmp_path), "--data-dir", str(tmp_path / "t"), "--adapter-store",
                            str(tmp_path / "store"), "--max-queued-jobs", "2", "--drain-seconds", "0.2")
    try:
        trainer.wait_serving(60)
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))
        create = lambda job: stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job)).training_job  # noqa: E731
        get = lambda j: stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=j.name)).training_job  # noqa: E731

        blocker = create(_job(tiny_model_dir, data, "blocker", 100000))
        wait_for(stub, blocker.id, lambda e: e.state_change.state == tpb.TrainingJob.STATE_RUNNING,
                 timeout=60)
        low = create(_job(tiny_model_dir, data, "low", 6))
        high = create(_job(tiny_model_dir, data, "high", 6, priority=5, validation_fraction=0.25,
                           eval_every_steps=2, early_stopping_patience=0))
        assert (get(high).progress.queue_position, get(low).progress.queue_position) == (1, 2)
        expect_error(lambda: create(_job(tiny_model_dir, data, "third", 6)),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")

        cancelled = stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=low.name)).training_job
        assert cancelled.state == tpb.TrainingJob.STATE_CANCELLED
        stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=blocker.name))

        entries = watch_all(stub, high.id, timeout=180)
        assert states(entries)[-1] == "SUCCEEDED"
        evals = [e.event for e in entries if e.WhichOneof("payload") == "event"
                 and e.event.type == tpb.JobEvent.TYPE_EVAL_COMPLETED]
        assert [int(ev.metrics["step"]) for ev in evals] == [2, 4, 6]
        assert all(ev.metrics["eval_loss"] > 0 for ev in evals)
        ckpts = stub.ListCheckpoints(tpb.ListCheckpointsRequest(name=high.name)).checkpoints
        assert [c.step for c in ckpts] == [2, 4, 6] and sum(c.best for c in ckpts) == 1
        best = min(ckpts, key=lambda c: c.metrics["eval_loss"])
        assert best.best and get(high).result.metrics["best_step"] == best.step
        page = stub.ListCheckpoints(tpb.ListCheckpointsRequest(name=high.name, page_size=2))
        assert len(page.checkpoints) == 2 and page.next_page_token
        chosen = stub.PublishCheckpoint(tpb.PublishCheckpointRequest(name=high.name, step=2)).result
        assert chosen.version == "v2" and chosen.metrics["step"] == 2 and (tmp_path / "store" / "high" / "v2").is_dir()
        assert get(high).result.version == "v2"
        expect_error(lambda: stub.PublishCheckpoint(tpb.PublishCheckpointRequest(name=high.name, step=3)),
                     grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        expect_error(lambda: stub.ListCheckpoints(tpb.ListCheckpointsRequest(name="nope")),
                     grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
        assert states(watch_all(stub, blocker.id, timeout=60))[-1] == "CANCELLED"
        # per-job metrics CSV and loss curve: written before the job's stream ended
        job_dir = tmp_path / "t" / "jobs" / high.id
        rows = (job_dir / "metrics.csv").read_text().splitlines()
        assert rows[0].startswith("step,") and "eval_loss" in rows[0] and len(rows) == 7
        from PIL import Image

        assert Image.open(job_dir / "loss_curve.png").size == (900, 500)
    finally:
        trainer.stop()
