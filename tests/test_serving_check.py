"""Fast tests of issue 16's fail-fast check (trainer_service/serving_check.py): a LoRA job serving
could not load is refused at create, naming the field.

  * `check_job` over rank, target modules, DoRA, bias and base model, with the field names;
  * `job_targets` (no torch, no weights) against what peft really targets on tiny models of
    several architectures, and against the manifest serving checks;
  * serving's side: GetModelInfo's `lora_*` fields, and AdapterChecks refusing bias adapters;
  * JobService.create with the real ServingHandoff client over real gRPC, against a replica that
    answers GetModelInfo with serving's own `model_info` (the engine is in the slow e2e test).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from serving_service.adapter_checks import AdapterChecks
from serving_service.config import ServingConfig
from serving_service.server import model_info
from trainer_service.jobs import JobService
from trainer_service.launcher import LocalLauncher
from trainer_service.server import ServingHandoff
from trainer_service.serving_check import ServingCapabilities, check_job, job_targets
from trainer_service.spec import JobSpec, LoraSpec
from trainer_service.store import JobStore
from tunewire import adapters
from tunewire.errors import TunewireError
from tunewire.grpc_util import ServerInterceptor
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.timeout(120)
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def caps(fingerprint: str, *, rank=16, targets=frozenset(LLAMA_LINEAR), dora=False, bias=False):
    return ServingCapabilities(base_model_fingerprints=frozenset({fingerprint}), max_lora_rank=rank,
                               deployable_target_modules=targets, dora_supported=dora,
                               bias_supported=bias, replicas=("10.0.0.1:50052",))


def refused_fields(spec: JobSpec, c: ServingCapabilities) -> dict[str, str]:
    try:
        check_job(spec, c)
    except TunewireError as e:
        assert e.reason == "INCOMPATIBLE_WITH_SERVING" and e.code == "FAILED_PRECONDITION"
        return e.field_violations
    return {}


@pytest.fixture(scope="module")
def fingerprint(tiny_model_dir):
    return adapters.base_model_fingerprint(tiny_model_dir)


def lora_job(model, **lora) -> JobSpec:
    return JobSpec(base_model=str(model), training_data="d.jsonl", adapter_name="a", lora=LoraSpec(**lora))


@pytest.mark.parametrize("lora, serving, field, words", [
    (dict(r=32), dict(rank=16), "training_job.lora.r", "rank 32 exceeds serving's max_lora_rank 16"),
    (dict(target_modules=("o_proj",)), dict(targets=frozenset({"q_proj", "k_proj", "v_proj"})),
     "training_job.lora.target_modules", "['o_proj']"),
    (dict(target_modules=("all-linear",)), dict(targets=frozenset({"q_proj", "k_proj", "v_proj"})),
     "training_job.lora.target_modules", "all-linear resolves to"),
    (dict(use_dora=True), {}, "training_job.lora.use_dora", "DoRA"),
    (dict(bias="all"), {}, "training_job.lora.bias", "bias all"),
    (dict(bias="lora_only"), {}, "training_job.lora.bias", "bias lora_only"),
])
def test_each_incompatibility_names_its_field(tiny_model_dir, fingerprint, lora, serving, field, words):
    got = refused_fields(lora_job(tiny_model_dir, **lora), caps(fingerprint, **serving))
    assert list(got) == [field] and words in got[field], got


def test_compatible_jobs_pass_and_unknowns_are_not_refused(tiny_model_dir, fingerprint):
    qkv = frozenset({"q_proj", "k_proj", "v_proj"})
    # peft's default for llama is q_proj, v_proj: inside q/k/v
    assert refused_fields(lora_job(tiny_model_dir), caps(fingerprint, targets=qkv)) == {}
    assert refused_fields(lora_job(tiny_model_dir, r=16, target_modules=("all-linear",)), caps(fingerprint)) == {}
    # what serving supports, it accepts; a serving that reports no targets is not second-guessed
    assert refused_fields(lora_job(tiny_model_dir, use_dora=True, bias="all"),
                          caps(fingerprint, dora=True, bias=True)) == {}
    assert refused_fields(lora_job(tiny_model_dir, target_modules=("down_proj",)),
                          caps(fingerprint, targets=None)) == {}


def test_another_base_model_and_several_fields_at_once(tiny_model_dir, fingerprint):
    got = refused_fields(lora_job(tiny_model_dir, r=64, use_dora=True), caps("f" * 64))
    assert set(got) == {"training_job.base_model", "training_job.lora.r", "training_job.lora.use_dora"}
    assert fingerprint[:12] in got["training_job.base_model"] and "ffffffffffff" in got["training_job.base_model"]


def test_common_is_what_every_replica_accepts(tiny_model_dir, fingerprint):
    a = caps(fingerprint, rank=64, targets=frozenset(LLAMA_LINEAR), dora=True, bias=True)
    b = caps(fingerprint, rank=16, targets=frozenset({"q_proj", "k_proj", "v_proj"}))
    old = ServingCapabilities(frozenset({fingerprint}), 32, None, False, False, ("old:1",))
    c = ServingCapabilities.common([a, b, old])
    assert (c.max_lora_rank, c.deployable_target_modules, c.dora_supported, c.bias_supported) == \
        (16, {"q_proj", "k_proj", "v_proj"}, False, False)
    assert len(c.replicas) == 3
    split = ServingCapabilities.common([a, caps("e" * 64)])  # two replicas on two base models
    assert "training_job.base_model" in refused_fields(lora_job(tiny_model_dir), split)


# -- job_targets: what peft really targets -------------------------------------------------------
def _peft_targets(model_dir: Path, targets) -> set[str]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, target_modules=targets))
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


TINY = {"qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128),
        "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, head_dim=16),
        "gpt2": dict(n_embd=64, n_layer=1, n_head=4, vocab_size=128)}  # Conv1D, tied, wte/wpe


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {"llama": Path(tiny_model_dir)}
    for model_type, kw in TINY.items():
        out[model_type] = tmp_path_factory.mktemp(model_type)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).save_pretrained(out[model_type])
    return out


@pytest.mark.parametrize("arch", ["llama", *TINY])
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_job_targets_equal_peft(models, arch, targets):
    want = _peft_targets(models[arch], targets)
    assert job_targets(models[arch], () if targets is None else (targets,)) == want


def test_job_targets_equal_the_manifest_serving_checks(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, targets in enumerate((["q_proj", "self_attn.o_proj"], "all-linear", None)):
        src = tmp_path / f"src{i}"
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=4, target_modules=targets)).save_pretrained(src)
        _, manifest = adapters.publish(src, tmp_path / "store", f"a{i}", base_model_dir=tiny_model_dir)
        given = () if targets is None else (targets,) if isinstance(targets, str) else tuple(targets)
        assert job_targets(tiny_model_dir, given) == set(manifest.target_modules), targets


def test_the_check_imports_no_torch_or_grpc(tiny_model_dir):
    code = ("import sys; from trainer_service import serving_check as s; "
            f"print(sorted(s.job_targets({str(tiny_model_dir)!r}, ())), sorted(s.job_targets("
            f"{str(tiny_model_dir)!r}, ('all-linear',))), 'torch' in sys.modules, 'grpc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split("] ")
    assert out[0] == "['q_proj', 'v_proj'" and out[-1].strip() == "False False", out


# -- serving's side -------------------------------------------------------------------------------
def test_model_info_says_what_a_lora_adapter_must_satisfy():
    every = serving_pb2.GetModelInfoResponse(**model_info(ServingConfig(model="/m"), "fp", [], "cpu", "float32"))
    assert set(every.lora_deployable_target_modules) == LLAMA_LINEAR  # never empty: () = all
    assert (every.lora_dora_supported, every.lora_bias_supported) == (False, False)
    q = model_info(ServingConfig(model="/m", lora_target_modules=("q_proj", "up_proj")), "fp", [], "cpu", "float32")
    # q/k/v and gate/up are packed: wrapping one wraps the group
    assert q["lora_deployable_target_modules"] == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_serving_refuses_an_adapter_with_trained_biases(tiny_model_dir, fingerprint, tmp_path, bias):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, target_modules=["q_proj"], bias=bias)).save_pretrained(src)
    dest, _ = adapters.publish(src, tmp_path / "store", "b", base_model_dir=tiny_model_dir)
    with pytest.raises(TunewireError) as e:
        AdapterChecks(tmp_path / "store", fingerprint, max_lora_rank=16).validate(dest)
    assert e.value.code == "FAILED_PRECONDITION" and "trained biases" in e.value.message
    assert e.value.metadata["bias"] == bias


# -- create, through the real handoff client ------------------------------------------------------
class Replica(serving_pb2_grpc.ServingServiceServicer):
    """Answers GetModelInfo exactly as serving_service.server builds it for `cfg`."""

    def __init__(self, cfg: ServingConfig, fingerprint: str):
        self.info = model_info(cfg, fingerprint, [], "cpu", "float32")

    async def GetModelInfo(self, request, context):
        return serving_pb2.GetModelInfoResponse(**self.info)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_create_checks_lora_jobs_against_serving(tiny_model_dir, fingerprint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n"
                                          for i in range(8)))

    def service(address: str) -> JobService:
        return JobService(JobStore(tmp_path / f"{address.replace(':', '_')}.sqlite3"), LocalLauncher(),
                          data_dir=tmp_path / "t", adapter_store=tmp_path / "store", data_root=data,
                          model_root=Path(tiny_model_dir).parent, report_address="127.0.0.1:1",
                          handoff=ServingHandoff(address, 30))

    def job(**kw) -> JobSpec:
        publish_only = kw.pop("publish_only", False)
        return JobSpec(base_model=str(tiny_model_dir), training_data="d.jsonl", adapter_name="a",
                       lora=LoraSpec(**kw), publish_only=publish_only)

    async def main():
        server = grpc.aio.server(interceptors=[ServerInterceptor()])
        port = server.add_insecure_port("127.0.0.1:0")
        serving_pb2_grpc.add_ServingServiceServicer_to_server(
            Replica(ServingConfig(model="/m", max_lora_rank=8, lora_target_modules=("q_proj", "v_proj")),
                    fingerprint), server)
        await server.start()
        try:
            jobs = service(f"127.0.0.1:{port}")
            c = await jobs.serving.capabilities()
            assert (c.max_lora_rank, c.deployable_target_modules, c.base_model_fingerprints) == \
                (8, {"q_proj", "k_proj", "v_proj"}, {fingerprint})
            with pytest.raises(TunewireError) as e:
                await jobs.create(job(r=16), None)
            assert e.value.reason == "INCOMPATIBLE_WITH_SERVING"
            assert e.value.field_violations == {
                "training_job.lora.r": "rank 16 exceeds serving's max_lora_rank 8"}
            with pytest.raises(TunewireError) as e:
                await jobs.create(job(target_modules=("all-linear",)), None)
            assert list(e.value.field_violations) == ["training_job.lora.target_modules"]
            assert (await jobs.create(job(r=16, publish_only=True), None)).state == "QUEUED"
            assert (await jobs.create(job(r=8), None)).state == "QUEUED"
            full = JobSpec(base_model=str(tiny_model_dir), training_data="d.jsonl", adapter_name="f",
                           method="full")
            assert (await jobs.create(full, None)).state == "QUEUED"  # nothing handed to serving
        finally:
            await server.stop(0)
        down = service(f"127.0.0.1:{_free_port()}")
        with pytest.raises(TunewireError) as e:
            await down.create(job(r=8), None)
        assert e.value.reason == "SERVING_UNAVAILABLE" and e.value.code == "UNAVAILABLE"
        assert (await down.create(job(r=8, publish_only=True), None)).state == "QUEUED"

    asyncio.run(main())
