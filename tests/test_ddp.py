"""Data-parallel LoRA for real: a job with num_processes=2 runs under torchrun (two worker
processes, gloo on CPU) behind a real trainer service. Rank 0 alone reports and saves; both ranks
train in step, which the ADAPTER_SAVED event shows with a checksum of every rank's weights."""

from __future__ import annotations

import json

import grpc
import pytest

from harness import start_service, states, watch_all
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
STEPS = 8


def test_two_processes_train_one_adapter_in_step(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"answer {i % 5}"}) + "\n"
                            for i in range(28)))  # 25 train rows: step 7 has 1, rank 1 idles
    trainer = start_service("trainer", tmp_path, "--data-root", str(tmp_path), "--data-dir",
                            str(tmp_path / "t"), "--adapter-store", str(tmp_path / "store"))
    try:
        trainer.wait_serving(60)
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))
        job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=tpb.TrainingJob(
            base_model=str(tiny_model_dir), adapter_name="ddp", training_data=tpb.DatasetRef(path=str(data)),
            lora=tpb.LoraMethod(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
            eval=tpb.EvalSettings(eval_every_steps=4),  # 3 validation rows, evaluated by rank 0
            hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=STEPS, batch_size=4,
                                                max_seq_length=32, num_processes=2)))).training_job
        entries = watch_all(stub, job.id, timeout=300)
        log = (tmp_path / "t" / "jobs" / job.id / "worker.log").read_text(errors="replace")
        assert states(entries)[-1] == "SUCCEEDED", log[-4000:]

        metrics = [e.metric for e in entries if e.WhichOneof("payload") == "metric"]
        assert [m.step for m in metrics] == list(range(1, STEPS + 1))  # rank 0 alone reports
        assert all(m.loss > 0 and m.tokens_per_second > 0 for m in metrics)
        events = [e.event for e in entries if e.WhichOneof("payload") == "event"]
        saved = [e for e in events if e.type == tpb.JobEvent.TYPE_ADAPTER_SAVED]
        assert len(saved) == 1
        assert sorted(p.name for p in (tmp_path / "t" / "jobs" / job.id).iterdir()
                      if p.name.startswith("adapter")) == ["adapter"]

        # Two processes, their weights bit-for-bit equal after the last step.
        data_ = saved[0].data
        assert data_["world_size"] == "2"
        pids, sums = json.loads(data_["rank_pids"]), json.loads(data_["rank_checksums"])
        assert len(set(pids)) == 2 and len(sums) == 2 and sums[0] == sums[1]
        started = [e for e in events if e.type == tpb.JobEvent.TYPE_WORKER_STARTED]
        assert len(started) == 1 and int(started[0].data["pid"]) == pids[0]

        final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
        assert final.result.metrics["steps"] == STEPS
    finally:
        trainer.stop()
