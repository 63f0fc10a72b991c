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


def test_config_checks_types_and_unknown_overrides(tmp_path):
    bad = tmp_path / "t.toml"
    for text, needle in [('port = "50051"', "port must be an integer"), ("drain_seconds = true", "must be a number"),
                         ('model = "m"\nenforce_eager = "yes"', "enforce_eager must be true or false"),
                         ('model = "m"\nlora_target_modules = "q_proj"', "must be a list of strings")]:
        bad.write_text(text + "\n")
        cls = ServingConfig if "model" in text else TrainerConfig
        with pytest.raises(ValueError, match=needle):
            load_config(cls, str(bad))
    assert load_config(TrainerConfig, None, {"drain_seconds": 3}).drain_seconds == 3  # an int is a number
    with pytest.raises(ValueError, match=r"unknown settings \['max_loras'\]"):
        load_config(TrainerConfig, None, {"max_loras": 4})  # no longer dropped in silence


# a value of each kind for a flag, and what the config holds after it
FLAG_VALUES = {int: ("7", 7), float: ("2.5", 2.5), str: ("x", "x"), tuple: ("q_proj,v_proj", ("q_proj", "v_proj"))}


@pytest.mark.parametrize("service, cls", [("trainer", TrainerConfig), ("serving", ServingConfig)])
def test_every_setting_is_a_serve_flag(service, cls):
    """One home: each dataclass field is a flag of its service, reaching the config unchanged."""
    from dataclasses import fields

    from tunewire.cli import build_parser
    from tunewire.cli.serve import overrides

    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            for argv, want in (([flag], True), ([f"--no-{flag[2:]}"], False)):
                assert overrides(build_parser().parse_args(["serve", service, *argv]))[f.name] is want
            continue
        text, want = FLAG_VALUES[{"int": int, "float": float, "str": str}.get(f.type, tuple)]
        got = overrides(build_parser().parse_args(["serve", service, flag, text]))
        assert got[f.name] == want and all(v is None for k, v in got.items() if k != f.name), f.name
    extra = ["--model", "m"] if service == "serving" else []
    cfg = load_config(cls, None, overrides(build_parser().parse_args(["serve", service, "--port", "0", *extra])))
    defaults = {f.name: f.default for f in fields(cls)}
    assert cfg.port == 0 and cfg.drain_seconds == defaults["drain_seconds"]  # unset flags: the defaults


@pytest.mark.parametrize("argv, flag, owner", [
    (["serve", "trainer", "--max-loras", "4"], "--max-loras", "serving"),
    (["serve", "trainer", "--max-loras=4"], "--max-loras", "serving"),
    (["serve", "trainer", "--no-lazy-load"], "--no-lazy-load", "serving"),
    (["serve", "serving", "--model", "m", "--data-root", "/data"], "--data-root", "trainer"),
])
def test_a_flag_of_the_other_service_is_an_error(argv, flag, owner, capsys):
    from tunewire.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag} is a setting of the {owner} service" in err, err


def test_cli_sends_trainer_paths_as_given(tmp_path, monkeypatch, capsys):
    """The paths of `datasets validate` and `jobs create` reach the trainer unchanged, whatever the
    client's working directory: the trainer resolves them under its data_root / model_root."""
    from concurrent import futures

    import grpc

    from tunewire.cli import main
    from tunewire.trainer.v1 import trainer_pb2 as tpb
    from tunewire.trainer.v1 import trainer_pb2_grpc

    seen = []

    class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
        def ValidateDataset(self, request, context):
            seen.append(request)
            return tpb.ValidateDatasetResponse(report=tpb.DatasetReport(ok=True))

        def CreateTrainingJob(self, request, context):
            seen.append(request.training_job)
            return tpb.CreateTrainingJobResponse(training_job=tpb.TrainingJob(id="j1"))

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(Trainer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    monkeypatch.chdir(tmp_path)  # a cwd that holds none of these paths
    try:
        paths = ["--base-model", "tiny-llama", "--data", "uploads/ab12.jsonl", "--validation-data", "val/v.csv"]
        assert main(["--trainer", address, "datasets", "validate", *paths]) == 0
        assert main(["--trainer", address, "jobs", "create", *paths, "--adapter-name", "a"]) == 0
    finally:
        server.stop(None)
    validate, job = seen
    assert (validate.base_model, validate.training_data.path, validate.validation_data.path) == \
        ("tiny-llama", "uploads/ab12.jsonl", "val/v.csv")
    assert (job.base_model, job.training_data.path, job.validation_data.path) == \
        ("tiny-llama", "uploads/ab12.jsonl", "val/v.csv")
    assert '"ok": true' in capsys.readouterr().out


def test_registry_refuses_adapters_outside_the_deployed_targets(tiny_model_dir, tmp_path):
    """lora_target_modules = q_proj, v_proj: vLLM wraps only the packed qkv layer, so a k_proj
    adapter fits (same layer) and an o_proj one is refused before it reaches the engine."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from serving_service.adapter_checks import AdapterChecks

    def publish(name, targets):
        torch.manual_seed(0)
        src = tmp_path / f"src-{name}"
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=8, target_modules=list(targets))).save_pretrained(src)
        return adapters.publish(src, tmp_path / "store", name, base_model_dir=tiny_model_dir)[0]

    fingerprint = adapters.base_model_fingerprint(tiny_model_dir)
    qv = AdapterChecks(tmp_path / "store", fingerprint, max_lora_rank=16,
                       deployed_targets=("q_proj", "v_proj"))
    assert qv.allowed_targets == {"q_proj", "k_proj", "v_proj"}
    assert qv.validate(publish("kv", ("k_proj", "v_proj"))).target_modules
    with pytest.raises(TunewireError) as e:
        qv.validate(publish("qo", ("q_proj", "o_proj")))
    assert e.value.reason == "ADAPTER_TARGET_NOT_DEPLOYED" and "o_proj" in e.value.message
    every = AdapterChecks(tmp_path / "store", fingerprint, max_lora_rank=16)
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


def test_serving_endpoints_resolve_every_address(monkeypatch):
    """A headless Service name resolves to one address per serving pod (a stand-in resolver
    here: no DNS in the fast tier)."""
    import socket

    from trainer_service.server import serving_endpoints

    table = {("127.0.0.1", socket.AF_INET): ["127.0.0.1"],
             ("serving-headless", socket.AF_INET): ["127.0.0.9", "127.0.0.10", "127.0.0.9"],
             ("v6-only", socket.AF_INET6): ["fd00::2", "fd00::1"]}

    def getaddrinfo(host, port, family, type_):
        if (host, family) not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(family, type_, 6, "", (ip, port)) for ip in table[host, family]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert serving_endpoints("127.0.0.1:50052") == ["127.0.0.1:50052"]
    assert serving_endpoints("serving-headless:50052") == ["127.0.0.10:50052", "127.0.0.9:50052"]
    assert serving_endpoints("v6-only:7") == ["[fd00::1]:7", "[fd00::2]:7"]  # no IPv4: IPv6
    assert serving_endpoints("no-such-host.invalid:7") == ["no-such-host.invalid:7"]  # as given


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serving_endpoints_use_the_system_resolver():
    from trainer_service.server import serving_endpoints

    assert "127.0.0.1:7" in serving_endpoints("localhost:7")
    assert serving_endpoints("no-such-host.invalid:7") == ["no-such-host.invalid:7"]
