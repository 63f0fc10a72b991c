"""Fast tests of the pieces without servers: specs, configs, the job store, the adapter store,
structured-output checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving_service.config import ServingConfig
from trainer_service.config import TrainerConfig
from trainer_service.spec import Hyperparameters, JobSpec, LoraSpec
from trainer_service.store import JobStore
from tunewire import adapters
from tunewire.config import load_config
from tunewire.errors import TunewireError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")))
def test_every_example_config_parses(path):
    cls = TrainerConfig if path.name.startswith("trainer") else ServingConfig
    cfg = load_config(cls, str(path))
    assert isinstance(cfg, cls)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('porrt = 1\n')
    with pytest.raises(ValueError, match="unknown settings"):
        load_config(TrainerConfig, str(bad))
    with pytest.raises(ValueError, match="max_lora_rank"):
        ServingConfig(model="m", max_lora_rank=12)
    with pytest.raises(ValueError, match="model is required"):
        ServingConfig()
    with pytest.raises(ValueError, match="lora_target_modules"):
        ServingConfig(model="m", lora_target_modules=("q_proj", "lm_head"))
    bad.write_text('model = "m"\nlora_target_modules = ["q_proj", "v_proj"]\n')
    assert load_config(ServingConfig, str(bad)).lora_target_modules == ("q_proj", "v_proj")


def test_registry_refuses_adapters_outside_the_deployed_targets(tiny_model_dir, tmp_path):
    """lora_target_modules = q_proj, v_proj: vLLM wraps only the packed qkv layer, so a k_proj
    adapter fits (same layer) and an o_proj one is refused before it reaches the engine."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from serving_service.registry import AdapterRegistry

    def publish(name, targets):
        torch.manual_seed(0)
        src = tmp_path / f"src-{name}"
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=8, target_modules=list(targets))).save_pretrained(src)
        return adapters.publish(src, tmp_path / "store", name, base_model_dir=tiny_model_dir)[0]

    fingerprint = adapters.base_model_fingerprint(tiny_model_dir)
    qv = AdapterRegistry(None, store_root=tmp_path / "store", base_fingerprint=fingerprint,
                         max_lora_rank=16, max_resident=2, deployed_targets=("q_proj", "v_proj"))
    assert qv.allowed_targets == {"q_proj", "k_proj", "v_proj"}
    assert qv.validate(publish("kv", ("k_proj", "v_proj"))).target_modules
    with pytest.raises(TunewireError) as e:
        qv.validate(publish("qo", ("q_proj", "o_proj")))
    assert e.value.reason == "ADAPTER_TARGET_NOT_DEPLOYED" and "o_proj" in e.value.message
    every = AdapterRegistry(None, store_root=tmp_path / "store", base_fingerprint=fingerprint,
                            max_lora_rank=16, max_resident=2)
    assert every.validate(tmp_path / "store" / "qo" / "v1").target_modules




@pytest.mark.parametrize("make, field", [
    (lambda: LoraSpec(r=0), "training_job.lora.r"),
    (lambda: LoraSpec(lora_dropout=1.0), "training_job.lora.lora_dropout"),
    (lambda: LoraSpec(bias="some"), "training_job.lora.bias"),
    (lambda: LoraSpec(target_modules=("q proj",)), "training_job.lora.target_modules"),
    (lambda: Hyperparameters(learning_rate=0), "training_job.hyperparameters.learning_rate"),
    (lambda: Hyperparameters(batch_size=0), "training_job.hyperparameters.batch_size"),
    (lambda: JobSpec(base_model="m", training_data="d", adapter_name="Bad Name"), "training_job.adapter_name"),
    (lambda: JobSpec(base_model="", training_data="d", adapter_name="a"), "training_job.base_model"),
])
def test_spec_errors_name_the_field(make, field):
    with pytest.raises(TunewireError) as e:
        make()
    assert field in e.value.field_violations


def test_spec_json_round_trip():
    spec = JobSpec(base_model="/m", training_data="/d.jsonl", adapter_name="a",
                   lora=LoraSpec(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj"), lora_dropout=0.05),
                   hyperparameters=Hyperparameters(max_steps=7, seed=3))
    assert JobSpec.from_json(spec.to_json()) == spec
    assert spec.lora.alpha == 32 and LoraSpec(r=4).alpha == 8


def test_store_seq_is_per_job_and_gapless(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    a, _ = store.create('{"x": 1}', "h", None)
    b, _ = store.create('{"x": 2}', "h", None)
    for i in range(3):
        store.append(a.id, "metric", {"step": i + 1})
    store.append(b.id, "state", {"state": "RUNNING"}, state="RUNNING")
    assert [e.seq for e in store.history(a.id)] == [1, 2, 3]
    assert [e.seq for e in store.history(a.id, after_seq=2)] == [3]
    assert store.get(b.id).state == "RUNNING" and store.get(b.id).last_seq == 1
    with pytest.raises(TunewireError) as e:
        store.get("missing")
    assert (e.value.code, e.value.reason) == ("NOT_FOUND", "JOB_NOT_FOUND")


def test_store_idempotent_create_and_paging(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    first, created = store.create('{"x": 1}', "h", "req-1")
    again, created2 = store.create('{"x": 1}', "h", "req-1")
    assert created and not created2 and again.id == first.id
    with pytest.raises(TunewireError) as e:
        store.create('{"x": 2}', "h", "req-1")
    assert (e.value.code, e.value.reason) == ("ALREADY_EXISTS", "REQUEST_ID_REUSED")
    for i in range(4):
        store.create(json.dumps({"i": i}), "h", None)
    seen, token = [], ""
    while True:
        page, token = store.list(page_size=2, page_token=token)
        seen += [j.id for j in page]
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    for bad in ("%%%", "NQ==", token_of_another_list(store)):  # garbage, a raw offset, another filter
        with pytest.raises(TunewireError) as e:
            store.list(page_size=2, page_token=bad)
        assert (e.value.code, e.value.reason) == ("INVALID_ARGUMENT", "PAGE_TOKEN_INVALID")


def token_of_another_list(store) -> str:
    return store.list(state="QUEUED", page_size=1)[1]


def _fake_adapter(d: Path, r: int = 8, targets=("q_proj", "v_proj")) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "target_modules": list(targets)}))
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


def test_publish_writes_versions_with_verified_manifests(tmp_path, tiny_model_dir):
    src = _fake_adapter(tmp_path / "src")
    store = tmp_path / "store"
    d1, m1 = adapters.publish(src, store, "extract", base_model_dir=tiny_model_dir, source_job="trainingJobs/1")
    d2, m2 = adapters.publish(src, store, "extract", base_model_dir=tiny_model_dir)
    assert (m1.version, m2.version) == ("v1", "v2") and d2 == store / "extract" / "v2"
    assert m1.rank == 8 and m1.target_modules == ("q_proj", "v_proj")
    assert m1.base_model_fingerprint == adapters.base_model_fingerprint(tiny_model_dir)
    (d1 / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(TunewireError) as e:
        adapters.read_manifest(d1)
    assert e.value.reason == "ADAPTER_CHECKSUM_MISMATCH"
    assert adapters.read_manifest(d2).version == "v2"


def test_fingerprint_ignores_volatile_config_keys(tmp_path, tiny_model_dir):
    import shutil

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["transformers_version"] = "0.0.0"
    (copy / "config.json").write_text(json.dumps(cfg))
    assert adapters.base_model_fingerprint(copy) == adapters.base_model_fingerprint(tiny_model_dir)
    cfg["hidden_size"] *= 2
    (copy / "config.json").write_text(json.dumps(cfg))
    assert adapters.base_model_fingerprint(copy) != adapters.base_model_fingerprint(tiny_model_dir)


def test_store_paths_cannot_escape(tmp_path):
    store = tmp_path / "store"
    (store / "a" / "v1").mkdir(parents=True)
    assert adapters.resolve_in_store(store, "a/v1") == (store / "a" / "v1").resolve()
    for uri in ("../outside", "/etc", "a/../../x"):
        with pytest.raises(TunewireError) as e:
            adapters.resolve_in_store(store, uri)
        assert e.value.reason == "ADAPTER_URI_OUTSIDE_STORE" and e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(TunewireError) as e:
        adapters.resolve_in_store(store, "a/v9")
    assert e.value.reason == "ADAPTER_NOT_IN_STORE" and e.value.code == "NOT_FOUND"


def test_serving_endpoints_resolve_every_address():
    from trainer_service.server import serving_endpoints

    assert serving_endpoints("127.0.0.1:50052") == ["127.0.0.1:50052"]
    assert "127.0.0.1:7" in serving_endpoints("localhost:7")  # a name: every address behind it
    assert serving_endpoints("no-such-host.invalid:7") == ["no-such-host.invalid:7"]
