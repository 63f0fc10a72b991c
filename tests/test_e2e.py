"""End to end on real parts: both services as subprocesses on 127.0.0.1, a real vLLM engine,
real training workers, real SQLite — checked against HF transformers + peft.

One serving process (one vLLM engine) and one trainer serve the whole module; no test stops or
reconfigures them, so the tests pass in any order (SIGTERM and start-up failures, on services of
their own: tests/test_lifecycle.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jsonschema
import psutil
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import expect_error, health_status, series, start_service, states, watch_all
from reference import hf_greedy, random_adapter, visible_text
from tunewire import adapters
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the fixtures start vLLM and train

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
PROMPTS = ["alice is 21 years old and lives in paris.\nJSON: ", "bob is",
           'Extract the person as JSON: carol is 30 years old', "user: where does dave live?"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = ["paris", "oslo", "lima", "rome", "kyiv", "cairo", "tokyo", "quito"]


class Stack:
    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model, self.store = tmp, model, tmp / "adapters"
        self.serving = start_service("serving", tmp, "--model", str(model), "--adapter-store",
                                     str(self.store), "--max-model-len", "256", "--enforce-eager",
                                     # 2 slots: the CPU mixed-batch bug shows only when the last
                                     # LoRA slot holds a real adapter
                                     "--max-loras", "2",
                                     "--drain-seconds", "3")
        self.trainer = start_service("trainer", tmp, "--data-dir", str(tmp / "trainer"),
                                     "--data-root", str(tmp.parent),  # pytest's base temp dir
                                     "--adapter-store", str(self.store), "--serving-address",
                                     self.serving.address, "--drain-seconds", "3")
        self.trainer.wait_serving(60)
        self.serving.wait_serving(300)
        self.jobs = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(self.trainer.address))
        self.gen = serving_pb2_grpc.ServingServiceStub(grpc.insecure_channel(self.serving.address))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    s = Stack(tmp_path_factory.mktemp("e2e"), Path(tiny_model_dir))
    yield s
    s.serving.stop()
    s.trainer.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(48):
            n, c, age = NAMES[i % 8], CITIES[(i * 3) % 8], 20 + i % 40
            f.write(json.dumps({"prompt": f"{n} is {age} years old and lives in {c}.\nJSON: ",
                                "completion": json.dumps({"name": n, "age": age})}) + "\n")
    return path


def job_spec(model, data, name, *, max_steps=30, **lora) -> tpb.TrainingJob:
    return tpb.TrainingJob(
        base_model=str(model), adapter_name=name, training_data=tpb.DatasetRef(path=str(data)),
        lora=tpb.LoraMethod(r=lora.get("r", 8), lora_alpha=16, target_modules=["q_proj", "v_proj"],
                            lora_dropout=0.05),
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=max_steps, batch_size=4,
                                            max_seq_length=64, seed=1))


@pytest.fixture(scope="module")
def trained(stack, dataset):
    spec = job_spec(stack.model, dataset, "json-extract")
    spec.validation_data.path = str(dataset)  # held-out rows for the JSON eval through serving
    spec.json_schema = json.dumps(SCHEMA)
    spec.eval.early_stopping_patience = 0  # all 30 steps, whatever validation does
    job = stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(
        training_job=spec, request_id="e2e-1")).training_job
    entries = watch_all(stack.jobs, job.id)
    final = stack.jobs.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    return job, entries, final


def generate(stub, prompt, adapter="", schema=None, max_tokens=16, **kw):
    fmt = (spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json.dumps(schema)))
           if schema is not None else spb.ResponseFormat(text=spb.TextFormat()))
    return stub.Generate(spb.GenerateRequest(adapter=adapter, prompt=prompt, response_format=fmt,
                                             sampling=spb.SamplingParams(max_tokens=max_tokens), **kw),
                         timeout=120)


# --------------------------------------------------------------------------------------------
def test_health_and_reflection(stack):
    assert health_status(stack.serving.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(stack.trainer.address, "tunewire.trainer.v1.TrainerService") == 1
    with grpc.insecure_channel(stack.serving.address) as ch:
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"tunewire.serving.v1.ServingService", "grpc.health.v1.Health"} <= names


def test_invalid_job_spec_is_invalid_argument_with_field(stack, dataset):
    bad = job_spec(stack.model, dataset, "x")
    bad.lora.lora_dropout = 1.5
    _, fields = expect_error(lambda: stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=bad)),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert "training_job.lora.lora_dropout" in fields
    missing = job_spec(stack.model, stack.tmp / "nope.jsonl", "x")
    _, fields = expect_error(lambda: stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=missing)),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert "training_job.training_data.path" in fields
    expect_error(lambda: stack.jobs.GetTrainingJob(tpb.GetTrainingJobRequest(name="trainingJobs/nope")),
                 grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")


def test_training_job_runs_publishes_and_hands_off(stack, trained, dataset):
    job, entries, final = trained
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))  # gapless, from 1
    assert states(entries) == ["QUEUED", "RUNNING", "PUBLISHING", "SUCCEEDED"]
    metrics = [e.metric for e in entries if e.WhichOneof("payload") == "metric"]
    assert [m.step for m in metrics] == list(range(1, 31))
    assert all(m.loss > 0 and m.learning_rate > 0 and m.grad_norm > 0 and m.tokens_per_second > 0
               for m in metrics)
    assert final.state == tpb.TrainingJob.STATE_SUCCEEDED
    assert final.result.serving_loaded, final.result.serving_message
    assert Path(final.result.uri, "manifest.json").is_file()
    # same numbers as peft's print_trainable_parameters for the same config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(stack.model),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert (final.trainable_params, final.total_params) == peft_model.get_nb_trainable_parameters()
    # JSON eval through serving, base model vs adapter, on the validation set
    for key in ("json_valid_json_rate", "json_schema_valid_rate", "json_field_accuracy",
                "base_json_valid_json_rate", "base_json_field_accuracy"):
        assert 0.0 <= final.result.metrics[key] <= 1.0, key
    evals_seen = [e.event for e in entries if e.WhichOneof("payload") == "event"
                  and e.event.type == tpb.JobEvent.TYPE_EVAL_COMPLETED]
    assert any("json_field_accuracy" in ev.metrics for ev in evals_seen), [ev.message for ev in evals_seen]
    # idempotent create: same request id → same job; a different spec under it is refused
    again = stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(
        training_job=job, request_id="e2e-1")).training_job
    assert again.id == job.id
    expect_error(lambda: stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(
        training_job=job_spec(stack.model, dataset, "json-extract"), request_id="e2e-1")),
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    listed = stack.jobs.ListTrainingJobs(tpb.ListTrainingJobsRequest(state=tpb.TrainingJob.STATE_SUCCEEDED))
    assert job.id in [j.id for j in listed.training_jobs]
    adapters_listed = stack.gen.ListAdapters(spb.ListAdaptersRequest()).adapters
    assert [(a.name, a.version) for a in adapters_listed if a.name == "json-extract"] == [
        ("json-extract", final.result.version)]


def test_watch_replays_from_after_seq(stack, trained):
    job, entries, _ = trained
    k = len(entries) // 2
    replay = watch_all(stack.jobs, job.id, after_seq=k)
    assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in entries[k:]]


def test_adapter_greedy_output_equals_hf_peft(stack, trained):
    _, _, final = trained
    got = [visible_text(generate(stack.gen, p, adapter="json-extract").text) for p in PROMPTS]
    want = hf_greedy(stack.model, final.result.uri, PROMPTS)
    assert got == want
    base = [visible_text(generate(stack.gen, p).text) for p in PROMPTS]
    assert base != got  # the adapter changed something, so the comparison means something


def test_json_schema_output_parses_and_validates(stack, trained):
    for p in PROMPTS[:2]:
        r = generate(stack.gen, p, adapter="json-extract", schema=SCHEMA, max_tokens=60)
        jsonschema.validate(json.loads(r.text), SCHEMA)
        assert r.structured_output_valid and r.finish_reason == spb.FINISH_REASON_STOP
        assert (r.adapter, r.adapter_version) == ("json-extract", "v1")
        assert r.timings.total_ms >= r.timings.ttft_ms > 0
    r = stack.gen.Generate(spb.GenerateRequest(
        prompt=PROMPTS[0], response_format=spb.ResponseFormat(json_object=spb.JsonObjectFormat()),
        sampling=spb.SamplingParams(max_tokens=60)))
    if r.finish_reason == spb.FINISH_REASON_STOP:
        assert isinstance(json.loads(r.text), dict) and r.structured_output_valid
    else:  # a random model may ramble to max_tokens: then the server must say so
        assert not r.structured_output_valid and "max_tokens" in r.structured_output_error


def test_stream_generate_deltas_add_up(stack, trained):
    req = dict(adapter="json-extract", prompt=PROMPTS[0], sampling=spb.SamplingParams(max_tokens=16))
    chunks = list(stack.gen.StreamGenerate(spb.StreamGenerateRequest(**req)))
    whole = stack.gen.Generate(spb.GenerateRequest(**req))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason != spb.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].completion_tokens == whole.completion_tokens > 0
    assert chunks[-1].prompt_tokens == whole.prompt_tokens > 0
    assert all(c.finish_reason == spb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_mixed_batch_each_row_gets_its_own_adapter(stack):
    loaded = {}
    for name, r, targets, seed in [("mix-a", 8, ["q_proj", "v_proj"], 1),
                                   ("mix-b", 16, "all-linear", 2)]:
        src = random_adapter(stack.model, stack.tmp / f"src-{name}", r, targets, seed)
        dest, m = adapters.publish(src, stack.store, name, base_model_dir=stack.model)
        stack.gen.LoadAdapter(spb.LoadAdapterRequest(name=name, uri=str(dest), manifest_sha256=m.sha256))
        loaded[name] = dest
    prompts = PROMPTS[:3]
    want = {a: hf_greedy(stack.model, loaded.get(a), prompts) for a in ("", "mix-a", "mix-b")}
    assert want[""] != want["mix-a"] and want[""] != want["mix-b"] and want["mix-a"] != want["mix-b"]
    jobs = [(a, p) for _ in range(2) for p in prompts for a in ("", "mix-a", "mix-b")]
    barrier = threading.Barrier(len(jobs))

    def one(job):
        barrier.wait()  # release together so the engine batches base and adapter rows
        return visible_text(generate(stack.gen, job[1], adapter=job[0]).text)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    for (a, p), text in zip(jobs, got):
        assert text == want[a][prompts.index(p)], (a, p)


def test_bad_requests_get_clear_statuses(stack, tiny_model_dir):
    expect_error(lambda: generate(stack.gen, "hi", adapter="no-such-adapter"),
                 grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    expect_error(lambda: stack.gen.Generate(spb.GenerateRequest(prompt="hi", response_format=spb.ResponseFormat(
        json_schema=spb.JsonSchemaFormat(schema='{"type": "banana"}')))),
        grpc.StatusCode.INVALID_ARGUMENT, "JSON_SCHEMA_INVALID")
    expect_error(lambda: stack.gen.Generate(spb.GenerateRequest(prompt="hi", response_format=spb.ResponseFormat(
        json_schema=spb.JsonSchemaFormat(schema='{"type": ')))),
        grpc.StatusCode.INVALID_ARGUMENT, "JSON_SCHEMA_INVALID")
    expect_error(lambda: stack.gen.Generate(spb.GenerateRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    expect_error(lambda: stack.gen.LoadAdapter(spb.LoadAdapterRequest(name="evil", uri="/etc")),
                 grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_URI_OUTSIDE_STORE")
    big = random_adapter(stack.model, stack.tmp / "src-big", 32, ["q_proj"], 3)
    dest, _ = adapters.publish(big, stack.store, "too-big", base_model_dir=stack.model)
    expect_error(lambda: stack.gen.LoadAdapter(spb.LoadAdapterRequest(name="too-big", uri=str(dest))),
                 grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_RANK_TOO_LARGE")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dora_src = stack.tmp / "src-dora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(stack.model),
                   LoraConfig(r=8, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora_src)
    dest, _ = adapters.publish(dora_src, stack.store, "dora", base_model_dir=stack.model)
    expect_error(lambda: stack.gen.LoadAdapter(spb.LoadAdapterRequest(name="dora", uri=str(dest))),
                 grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_DORA_UNSUPPORTED")
    head = stack.tmp / "src-head"
    head.mkdir()
    (head / "classifier.json").write_text("{}")
    (head / "head.safetensors").write_bytes(b"weights")
    dest, _ = adapters.publish(head, stack.store, "a-head", base_model_dir=stack.model)
    expect_error(lambda: stack.gen.LoadAdapter(spb.LoadAdapterRequest(name="a-head", uri=str(dest))),
                 grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_KIND_UNSUPPORTED")
    expect_error(lambda: stack.gen.UnloadAdapter(spb.UnloadAdapterRequest(name="never-loaded")),
                 grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    # the engine is still alive and serving after all of that
    assert generate(stack.gen, "hi", max_tokens=4).completion_tokens > 0


def test_cancel_running_job_stops_the_worker(stack, dataset):
    job = stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(
        training_job=job_spec(stack.model, dataset, "long-run", max_steps=100000))).training_job
    pid = None
    stream = stack.jobs.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.id), timeout=300)
    for e in stream:
        if e.WhichOneof("payload") == "event" and e.event.type == tpb.JobEvent.TYPE_WORKER_STARTED:
            pid = int(e.event.data["pid"])
        if e.WhichOneof("payload") == "metric":
            break
    stream.cancel()
    assert pid and psutil.pid_exists(pid)
    resp = stack.jobs.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name)).training_job
    assert resp.state in (tpb.TrainingJob.STATE_CANCELLING, tpb.TrainingJob.STATE_CANCELLED)
    rest = watch_all(stack.jobs, job.id, timeout=120)
    assert states(rest)[-1] == "CANCELLED"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    expect_error(lambda: stack.jobs.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name)),
                 grpc.StatusCode.FAILED_PRECONDITION, "JOB_ALREADY_TERMINAL")


def test_job_serving_cannot_load_is_refused_at_create(stack, dataset, tmp_path):
    """Fail fast: a job on another base model than serving's is refused at create (before it
    trains for nothing and fails its handoff), naming the field; nothing is stored."""
    from tunewire.tiny_model import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other-base", hidden_size=32)  # serving runs a different base
    before = stack.jobs.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=1000)).training_jobs
    _, fields = expect_error(lambda: stack.jobs.CreateTrainingJob(tpb.CreateTrainingJobRequest(
        training_job=job_spec(other, dataset, "wrong-base", max_steps=3))),
        grpc.StatusCode.FAILED_PRECONDITION, "INCOMPATIBLE_WITH_SERVING")
    assert "training_job.base_model" in fields, fields
    after = stack.jobs.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=1000)).training_jobs
    assert len(after) == len(before)


def cli(stack, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunewire.cli", "--trainer", stack.trainer.address,
                           "--serving", stack.serving.address, *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_drives_both_services(stack, trained, tmp_path):
    job, _, final = trained
    listed = cli(stack, "jobs", "list", "--state", "succeeded")
    assert listed.returncode == 0 and job.id in listed.stdout
    watched = cli(stack, "jobs", "watch", job.id)  # replays the finished job's stream with the bar
    assert watched.returncode == 0 and "state succeeded" in watched.stderr
    assert "adapter_published" in watched.stderr
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    out = cli(stack, "generate", "--adapter", "json-extract", "--json-schema", str(schema_file),
              "--max-tokens", "60", "--prompt", PROMPTS[0])
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(json.loads(out.stdout)["text"]), SCHEMA)
    adapters_out = cli(stack, "adapters", "list")
    assert f"json-extract@{final.result.version}" in adapters_out.stdout
    info = cli(stack, "model", "info")
    assert info.returncode == 0 and json.loads(info.stdout)["max_model_len"] == 256
    tok = cli(stack, "model", "tokenize", "alice is")
    assert tok.returncode == 0 and tok.stdout.strip().endswith("tokens")
    missing = cli(stack, "generate", "--adapter", "nope", "--prompt", "x")
    assert missing.returncode == 1 and "NOT_FOUND ADAPTER_NOT_FOUND" in missing.stderr


def test_cli_upload_validate_create_take_the_same_paths(stack, dataset, tmp_path):
    """The path `datasets upload` prints works unchanged in `datasets validate` and `jobs create`,
    and so does a base model relative to the trainer's model_root: the client runs in a directory
    that holds none of them (paths are the trainer's, not the client's)."""
    upload = cli(stack, "datasets", "upload", str(dataset), cwd=tmp_path)
    assert upload.returncode == 0, upload.stderr
    path = json.loads(upload.stdout)["path"]
    assert path.startswith("uploads/") and not (tmp_path / path).exists()
    model = str(stack.model.resolve().relative_to(stack.tmp.resolve().parent))  # the model_root
    data = ["--base-model", model, "--data", path, "--validation-data", path, "--max-seq-length", "64",
            "--batch-size", "4"]
    validated = cli(stack, "datasets", "validate", *data, cwd=tmp_path)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert json.loads(validated.stdout)["ok"] is True
    created = cli(stack, "jobs", "create", *data, "--adapter-name", "cli-made", "--max-steps", "2",
                  "--lr", "0.01", "--watch", cwd=tmp_path)
    assert created.returncode == 0 and "state succeeded" in created.stderr, created.stderr[-3000:]
    job_id = created.stderr.split("created ", 1)[1].split()[0]
    job = stack.jobs.GetTrainingJob(tpb.GetTrainingJobRequest(name=job_id)).training_job
    root = stack.tmp.parent  # the trainer's data_root: it trained on the uploaded file
    assert (root / job.training_data.path).resolve() == (root / path).resolve()
    assert job.result.adapter == "cli-made" and job.result.serving_loaded


def test_tokenize_and_model_info(stack, trained, tiny_model_dir):
    from transformers import AutoTokenizer

    text = 'alice is 21 years old {"name": "alice"}'
    r = stack.gen.Tokenize(spb.TokenizeRequest(text=text))
    assert [t.id for t in r.tokens] == AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    assert r.token_count == len(r.tokens) and "".join(t.text for t in r.tokens) == text
    assert all(text[t.start:t.end] == t.text for t in r.tokens)
    assert stack.gen.Tokenize(spb.TokenizeRequest(adapter="json-extract", text=text)).token_count == r.token_count
    expect_error(lambda: stack.gen.Tokenize(spb.TokenizeRequest(adapter="nope", text=text)),
                 grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    info = stack.gen.GetModelInfo(spb.GetModelInfoRequest())
    assert info.model == str(stack.model) and info.max_model_len == 256 and info.max_loras == 2
    assert info.base_model_fingerprint == adapters.base_model_fingerprint(stack.model)
    assert "json_schema" in info.response_formats and info.vllm_version.startswith("0.32")


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_metrics_endpoints_expose_named_metrics(stack, trained):
    t = _metrics(stack.trainer.metrics_port)
    for name in ("tunewire_trainer_jobs{", 'tunewire_trainer_jobs{state="QUEUED"}',
                 "tunewire_trainer_steps_total", "tunewire_trainer_loss",
                 "tunewire_trainer_tokens_per_second", "tunewire_trainer_step_seconds_bucket",
                 "tunewire_trainer_checkpoints_total", "tunewire_trainer_resumes_total",
                 "tunewire_trainer_publish_seconds_bucket", "tunewire_trainer_dataset_failures_total",
                 "tunewire_trainer_worker_retries_total", 'grpc_server_handled_total{grpc_code="OK",'
                 'grpc_method="CreateTrainingJob"', "grpc_server_handling_seconds_bucket"):
        assert name in t, name
    s = _metrics(stack.serving.metrics_port)
    for name in (series("tunewire_serving_requests_total", adapter="json-extract", frontend="grpc", outcome="ok"),
                 series("tunewire_serving_requests_total", adapter="base", frontend="grpc", outcome="ok"),
                 "tunewire_serving_ttft_seconds_bucket", "tunewire_serving_e2e_latency_seconds_bucket",
                 "tunewire_serving_tokens_total", "tunewire_serving_adapters_resident",
                 'grpc_method="Generate"', "vllm:"):
        assert name in s, name
