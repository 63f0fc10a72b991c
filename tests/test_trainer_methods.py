"""The three methods and the data checks through the trainer service: LoRA, full fine-tuning and
feature extraction (from JSONL, CSV and Parquet files); method/data mismatches and paths outside
the data root refused at create time; a dataset with errors failing as user_error before any
training, naming every bad line or row; the VALIDATED report."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pandas as pd
import pytest

from harness import expect_error, start_service, states, watch_all
from tunewire import adapters
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    (root / "data").mkdir()
    trainer = start_service("trainer", root, "--data-root", str(root / "data"), "--data-dir",
                            str(root / "t"), "--adapter-store", str(root / "store"), "--drain-seconds", "0.2",
                            "--max-upload-bytes", "4096", "--max-dataset-bytes", "20000")
    trainer.wait_serving(60)
    yield root, trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))
    trainer.stop()


def _write(root, name, rows):
    path = root / "data" / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _job(model, data, name, method, max_steps=6, **kw):
    return tpb.TrainingJob(base_model=str(model), adapter_name=name, training_data=tpb.DatasetRef(path=str(data)),
                           hyperparameters=tpb.Hyperparameters(learning_rate=1e-3, max_steps=max_steps,
                                                               batch_size=4, max_seq_length=32),
                           **{method: kw.pop("method_msg")}, **kw)


PC = [{"prompt": f"q{i} ", "completion": f"a{i % 3}"} for i in range(12)]
CLS = [{"text": f"{'alice paris' if i % 2 else 'bob oslo'} number {i}", "label": "ab"[i % 2]} for i in range(24)]


def test_method_and_data_must_fit_at_create_time(svc, tiny_model_dir):
    root, stub = svc
    pc, cls = _write(root, "pc.jsonl", PC), _write(root, "cls.jsonl", CLS)
    create = lambda job: stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job))  # noqa: E731
    _, fields = expect_error(lambda: create(_job(tiny_model_dir, pc, "x", "feature_extraction",
                                                 method_msg=tpb.FeatureExtractionMethod())),
                             grpc.StatusCode.INVALID_ARGUMENT, "METHOD_DATA_MISMATCH")
    assert "training_job.training_data.path" in fields
    expect_error(lambda: create(_job(tiny_model_dir, cls, "x", "lora", method_msg=tpb.LoraMethod(r=4))),
                 grpc.StatusCode.INVALID_ARGUMENT, "METHOD_DATA_MISMATCH")
    for outside in ("../pc.jsonl", "/etc/passwd"):
        expect_error(lambda: create(_job(tiny_model_dir, outside, "x", "lora", method_msg=tpb.LoraMethod(r=4))),
                     grpc.StatusCode.INVALID_ARGUMENT, "DATASET_PATH_INVALID")
    expect_error(lambda: create(tpb.TrainingJob(base_model=str(tiny_model_dir), adapter_name="x",
                                                training_data=tpb.DatasetRef(path=str(pc)))),
                 grpc.StatusCode.INVALID_ARGUMENT)  # no method
    # base models only from under the model root (the harness sets pytest's base temp dir)
    for model in ("/usr/lib", "../../../../etc"):
        _, fields = expect_error(lambda: create(_job(model, pc, "x", "lora", method_msg=tpb.LoraMethod(r=4))),
                                 grpc.StatusCode.INVALID_ARGUMENT, "MODEL_PATH_INVALID")
        assert "training_job.base_model" in fields
    multi = _job(tiny_model_dir, pc, "x", "lora", method_msg=tpb.LoraMethod(r=4))
    multi.hyperparameters.num_nodes = 2
    expect_error(lambda: create(multi), grpc.StatusCode.FAILED_PRECONDITION, "MULTI_NODE_UNSUPPORTED")
    big = _write(root, "big.jsonl", PC * 100)  # ~30 kB, over --max-dataset-bytes 20000
    expect_error(lambda: create(_job(tiny_model_dir, big, "x", "lora", method_msg=tpb.LoraMethod(r=4))),
                 grpc.StatusCode.INVALID_ARGUMENT, "DATASET_TOO_LARGE")


def test_a_dataset_with_errors_fails_before_training(svc, tiny_model_dir):
    root, stub = svc
    bad = _write(root, "bad.jsonl", [PC[0], {"prompt": "no completion"}, PC[1], "{broken", PC[2]])
    job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=_job(
        tiny_model_dir, "bad.jsonl", "bad", "lora", method_msg=tpb.LoraMethod(r=4)))).training_job
    entries = watch_all(stub, job.id, timeout=120)
    final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert states(entries)[-1] == "FAILED" and final.error.reason == "DATASET_INVALID"
    assert final.error.user_error and not final.error.retryable
    assert "line 2" in final.error.message and "line 4" in final.error.message  # every bad line
    assert not [e for e in entries if e.WhichOneof("payload") == "metric"]  # no step ran
    assert bad.is_file()


def test_lora_job_reports_the_preflight_validation(svc, tiny_model_dir):
    root, stub = svc
    _write(root, "good.jsonl", PC + PC[:2])  # two exact duplicates
    job = _job(tiny_model_dir, "good.jsonl", "good", "lora", method_msg=tpb.LoraMethod(r=4))
    job.hyperparameters.max_grad_norm = 0.0  # no clipping: kept as 0, not taken for "unset"
    job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job)).training_job
    entries = watch_all(stub, job.id, timeout=180)
    assert states(entries)[-1] == "SUCCEEDED"
    stored = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert stored.hyperparameters.HasField("max_grad_norm") and stored.hyperparameters.max_grad_norm == 0
    spec = json.loads((root / "t" / "jobs" / job.id / "spec.json").read_text())  # what the worker read
    assert spec["hyperparameters"]["max_grad_norm"] == 0
    validated = [e.event for e in entries if e.WhichOneof("payload") == "event"
                 and e.event.type == tpb.JobEvent.TYPE_VALIDATED]
    assert len(validated) == 1
    report = json.loads(validated[0].data["report"])
    assert report["ok"] and report["num_examples"] == 14 and report["duplicates"]["count"] == 2
    assert validated[0].metrics["eos_untrained"] == 0 and validated[0].metrics["coverage_mean"] > 0
    fit = [e.event.metrics for e in entries if e.WhichOneof("payload") == "event"
           and e.event.type == tpb.JobEvent.TYPE_FIT_ESTIMATED]
    assert len(fit) == 1 and fit[0]["steps"] == 6 and fit[0]["estimated_seconds"] > 0


def test_full_fine_tuning_job_produces_a_full_model(svc, tiny_model_dir):
    root, stub = svc
    _write(root, "full.jsonl", PC)
    job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=_job(
        tiny_model_dir, "full.jsonl", "full", "full", method_msg=tpb.FullMethod()))).training_job
    assert states(watch_all(stub, job.id, timeout=300))[-1] == "SUCCEEDED"
    final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert final.WhichOneof("method") == "full"
    assert final.trainable_params == final.total_params > 0
    model_dir = Path(final.result.uri)
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file() and "--model" in final.result.serving_message


def test_feature_extraction_job_publishes_a_classifier_head(svc, tiny_model_dir):
    root, stub = svc
    _write(root, "cls.jsonl", CLS)
    job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=_job(
        tiny_model_dir, "cls.jsonl", "sentiment", "feature_extraction", max_steps=30,
        method_msg=tpb.FeatureExtractionMethod(pooling=tpb.FeatureExtractionMethod.POOLING_MEAN)))).training_job
    entries = watch_all(stub, job.id, timeout=300)
    assert states(entries)[-1] == "SUCCEEDED"
    final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert 0 < final.trainable_params < final.total_params
    assert 0.0 <= final.result.metrics["accuracy"] <= 1.0 and "macro_f1" in final.result.metrics
    m = adapters.read_manifest(final.result.uri)
    assert m.kind == "classifier" and m.base_model_fingerprint == adapters.base_model_fingerprint(tiny_model_dir)
    evals = [e for e in entries if e.WhichOneof("payload") == "event"
             and e.event.type == tpb.JobEvent.TYPE_EVAL_COMPLETED]
    assert evals and "accuracy" in evals[-1].event.metrics


def _write_frame(root, name, rows) -> str:
    frame = pd.DataFrame(rows)
    if name.endswith(".csv"):
        frame.to_csv(root / "data" / name, index=False)
    else:
        frame.to_parquet(root / "data" / name)
    return name


def _fe_job(model, data, name, **kw):
    return _job(model, data, name, "feature_extraction", max_steps=10,
                method_msg=tpb.FeatureExtractionMethod(pooling=tpb.FeatureExtractionMethod.POOLING_LAST),
                **kw)


@pytest.mark.parametrize("name", ["cls.csv", "cls.parquet"])
def test_feature_extraction_learns_from_csv_and_parquet_files(svc, tiny_model_dir, name):
    root, stub = svc
    job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=_fe_job(
        tiny_model_dir, _write_frame(root, name, CLS), name.replace(".", "-")))).training_job
    entries = watch_all(stub, job.id, timeout=300)
    final = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job
    assert states(entries)[-1] == "SUCCEEDED", final.error.message
    validated = [e.event for e in entries if e.WhichOneof("payload") == "event"
                 and e.event.type == tpb.JobEvent.TYPE_VALIDATED]
    report = json.loads(validated[0].data["report"])
    assert report["format"] == "classification" and report["num_examples"] == 24
    assert report["label_counts"] == {"a": 12, "b": 12}
    m = adapters.read_manifest(final.result.uri)  # the head is published to the store
    assert m.kind == "classifier" and m.base_model_fingerprint == adapters.base_model_fingerprint(tiny_model_dir)
    config = json.loads((Path(final.result.uri) / "classifier.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b"} and config["pooling"] == "last"
    assert final.result.metrics["examples"] + final.result.metrics["validation_examples"] == 24


def test_feature_extraction_data_problems_name_their_line_or_row(svc, tiny_model_dir):
    root, stub = svc

    def failure(job) -> tpb.JobError:
        job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job)).training_job
        assert states(watch_all(stub, job.id, timeout=300))[-1] == "FAILED"
        error = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job.error
        assert error.reason == "DATASET_INVALID" and error.user_error
        return error

    # the pre-flight report, before any training: the CSV header is line 1
    (root / "data" / "bad-cls.csv").write_text("text,label\nalice paris,a\nbob oslo,b\n,a\n")
    error = failure(_fe_job(tiny_model_dir, "bad-cls.csv", "bad-csv"))
    assert "training data line 4: field text: must not be empty" in error.message
    # the recipe's own check, on a validation row of a Parquet file
    val = _write_frame(root, "val-cls.parquet", [{"text": "alice paris", "label": "a"},
                                                 {"text": "erin kyiv", "label": "c"}])
    job = _fe_job(tiny_model_dir, _write_frame(root, "ok-cls.csv", CLS), "bad-val")
    job.validation_data.path = val
    error = failure(job)
    assert "validation data row 2: field label: 'c' does not occur in the training data" in error.message


def _upload(stub, filename, payload: bytes, chunk=100):
    def parts():
        yield tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader(filename=filename))
        for i in range(0, len(payload), chunk):
            yield tpb.UploadDatasetRequest(chunk=payload[i:i + chunk])
    return stub.UploadDataset(parts(), timeout=30)


def test_upload_is_content_addressed_limited_and_validates(svc, tiny_model_dir):
    root, stub = svc
    payload = "".join(json.dumps(r) + "\n" for r in PC).encode()
    first = _upload(stub, "mine.jsonl", payload)
    again = _upload(stub, "other-name.jsonl", payload, chunk=7)
    assert first.path == again.path and first.path.startswith("uploads/") and again.deduplicated
    assert not first.deduplicated and first.size_bytes == len(payload)
    import hashlib

    assert first.sha256 == hashlib.sha256(payload).hexdigest()
    assert (root / "data" / first.path).read_bytes() == payload

    report = stub.ValidateDataset(tpb.ValidateDatasetRequest(
        base_model=str(tiny_model_dir), training_data=tpb.DatasetRef(path=first.path), max_steps=5)).report
    assert report.ok and report.format == "prompt_completion" and report.num_examples == 12
    assert report.eos_untrained == 0 and 0 < report.coverage_min <= report.coverage_mean <= 1
    assert report.steps == 5 and report.lengths.max >= report.lengths.min > 0
    assert report.estimated_seconds == 0.0  # not asked to time a step
    timed = stub.ValidateDataset(tpb.ValidateDatasetRequest(
        base_model=str(tiny_model_dir), training_data=tpb.DatasetRef(path=first.path), max_steps=5,
        measure_step_time=True), timeout=300).report
    assert timed.step_seconds > 0 and timed.estimated_seconds == pytest.approx(5 * timed.step_seconds)

    bad = _upload(stub, "bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    report = stub.ValidateDataset(tpb.ValidateDatasetRequest(
        base_model=str(tiny_model_dir), training_data=tpb.DatasetRef(path=bad.path))).report
    assert not report.ok and [(e.line, e.field) for e in report.errors][:1] == [(2, "prompt")]

    expect_error(lambda: _upload(stub, "big.jsonl", b"x" * 5000), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "UPLOAD_TOO_LARGE")
    expect_error(lambda: _upload(stub, "../evil.jsonl", payload), grpc.StatusCode.INVALID_ARGUMENT,
                 "DATASET_PATH_INVALID")
    expect_error(lambda: stub.UploadDataset(iter([tpb.UploadDatasetRequest(chunk=b"x")])),
                 grpc.StatusCode.INVALID_ARGUMENT)
    assert not list((root / "data" / "uploads").glob(".tmp-*"))  # failed uploads leave nothing
    expect_error(lambda: stub.ValidateDataset(tpb.ValidateDatasetRequest(
        base_model=str(tiny_model_dir), training_data=tpb.DatasetRef(path="/etc/passwd"))),
        grpc.StatusCode.INVALID_ARGUMENT, "DATASET_PATH_INVALID")


def test_json_eval_runs_in_the_worker_without_serving(svc, tiny_model_dir):
    root, stub = svc
    rows = [{"prompt": f"{n} is {20 + i} years old.\nJSON: ", "completion": json.dumps({"name": n, "age": 20 + i})}
            for i, n in enumerate(["alice", "bob", "carol", "dave"] * 3)]
    _write(root, "people.jsonl", rows)
    _write(root, "people-val.jsonl", rows[:4])
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    job = _job(tiny_model_dir, "people.jsonl", "people", "lora", method_msg=tpb.LoraMethod(r=4),
               json_schema=json.dumps(schema))
    job.validation_data.path = "people-val.jsonl"
    job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job)).training_job
    entries = watch_all(stub, job.id, timeout=300)
    assert states(entries)[-1] == "SUCCEEDED"
    m = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job.result.metrics
    for key in ("json_valid_json_rate", "json_field_accuracy", "base_json_valid_json_rate"):
        assert 0.0 <= m[key] <= 1.0
    assert any("in the worker" in e.event.message for e in entries
               if e.WhichOneof("payload") == "event" and e.event.type == tpb.JobEvent.TYPE_EVAL_COMPLETED)
