"""Issue 16's fail-fast check end to end, on real parts: one serving process (a real vLLM engine,
`--max-lora-rank 8`, `--lora-target-modules q_proj,v_proj`) and a trainer pointed at it, both
subprocesses on 127.0.0.1, talking real gRPC.

  * CreateTrainingJob refuses a LoRA job serving could not load: FAILED_PRECONDITION
    INCOMPATIBLE_WITH_SERVING naming the field (rank, targets, DoRA, bias, base model);
  * publish_only=true accepts the same job, which trains and publishes with no handoff;
  * serving unreachable → UNAVAILABLE SERVING_UNAVAILABLE;
  * adapters with trained biases: vLLM refuses them (PEFTHelper: "Adapter bias is not supported"),
    so serving refuses them at load with a reason, before the engine, and keeps serving.

The served base is the tiny Llama with attention biases (q/k/v/o), so peft bias="all" trains
real bias tensors. Nothing here stops or reconfigures the module's services.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest

from harness import expect_error, free_port, start_service, watch_all
from tunewire import adapters
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
INCOMPATIBLE = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def biased_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's tokenizer and shape, with attention biases (vLLM serves them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-biased")
    for f in Path(tiny_model_dir).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_bias = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, biased_base):
    tmp = tmp_path_factory.mktemp("failfast")
    store = tmp / "adapters"
    serving = start_service("serving", tmp, "--model", str(biased_base), "--adapter-store", str(store),
                            "--max-model-len", "256", "--enforce-eager", "--max-lora-rank", "8",
                            "--lora-target-modules", "q_proj,v_proj", "--drain-seconds", "1")
    trainer = start_service("trainer", tmp, "--data-dir", str(tmp / "trainer"), "--data-root",
                            str(tmp.parent), "--adapter-store", str(store), "--serving-address",
                            serving.address, "--drain-seconds", "1")
    try:
        trainer.wait_serving(60)
        serving.wait_serving(300)
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{n} is", "completion": f" {20 + i}"}) + "\n"
                                for i, n in enumerate(["alice", "bob", "carol", "dave"] * 4)))
        yield {"tmp": tmp, "store": store, "data": data, "serving": serving, "trainer": trainer,
               "jobs": trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address)),
               "gen": serving_pb2_grpc.ServingServiceStub(grpc.insecure_channel(serving.address))}
    finally:
        trainer.stop()
        serving.stop()


def lora_job(base, data, *, publish_only=False, **lora) -> tpb.TrainingJob:
    return tpb.TrainingJob(
        base_model=str(base), adapter_name="ff", training_data=tpb.DatasetRef(path=str(data)),
        publish_only=publish_only, lora=tpb.LoraMethod(**{"r": 8, "target_modules": ["q_proj", "v_proj"], **lora}),
        hyperparameters=tpb.Hyperparameters(max_steps=2, batch_size=2, max_seq_length=16, seed=1))


def create(stub, job: tpb.TrainingJob):
    return stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job), timeout=60).training_job


def test_serving_reports_what_it_loads(stack):
    info = stack["gen"].GetModelInfo(spb.GetModelInfoRequest(), timeout=10)
    assert (info.max_lora_rank, sorted(info.lora_deployable_target_modules)) == (8, ["k_proj", "q_proj", "v_proj"])
    assert (info.lora_dora_supported, info.lora_bias_supported) == (False, False)


@pytest.mark.parametrize("lora, field", [
    ({"r": 16}, "training_job.lora.r"),
    ({"target_modules": ["all-linear"]}, "training_job.lora.target_modules"),
    ({"target_modules": ["q_proj", "o_proj"]}, "training_job.lora.target_modules"),
    ({"use_dora": True}, "training_job.lora.use_dora"),
    ({"bias": tpb.LoraMethod.BIAS_ALL}, "training_job.lora.bias"),
])
def test_create_refuses_what_serving_cannot_load(stack, biased_base, lora, field):
    _, fields = expect_error(lambda: create(stack["jobs"], lora_job(biased_base, stack["data"], **lora)),
                             INCOMPATIBLE, "INCOMPATIBLE_WITH_SERVING")
    assert list(fields) == [field], fields


def test_create_refuses_a_job_on_another_base_model(stack, tiny_model_dir):
    _, fields = expect_error(lambda: create(stack["jobs"], lora_job(tiny_model_dir, stack["data"])),
                             INCOMPATIBLE, "INCOMPATIBLE_WITH_SERVING")
    assert list(fields) == ["training_job.base_model"]


def test_publish_only_trains_for_the_store_without_a_handoff(stack, biased_base):
    job = create(stack["jobs"], lora_job(biased_base, stack["data"], r=16, publish_only=True))
    assert job.publish_only
    watch_all(stack["jobs"], job.id, timeout=400)
    final = stack["jobs"].GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert final.state == tpb.TrainingJob.STATE_SUCCEEDED, final.error
    assert not final.result.serving_loaded
    assert adapters.read_manifest(Path(final.result.uri)).rank == 16
    assert "ff" not in [a.name for a in stack["gen"].ListAdapters(spb.ListAdaptersRequest()).adapters]


def test_serving_unreachable_is_unavailable(stack, biased_base):
    tmp = stack["tmp"]
    trainer = start_service("trainer", tmp, "--data-dir", str(tmp / "trainer-down"), "--data-root",
                            str(tmp.parent), "--adapter-store", str(stack["store"]),
                            "--serving-address", f"127.0.0.1:{free_port()}", "--drain-seconds", "1")
    try:
        trainer.wait_serving(60)
        jobs = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))
        expect_error(lambda: create(jobs, lora_job(biased_base, stack["data"])),
                     grpc.StatusCode.UNAVAILABLE, "SERVING_UNAVAILABLE")
        assert create(jobs, lora_job(biased_base, stack["data"], publish_only=True)).id
    finally:
        trainer.stop()


def _bias_adapter(base: Path, out: Path, bias: str) -> Path:
    """A peft adapter on `base` whose trained biases differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias,
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.requires_grad:
                p.add_(torch.randn_like(p))
    model.save_pretrained(out)
    return out


def test_vllm_refuses_adapters_with_trained_biases(biased_base, tmp_path):
    """The fact serving's lora_bias_supported = false rests on (if a vLLM release applies biases,
    this fails: then serve them and report true)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    for bias in ("all", "lora_only"):
        helper = PEFTHelper.from_local_dir(str(_bias_adapter(biased_base, tmp_path / bias, bias)), 128)
        with pytest.raises(ValueError, match="bias is not supported"):
            helper.validate_legal(LoRAConfig(max_lora_rank=8))


def test_serving_refuses_an_adapter_with_trained_biases_and_keeps_serving(stack, biased_base, tmp_path):
    src = _bias_adapter(biased_base, tmp_path / "src", "all")
    dest, _ = adapters.publish(src, stack["store"], "biased", base_model_dir=biased_base)
    with pytest.raises(grpc.RpcError) as e:
        stack["gen"].LoadAdapter(spb.LoadAdapterRequest(name="biased", uri=str(dest)), timeout=60)
    assert e.value.code() == INCOMPATIBLE
    # refused by serving's own check (a reason and the bias named), not by the engine's add_lora
    assert "trained biases (bias='all')" in e.value.details(), e.value.details()
    assert "Adapter bias is not supported" not in stack["serving"].log()
    r = stack["gen"].Generate(spb.GenerateRequest(prompt="alice is", sampling=spb.SamplingParams(max_tokens=4)),
                              timeout=60)
    assert r.finish_reason != spb.FINISH_REASON_UNSPECIFIED and r.completion_tokens >= 1
