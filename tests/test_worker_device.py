"""The worker's device glue (trainer_service/worker.py): the memory estimate in the VALIDATED event,
the refusal of a job that cannot fit a GPU (only the GPU's size is faked), CUDA out-of-memory as a
user error, worker.json's device setting; and the manifest's training record (tunewire/adapters.py)."""

from __future__ import annotations

import json

import pytest
import torch

from trainer_service import memory, worker
from trainer_service.spec import Hyperparameters, JobSpec
from tunewire import adapters, devices
from tunewire import reasons as R
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")


class Events:
    def __init__(self):
        self.events = []

    def event(self, kind, message, data, metrics=None):
        self.events.append((kind, message, data, metrics or {}))


def spec_for(tiny_model_dir, tmp_path, **hp) -> JobSpec:
    rows = [{"prompt": f"p{i} is {20 + i} years old.\n", "completion": json.dumps({"age": 20 + i})}
            for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JobSpec(base_model=str(tiny_model_dir), training_data=str(data), adapter_name="a",
                   hyperparameters=Hyperparameters(batch_size=4, max_seq_length=64, **hp))


def test_validated_event_carries_the_gpu_forecast_on_a_cpu(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir, tmp_path)
    rep = Events()
    worker.preflight(spec, rep, CPU)
    (kind, _, data, metrics), = rep.events
    assert kind == "VALIDATED"
    shown = json.loads(data["memory"])
    expected = memory.estimate(spec)  # a CPU forecasts for a GPU: auto = bf16 there
    assert shown["precision"] == "bf16"
    assert shown["total_bytes"] == expected.total_bytes == metrics["estimated_gpu_memory_bytes"]
    assert metrics["estimated_gpu_memory_bytes_checkpointed"] == expected.total_bytes_checkpointed
    assert "report" in data and metrics["examples"] == 12


def test_a_job_too_big_for_the_gpu_is_refused_before_any_model_load(tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    spec = spec_for(tiny_model_dir, tmp_path)
    needed = memory.estimate(spec, device_total_bytes=1).total_bytes
    monkeypatch.setattr(devices, "total_memory_bytes", lambda dev: needed - 1)  # the only fake
    loads = []
    monkeypatch.setattr(worker.loading, "load_causal_lm", lambda *a, **k: loads.append(a))
    rep = Events()
    with pytest.raises(TunewireError) as e:
        worker.preflight(spec, rep, CPU)
    assert e.value.reason == R.INSUFFICIENT_GPU_MEMORY and e.value.job_error()["user_error"]
    assert "turn on gradient_checkpointing" in e.value.message and not loads and not rep.events
    monkeypatch.setattr(devices, "total_memory_bytes", lambda dev: needed)  # it fits exactly
    worker.preflight(spec, rep, CPU)
    assert rep.events[0][0] == "VALIDATED"


def test_feature_extraction_has_no_estimate(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir, tmp_path)
    fe = JobSpec(**{**spec.__dict__, "method": "feature_extraction"})
    assert worker.memory_estimate(fe, CPU) is None


def test_cuda_out_of_memory_is_a_user_error_with_advice(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir, tmp_path)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert worker._is_cuda_oom(oom) and not worker._is_cuda_oom(RuntimeError("x"))
    err = worker.out_of_memory(spec, CPU, oom)
    assert err.reason == R.OUT_OF_MEMORY and err.job_error()["user_error"]
    assert err.message.startswith("CUDA out of memory (peak 0.0 GiB of 0.0 GiB): ")
    assert memory.advice(spec) in err.message


def test_worker_json_device_setting(tmp_path):
    assert worker.worker_settings(tmp_path) == {}
    (tmp_path / "worker.json").write_text(json.dumps({"device": "cpu", "serving": True}))
    assert worker.worker_settings(tmp_path) == {"device": "cpu", "serving": True}
    assert devices.resolve_device(worker.worker_settings(tmp_path)["device"]) == CPU


def fake_adapter(d, training: dict | None):
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    if training is not None:
        (d / adapters.TRAINING_INFO).write_text(json.dumps(training))
    return d


def test_manifest_records_the_training_precision(tiny_model_dir, tmp_path):
    info = {"precision": "bf16", "device": "cuda", "quantization": "none"}
    src = fake_adapter(tmp_path / "src", info)
    dest, m = adapters.publish(src, tmp_path / "store", "demo", base_model_dir=tiny_model_dir)
    assert m.training == info and adapters.read_manifest(dest).training == info
    assert adapters.TRAINING_INFO in m.files  # hashed like every other file
    old = fake_adapter(tmp_path / "old", None)  # written before training.json existed
    assert adapters.write_manifest(old, name="old", version="v1", base_model_dir=tiny_model_dir).training == {}


def test_a_model_that_does_not_fit_the_gpu_at_load_is_not_called_invalid(tiny_model_dir, monkeypatch):
    """A CUDA OOM while loading weights says the GPU is full, not that the model is broken."""
    import transformers

    from tunewire import loading

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", full)
    with pytest.raises(TunewireError) as e:
        loading.load_causal_lm(tiny_model_dir)
    assert e.value.reason == R.INSUFFICIENT_GPU_MEMORY and "gpu_memory_utilization" in e.value.message
    def broken(*args, **kwargs):
        raise OSError("no weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(TunewireError) as e:
        loading.load_causal_lm(tiny_model_dir)
    assert e.value.reason == R.BASE_MODEL_INVALID
