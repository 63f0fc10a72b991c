"""Data-parallel LoRA for real: jobs with num_processes=2 run under torchrun (two worker processes,
gloo on CPU) behind a real trainer service. Rank 0 alone reports and saves; both ranks train in
step, which the ADAPTER_SAVED event shows with a checksum of every rank's weights; a cancel stops
every rank cleanly."""

from __future__ import annotations

import json

import grpc
import psutil
import pytest

from harness import is_metric, start_service, states, wait_for, watch_all, worker_pids
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 8


@pytest.fixture
def trainer(tmp_path):
    svc = start_service("trainer", tmp_path, "--data-root", str(tmp_path), "--data-dir",
                        str(tmp_path / "t"), "--adapter-store", str(tmp_path / "store"))
    try:
        svc.wait_serving(60)
        yield svc, trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(svc.address))
    finally:
        svc.stop()


def _create(stub, tmp_path, model, max_steps):
    data = tmp_path / "d.jsonl"
    # 28 rows: 3 held out for validation, 25 to train on, so step 7 (the epoch's last) has a single
    # example: rank 0 trains on it and rank 1 joins the backward with weight 0.
    data.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"answer {i % 5}"}) + "\n"
                            for i in range(28)))
    return stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=tpb.TrainingJob(
        base_model=str(model), adapter_name="ddp", training_data=tpb.DatasetRef(path=str(data)),
        lora=tpb.LoraMethod(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        eval=tpb.EvalSettings(eval_every_steps=4),
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=max_steps, batch_size=4,
                                            max_seq_length=32, num_processes=2)))).training_job


def _job_processes(job_id) -> list[psutil.Process]:
    """torchrun and its ranks: every live process with the job id on its command line."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if job_id in " ".join(p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def _wait_gone(job_id, timeout=60) -> None:
    """Waits for every process of the job (torchrun and its ranks) to exit."""
    _, alive = psutil.wait_procs(_job_processes(job_id), timeout=timeout)
    assert not alive, [p.info["cmdline"] for p in alive]


def _worker_log(tmp_path, job_id) -> str:
    return (tmp_path / "t" / "jobs" / job_id / "worker.log").read_text(errors="replace")


def test_two_processes_train_one_adapter_in_step(tmp_path, tiny_model_dir, trainer):
    _, stub = trainer
    job = _create(stub, tmp_path, tiny_model_dir, STEPS)
    entries = watch_all(stub, job.id, timeout=300)
    assert states(entries)[-1] == "SUCCEEDED", _worker_log(tmp_path, job.id)[-4000:]

    metrics = [e.metric for e in entries if e.WhichOneof("payload") == "metric"]
    assert [m.step for m in metrics] == list(range(1, STEPS + 1))  # rank 0 alone reports
    assert all(m.loss > 0 and m.tokens_per_second > 0 for m in metrics)
    events = [e.event for e in entries if e.WhichOneof("payload") == "event"]
    saved = [e for e in events if e.type == tpb.JobEvent.TYPE_ADAPTER_SAVED]
    assert len(saved) == 1
    job_dir = tmp_path / "t" / "jobs" / job.id
    assert [p.name for p in job_dir.iterdir() if p.name.startswith("adapter")] == ["adapter"]
    assert len([e for e in events if e.type == tpb.JobEvent.TYPE_CHECKPOINT_SAVED]) == 2

    # Two processes whose weights are bit-for-bit equal after the last step.
    info = saved[0].data
    assert info["world_size"] == "2"
    pids, sums = json.loads(info["rank_pids"]), json.loads(info["rank_checksums"])
    assert len(set(pids)) == 2 and len(sums) == 2 and sums[0] == sums[1]
    started = [e for e in events if e.type == tpb.JobEvent.TYPE_WORKER_STARTED]
    assert len(started) == 1 and int(started[0].data["pid"]) == pids[0]

    final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert final.result.metrics["steps"] == STEPS
    _wait_gone(job.id)  # torchrun exits on its own once both ranks are done


def test_cancel_stops_every_rank(tmp_path, tiny_model_dir, trainer):
    _, stub = trainer
    job = _create(stub, tmp_path, tiny_model_dir, 10_000)
    wait_for(stub, job.id, is_metric(2), timeout=180)
    assert len(_job_processes(job.id)) == 3  # torchrun and two ranks
    stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name))
    entries = watch_all(stub, job.id, timeout=120)
    assert states(entries)[-1] == "CANCELLED"
    _wait_gone(job.id)
    # Both ranks agreed on the stop and left training themselves (not killed after the grace).
    cancelled = [json.loads(line) for line in _worker_log(tmp_path, job.id).splitlines()
                 if line.startswith("{") and '"msg": "cancelled"' in line]
    assert sorted(c["rank"] for c in cancelled) == [0, 1]
    assert not (tmp_path / "t" / "jobs" / job.id / "adapter").exists()


def test_kill_9_of_one_rank_retries_and_resumes_the_job(tmp_path, tiny_model_dir, trainer):
    _, stub = trainer
    job = _create(stub, tmp_path, tiny_model_dir, 12)
    (rank0,) = worker_pids(wait_for(stub, job.id, is_metric(5), timeout=180))  # resume state at 4
    rank1 = [p for p in _job_processes(job.id)
             if "trainer_service.worker" in p.info["cmdline"] and "torch.distributed.run" not in p.info["cmdline"]
             and p.pid != rank0]
    assert len(rank1) == 1
    rank1[0].kill()
    entries = watch_all(stub, job.id, timeout=300)
    # Rank 0 finds its peer gone and exits without a failure report: a crash, so a retry.
    assert states(entries)[-1] == "SUCCEEDED", _worker_log(tmp_path, job.id)[-4000:]
    assert [e.metric.step for e in entries if e.WhichOneof("payload") == "metric"] == list(range(1, 13))
    events = [e.event for e in entries if e.WhichOneof("payload") == "event"]
    assert len([e for e in events if e.type == tpb.JobEvent.TYPE_REQUEUED]) == 1
    resumed = [e for e in events if e.type == tpb.JobEvent.TYPE_RESUMED]
    assert len(resumed) == 1 and resumed[0].metrics["abs_diff"] <= 1e-4 * max(1, resumed[0].metrics["loss_before"])
    sums = json.loads([e for e in events if e.type == tpb.JobEvent.TYPE_ADAPTER_SAVED][0].data["rank_checksums"])
    assert len(sums) == 2 and sums[0] == sums[1]
    _wait_gone(job.id)
