"""The feature-extraction classifier recipe on the tiny random Llama (no downloads, seconds): its
data read through the readers every method uses (JSONL, CSV, Parquet), the head it trains, and
every data problem named by its line (or row) and field."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from trainer_service import recipe_classifier
from trainer_service.recipe_classifier import (Cancelled, ClassifierSettings, macro_f1, predict,
                                               run)
from tunewire.adapters import base_model_fingerprint, sha256_file
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(120)
# Each label has its own names and cities; the template and the ages are shared, so only those
# words separate the classes. (A random body is a poor feature extractor: shuffled filler words
# drown the class words, a fixed template does not.)
CLASS_WORDS = {"north": (("alice", "carol"), ("paris", "lima")),
               "south": (("bob", "dave"), ("oslo", "rome")),
               "west": (("erin", "frank"), ("kyiv", "cairo"))}


def rows(n_per_label: int, seed: int, labels=tuple(CLASS_WORDS)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_per_label):
        for label in labels:
            names, cities = CLASS_WORDS[label]
            out.append({"text": f"{rng.choice(names)} is {rng.randint(18, 90)} years old and "
                                f"lives in {rng.choice(cities)}.", "label": label})
    rng.shuffle(out)
    return out


def write_jsonl(path, items) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
    return str(path)


def write_csv(path, items) -> str:
    pd.DataFrame(items).to_csv(path, index=False)
    return str(path)


def write_parquet(path, items) -> str:
    pd.DataFrame(items).to_parquet(path)
    return str(path)


class ListReporter:
    def __init__(self):
        self.started_args, self.events, self.metrics, self.evaluations = None, [], [], []

    def started(self, trainable_params, total_params, total_steps):
        self.started_args = (trainable_params, total_params, total_steps)

    def event(self, kind, message, data):
        assert all(isinstance(v, str) for v in data.values())
        self.events.append(kind)

    def metric(self, **point):
        self.metrics.append(point)

    def evaluation(self, *, step, metrics):
        self.evaluations.append((step, metrics))


def settings_for(model_dir, train, **kw) -> ClassifierSettings:
    kw = {"learning_rate": 2e-2, "num_epochs": 15, "batch_size": 8, **kw}
    return ClassifierSettings(base_model=str(model_dir), training_data=train, **kw)


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One training run shared by the tests that inspect its result.

    The body that run() loads is captured, hashed right after loading and again after training.
    """
    tmp = tmp_path_factory.mktemp("classifier")
    train = write_jsonl(tmp / "train.jsonl", rows(20, seed=1))
    val_items = rows(6, seed=2)
    val = write_jsonl(tmp / "val.jsonl", val_items)
    weights = tiny_model_dir / "model.safetensors"
    file_hash = sha256_file(weights)
    captured = {}
    load_body = recipe_classifier._load_body

    def spy(base_model, *args):
        body = load_body(base_model, *args)
        captured["body"], captured["hash_at_load"] = body, state_hash(body)
        return body

    mp = pytest.MonkeyPatch()
    mp.setattr(recipe_classifier, "_load_body", spy)
    reporter = ListReporter()
    try:
        metrics = run(settings_for(tiny_model_dir, train, validation_data=val, eval_every=10),
                      tmp / "out", reporter, should_stop=lambda: False)
    finally:
        mp.undo()
    return {"metrics": metrics, "reporter": reporter, "out": tmp / "out" / "classifier",
            "val_items": val_items, "body": captured["body"],
            "hash_at_load": captured["hash_at_load"], "hash_after": state_hash(captured["body"]),
            "file_hash_before": file_hash, "file_hash_after": sha256_file(weights)}


# -- training ---------------------------------------------------------------------------------
def test_head_separates_the_classes_and_reports_evaluations(trained):
    m, rep = trained["metrics"], trained["reporter"]
    assert m["accuracy"] >= 0.9 and m["macro_f1"] >= 0.9
    assert m["eval_loss"] < 0.5 and m["train_loss"] > 0
    assert m["examples"] == 60 and m["validation_examples"] == 18 and m["num_labels"] == 3
    assert rep.events == ["DATASET_LOADED", "MODEL_LOADED", "ADAPTER_SAVED"]

    total_steps = rep.started_args[2]
    assert total_steps == 15 * 8  # ceil(60 / 8) steps per epoch, 15 epochs
    assert [p["step"] for p in rep.metrics] == list(range(1, total_steps + 1))
    assert all(p["total_steps"] == total_steps and p["tokens_per_second"] > 0 for p in rep.metrics)
    seen = [p["tokens_seen"] for p in rep.metrics]
    assert seen == sorted(seen) and m["train_tokens"] == seen[-1]
    streamed = [p["loss"] for p in rep.metrics]    # the reference: what the job streamed
    assert m["final_loss"] == streamed[-1] and m["tail_loss"] == pytest.approx(sum(streamed[-10:]) / 10)
    assert rep.metrics[0]["loss"] == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-4)

    steps = [s for s, _ in rep.evaluations]
    assert steps == list(range(10, total_steps + 1, 10))  # eval_every=10; 120 is also the end
    for _, ev in rep.evaluations:
        assert set(ev) == {"eval_loss", "accuracy", "macro_f1"}
        assert 0 <= ev["accuracy"] <= 1 and 0 <= ev["macro_f1"] <= 1 and ev["eval_loss"] >= 0
    assert rep.evaluations[-1][1] == {k: m[k] for k in ("eval_loss", "accuracy", "macro_f1")}


def test_body_is_unchanged_and_only_the_head_is_saved(trained, tiny_model_dir):
    body = trained["body"]
    assert trained["hash_at_load"] == trained["hash_after"]
    assert trained["file_hash_before"] == trained["file_hash_after"]
    assert not any(p.requires_grad for p in body.parameters()) and not body.training

    from safetensors.torch import load_file

    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "head.safetensors"]
    head = load_file(str(out / "head.safetensors"))
    hidden, classes = body.config.hidden_size, 3
    assert {k: tuple(v.shape) for k, v in head.items()} == {"weight": (classes, hidden),
                                                            "bias": (classes,)}
    assert sum(v.numel() for v in head.values()) == hidden * classes + classes
    config = json.loads((out / "classifier.json").read_text())
    assert config == {"method": "feature_extraction", "pooling": "mean", "hidden_size": hidden,
                      "num_labels": 3, "max_seq_length": 256,
                      "id2label": {"0": "north", "1": "south", "2": "west"},
                      "base_model_fingerprint": base_model_fingerprint(tiny_model_dir),
                      "feature_precision": "fp32"}  # on this CPU
    assert body.dtype == torch.float32 and body.device.type == "cpu"


def test_trainable_is_the_head_and_total_adds_the_body(trained):
    body = trained["body"]
    trainable, total, _ = trained["reporter"].started_args
    hidden = body.config.hidden_size
    assert trainable == hidden * 3 + 3
    assert total == sum(p.numel() for p in body.parameters()) + trainable


def test_predict_agrees_with_the_validation_in_training(trained, tiny_model_dir):
    items = trained["val_items"]
    out = predict(trained["out"], tiny_model_dir, [r["text"] for r in items])
    assert len(out) == len(items)
    for label, probs in out:
        assert len(probs) == 3 and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert label == ["north", "south", "west"][max(range(3), key=probs.__getitem__)]
    accuracy = sum(label == r["label"] for (label, _), r in zip(out, items)) / len(items)
    assert accuracy == pytest.approx(trained["metrics"]["accuracy"])
    # Not just the argmax: the probabilities give the eval_loss reported in training.
    index = {"north": 0, "south": 1, "west": 2}
    nll = -sum(math.log(probs[index[r["label"]]]) for (_, probs), r in zip(out, items))
    assert nll / len(items) == pytest.approx(trained["metrics"]["eval_loss"], rel=1e-3, abs=1e-5)
    assert predict(trained["out"], tiny_model_dir, []) == []


def test_last_pooling_and_held_out_validation(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(20, seed=3, labels=("north", "south")))
    rep = ListReporter()
    m = run(settings_for(tiny_model_dir, train, pooling="last", validation_fraction=0.25,
                         max_steps=30),
            tmp_path / "out", rep, should_stop=lambda: False)
    # Stratified: 5 of each label's 20 rows are held out.
    assert m["examples"] == 30 and m["validation_examples"] == 10 and m["steps"] == 30
    assert 0 <= m["accuracy"] <= 1 and m["eval_loss"] >= 0
    # eval_every=0: at every epoch end (4 steps each) and at the end.
    assert [s for s, _ in rep.evaluations] == [4, 8, 12, 16, 20, 24, 28, 30]
    config = json.loads((tmp_path / "out" / "classifier" / "classifier.json").read_text())
    assert config["pooling"] == "last"


def test_integer_labels_keep_their_type(tiny_model_dir, tmp_path):
    items = [{"text": r["text"], "label": {"north": 7, "south": 3}[r["label"]]}
             for r in rows(10, seed=4, labels=("north", "south"))]
    train = write_jsonl(tmp_path / "train.jsonl", items)
    run(settings_for(tiny_model_dir, train, max_steps=5), tmp_path / "out", ListReporter(),
        should_stop=lambda: False)
    config = json.loads((tmp_path / "out" / "classifier" / "classifier.json").read_text())
    assert config["id2label"] == {"0": 3, "1": 7}
    label, _ = predict(tmp_path / "out" / "classifier", tiny_model_dir, ["bob oslo"])[0]
    assert label in (3, 7)


# -- file types: the readers every method uses ----------------------------------------------
@pytest.mark.parametrize("write, ext", [(write_csv, "csv"), (write_parquet, "parquet")])
def test_csv_and_parquet_files_train_the_head_the_jsonl_file_does(tiny_model_dir, tmp_path, write,
                                                                   ext):
    """The same rows as CSV or Parquet are the same examples in the same order, so the run
    trains the JSONL run's head bit for bit."""
    train, val = rows(8, seed=11), rows(3, seed=12)
    runs = {}
    for name, writer, suffix in (("jsonl", write_jsonl, "jsonl"), (ext, write, ext)):
        d = tmp_path / name
        d.mkdir()
        metrics = run(settings_for(tiny_model_dir, writer(d / f"train.{suffix}", train),
                                   validation_data=writer(d / f"val.{suffix}", val), max_steps=12),
                      d / "out", ListReporter(), should_stop=lambda: False)
        head = d / "out" / "classifier"
        runs[name] = (metrics, load_file(str(head / "head.safetensors")),
                      json.loads((head / "classifier.json").read_text()))
    (m_ref, head_ref, config_ref), (m, head, config) = runs["jsonl"], runs[ext]
    assert (m["examples"], m["validation_examples"], m["num_labels"]) == (24, 9, 3)
    assert config == config_ref and config["id2label"] == {"0": "north", "1": "south", "2": "west"}
    assert head.keys() == head_ref.keys() and all(torch.equal(head[k], head_ref[k]) for k in head)
    for key in ("eval_loss", "accuracy", "macro_f1", "train_loss", "train_tokens"):
        assert m[key] == m_ref[key], key


def test_parquet_integer_labels_keep_their_type(tiny_model_dir, tmp_path):
    items = [{"text": r["text"], "label": {"north": 7, "south": 3}[r["label"]]}
             for r in rows(6, seed=15, labels=("north", "south"))]
    run(settings_for(tiny_model_dir, write_parquet(tmp_path / "train.parquet", items), max_steps=3),
        tmp_path / "out", ListReporter(), should_stop=lambda: False)
    config = json.loads((tmp_path / "out" / "classifier" / "classifier.json").read_text())
    assert config["id2label"] == {"0": 3, "1": 7}


# -- failures ---------------------------------------------------------------------------------
def expect_failure(model_dir, tmp_path, train_items=None, *, val_items=None, train=None, val=None,
                   reason="DATASET_INVALID", match=""):
    """Runs on JSONL files of `train_items` / `val_items` (or the files `train` / `val`) and
    returns the error, checking it came before the model was loaded."""
    train = train or write_jsonl(tmp_path / "train.jsonl", train_items)
    if val is None and val_items is not None:
        val = write_jsonl(tmp_path / "val.jsonl", val_items)
    loaded = []
    with pytest.raises(TunewireError) as e:
        mp = pytest.MonkeyPatch()
        mp.setattr(recipe_classifier, "_load_body", lambda b, *args: loaded.append(b))
        try:
            run(settings_for(model_dir, train, validation_data=val), tmp_path / "out",
                ListReporter(), should_stop=lambda: False)
        finally:
            mp.undo()
    assert e.value.reason == reason and e.value.job_error()["user_error"]
    assert match in e.value.message, e.value.message
    assert not loaded  # data errors come before the model is loaded
    return e.value


def test_validation_label_unseen_in_training_fails(tiny_model_dir, tmp_path):
    val = rows(2, seed=5)
    val[3] = {"text": "dave rome", "label": "east"}
    expect_failure(tiny_model_dir, tmp_path, rows(5, seed=5), val_items=val,
                   match="validation data line 4: field label: 'east' does not occur")


def test_a_single_class_fails(tiny_model_dir, tmp_path):
    expect_failure(tiny_model_dir, tmp_path, rows(10, seed=6, labels=("north",)),
                   match="training data has 1 label ('north'); a classifier needs at least 2")


@pytest.mark.parametrize("bad, match", [
    ("{not json", "training data line 3: not valid JSON"),
    ({"label": "north"}, "training data line 3: field text: is missing"),
    ({"text": "alice", "label": 1.5}, "training data line 3: field label: must be a string or"),
    ({"text": "alice", "label": True}, "training data line 3: field label: must be a string or"),
    ({"text": 5, "label": "north"}, "training data line 3: field text: must be a string"),
    ({"text": "", "label": "north"}, "training data line 3: field text: must not be empty"),
    ({"text": "alice", "label": 3}, "training data line 3: field label: is integer but line 1 has "
                                    "string"),
    ([1, 2], "training data line 3: expected an object"),
])
def test_malformed_lines_fail_with_line_and_field(tiny_model_dir, tmp_path, bad, match):
    items = rows(5, seed=7)
    items[2] = bad
    expect_failure(tiny_model_dir, tmp_path, items, match=match)


def test_csv_bad_rows_name_their_file_line(tiny_model_dir, tmp_path):
    # The header is line 1 and a quoted text spans lines 3-4, so the next record is line 5.
    (tmp_path / "t.csv").write_text('text,label\nalice paris,north\n"bob\noslo",south\n,west\n'
                                     'erin kyiv,west\n')
    expect_failure(tiny_model_dir, tmp_path, train=str(tmp_path / "t.csv"),
                   match="training data line 5: field text: must not be empty")
    (tmp_path / "v.csv").write_text('text,label\ncarol lima,north\ndave rome,east\n')
    expect_failure(tiny_model_dir, tmp_path, rows(5, seed=16), val=str(tmp_path / "v.csv"),
                   match="validation data line 3: field label: 'east' does not occur in the "
                         "training data")


def test_parquet_bad_rows_name_their_row(tiny_model_dir, tmp_path):
    items = rows(4, seed=17)
    items[2] = {"text": items[2]["text"], "label": None}
    expect_failure(tiny_model_dir, tmp_path, train=write_parquet(tmp_path / "t.parquet", items),
                   match="training data row 3: field label: is missing")
    val = rows(2, seed=18)
    val[1] = {"text": "", "label": val[1]["label"]}
    expect_failure(tiny_model_dir, tmp_path, rows(5, seed=18),
                   val=write_parquet(tmp_path / "v.parquet", val),
                   match="validation data row 2: field text: must not be empty")


def test_rows_of_another_format_are_refused(tiny_model_dir, tmp_path):
    pc = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    expect_failure(tiny_model_dir, tmp_path, train=write_csv(tmp_path / "pc.csv", pc),
                   reason="METHOD_DATA_MISMATCH", match="holds prompt_completion rows")


def test_missing_and_empty_files_fail(tiny_model_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for path, reason in ((tmp_path / "nope.jsonl", "DATASET_NOT_FOUND"),
                         (tmp_path / "empty.jsonl", "DATASET_EMPTY")):
        with pytest.raises(TunewireError) as e:
            run(settings_for(tiny_model_dir, str(path)), tmp_path / "out", ListReporter(),
                should_stop=lambda: False)
        assert e.value.reason == reason and e.value.job_error()["user_error"]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="pooling"):
        ClassifierSettings(base_model="m", training_data="t", pooling="max")
    with pytest.raises(ValueError, match="validation_fraction"):
        ClassifierSettings(base_model="m", training_data="t", validation_fraction=1.0)
    with pytest.raises(ValueError, match="eval_every"):
        ClassifierSettings(base_model="m", training_data="t", eval_every=-1)


def test_should_stop_cancels_and_saves_nothing(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(10, seed=8))
    rep = ListReporter()
    with pytest.raises(Cancelled):
        run(settings_for(tiny_model_dir, train), tmp_path / "out", rep,
            should_stop=lambda: len(rep.metrics) >= 3)
    assert len(rep.metrics) == 3
    assert not (tmp_path / "out" / "classifier").exists()
    with pytest.raises(Cancelled, match="extracting features"):
        run(settings_for(tiny_model_dir, train), tmp_path / "out", ListReporter(),
            should_stop=lambda: True)


# -- F1 ---------------------------------------------------------------------------------------
def test_macro_f1_on_a_hand_made_confusion():
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 1, FP 1, FN 1 -> 2/4; class 2: TP 0, FN 1,
    # FP 1 -> 0. Class 3 occurs nowhere and does not count.
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 0]
    assert macro_f1(y_true, y_pred) == pytest.approx((4 / 6 + 2 / 4 + 0) / 3)
    assert macro_f1([0, 1, 1], [0, 1, 1]) == 1.0
    assert macro_f1([1, 1], [0, 0]) == 0.0
    assert macro_f1([], []) == 0.0
    with pytest.raises(ValueError):
        macro_f1([0], [])


def test_on_a_gpu_features_are_extracted_there_in_bf16(tiny_model_dir, tmp_path, monkeypatch):
    """The recipe's device decisions with a faked GPU (the device is the only thing faked; the
    real CPU body stands in for the GPU one): the body is asked for on cuda:0 in bf16, the head
    trains in fp32 and classifier.json records the features' precision."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    calls, load_body = [], recipe_classifier._load_body
    monkeypatch.setattr(recipe_classifier, "_load_body",
                        lambda base, *args: calls.append(args) or load_body(base, "cpu"))
    events = []

    class Events(ListReporter):
        def event(self, kind, message, data):
            super().event(kind, message, data)
            events.append((kind, data))

    train = write_jsonl(tmp_path / "train.jsonl", rows(6, seed=1))
    run(settings_for(tiny_model_dir, train, max_steps=3), tmp_path / "out", Events(),
        should_stop=lambda: False)
    assert calls == [(torch.device("cuda", 0), torch.bfloat16)]
    loaded = dict(events)["MODEL_LOADED"]
    assert (loaded["device"], loaded["precision"]) == ("cuda", "bf16")
    config = json.loads((tmp_path / "out" / "classifier" / "classifier.json").read_text())
    assert config["feature_precision"] == "bf16"
    head = load_file(str(tmp_path / "out" / "classifier" / "head.safetensors"))
    assert all(t.dtype == torch.float32 for t in head.values())
