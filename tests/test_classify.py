"""HeadClassifier: served classification with a feature-extraction head on the tiny random Llama.

One head is trained once (seconds) and shared; every check compares with, or breaks a copy of, it.
Results are compared with the head applied by hand (`by_hand`: plain transformers + torch, one
text at a time, none of tunewire's feature code).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys

import pytest

from serving_service.classify import HeadClassifier
from trainer_service.recipe_classifier import ClassifierSettings, run
from tunewire import features, loading
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(120)

# Each label has its own names and cities in a shared template (as in test_recipe_classifier).
WORDS = {"north": (("alice", "carol"), ("paris", "lima")),
         "south": (("bob", "dave"), ("oslo", "rome")),
         "west": (("erin", "frank"), ("kyiv", "cairo"))}
TEXTS = ["alice is 30 years old and lives in paris.", "dave rome", "frank is 71 and lives in kyiv.",
         "carol", "a text with no class words at all, and longer than the others by far."]


class NullReporter:
    def started(self, *a):
        pass

    def event(self, *a):
        pass

    def metric(self, **k):
        pass

    def evaluation(self, **k):
        pass


def train_head(model_dir, tmp, label_map=None, max_steps=20):
    rng = random.Random(0)
    items = []
    for _ in range(8):
        for label, (names, cities) in WORDS.items():
            items.append({"text": f"{rng.choice(names)} is {rng.randint(18, 90)} years old and "
                                  f"lives in {rng.choice(cities)}.",
                          "label": label_map[label] if label_map else label})
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    settings = ClassifierSettings(base_model=str(model_dir), training_data=str(tmp / "train.jsonl"),
                                  learning_rate=2e-2, batch_size=8, max_steps=max_steps)
    run(settings, tmp / "out", NullReporter(), should_stop=lambda: False)
    return tmp / "out" / "classifier"


def by_hand(head_dir, model_dir, texts):
    """(best label, probabilities in the head's label order) per text: the saved head's files
    read and applied with plain transformers + torch, one text at a time (no padding)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    config = json.loads((head_dir / "classifier.json").read_text())
    tensors = load_file(str(head_dir / "head.safetensors"))
    labels = [config["id2label"][str(i)] for i in range(config["num_labels"])]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=config["max_seq_length"],
                            return_tensors="pt").input_ids
            hidden = body(input_ids=ids).last_hidden_state[0]
            pooled = hidden.mean(0) if config["pooling"] == "mean" else hidden[-1]
            probs = torch.softmax(tensors["weight"] @ pooled + tensors["bias"], dim=-1)
            out.append((labels[int(probs.argmax())], probs.tolist()))
    return out


@pytest.fixture(scope="module")
def head(tiny_model_dir, tmp_path_factory):
    return train_head(tiny_model_dir, tmp_path_factory.mktemp("head"))


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    """One classifier for the tests that need a loaded body (asyncio.run per call is fine: its
    locks are only waited on by concurrent requests within one loop)."""
    return HeadClassifier(tiny_model_dir)


def classify(c, head_dir, texts):
    return asyncio.run(c.classify(head_dir, texts))


def broken_copy(head, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(head, dst)
    return dst


def edit_config(head_dir, **changes):
    path = head_dir / features.CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# -- results ----------------------------------------------------------------------------------
def test_results_equal_the_head_applied_by_hand_in_label_order(clf, head, tiny_model_dir):
    got = classify(clf, head, TEXTS)
    want = by_hand(head, tiny_model_dir, TEXTS)
    assert len(got) == len(want) == len(TEXTS)
    for (label, scores), (want_label, want_probs) in zip(got, want):
        assert label == want_label
        assert [name for name, _ in scores] == ["north", "south", "west"]
        assert [p for _, p in scores] == pytest.approx(want_probs, abs=1e-5)
        assert all(isinstance(p, float) for _, p in scores)
    # The head is not trivial: the class words decide, and the probabilities differ.
    assert [label for label, _ in got[:3]] == ["north", "south", "west"]


def test_integer_labels_come_back_as_strings(clf, tiny_model_dir, tmp_path):
    head = train_head(tiny_model_dir, tmp_path, label_map={"north": 7, "south": 3, "west": 11},
                      max_steps=3)
    (label, scores), = classify(clf, head, ["bob oslo"])
    assert [name for name, _ in scores] == ["3", "7", "11"]  # the head's order: sorted ints
    assert label in ("3", "7", "11")
    assert by_hand(head, tiny_model_dir, ["bob oslo"])[0][0] == int(label)


def test_body_loads_once_for_concurrent_and_later_calls(tiny_model_dir, head, monkeypatch):
    loads = []
    real = loading.load_body

    def counting(base_model, **placement):
        loads.append(base_model)
        return real(base_model, **placement)

    monkeypatch.setattr(loading, "load_body", counting)
    c = HeadClassifier(tiny_model_dir)
    assert loads == []  # lazily: nothing at construction

    async def main():
        first = await asyncio.gather(*(c.classify(head, [t]) for t in TEXTS[:3]))
        body = c._model.body
        later = await c.classify(head, TEXTS[:3])
        return first, body, later

    first, body, later = asyncio.run(main())
    for [(label, scores)], (label_b, scores_b) in zip(first, later):  # alone or batched
        assert label == label_b and dict(scores) == pytest.approx(dict(scores_b), abs=1e-6)
    classify(c, head, ["carol"])  # another event loop, same classifier
    assert len(loads) == 1 and c._model.body is body
    assert list(c._heads) == [head.resolve()]


def test_importing_the_module_is_cheap():
    code = ("import sys, serving_service.classify; "
            "print(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- bad requests -----------------------------------------------------------------------------
@pytest.mark.parametrize("texts, field, problem", [
    ([], "texts", "must not be empty"),
    (["a"] * 4, "texts", "4 texts; at most 3"),
    (["a", "b" * 11], "texts[1]", "11 characters; at most 10"),
    (["a", "b", 5], "texts[2]", "must be a string"),
    ("abc", "texts", "must be a list of strings"),
])
def test_bad_texts_are_refused_before_anything_loads(tiny_model_dir, head, texts, field, problem):
    c = HeadClassifier(tiny_model_dir, max_texts=3, max_text_chars=10)
    with pytest.raises(TunewireError) as e:
        classify(c, head, texts)
    assert e.value.reason == "INVALID_FIELD" and list(e.value.field_violations) == [field]
    assert problem in e.value.field_violations[field]
    assert c._model is None


def test_a_text_without_tokens_is_named_by_index(clf, head):
    with pytest.raises(TunewireError) as e:
        classify(clf, head, ["alice", "bob", "carol", ""])  # this tokenizer adds no BOS
    assert e.value.field_violations == {"texts[3]": "the tokenizer makes no tokens of it"}


# -- bad heads --------------------------------------------------------------------------------
def test_a_head_of_another_base_model_is_refused(clf, head, tmp_path):
    other = broken_copy(head, tmp_path)
    edit_config(other, base_model_fingerprint="0" * 64)
    with pytest.raises(TunewireError) as e:
        classify(clf, other, ["alice"])
    assert e.value.reason == "CLASSIFIER_BASE_MODEL_MISMATCH"

    wider = broken_copy(head, tmp_path / "wider")
    hidden = json.loads((head / features.CONFIG_FILE).read_text())["hidden_size"]
    edit_config(wider, hidden_size=hidden * 2)
    with pytest.raises(TunewireError) as e:
        classify(clf, wider, ["alice"])
    assert e.value.reason == "CLASSIFIER_BASE_MODEL_MISMATCH" and "hidden size" in e.value.message


def _no_config(d):
    (d / features.CONFIG_FILE).unlink()


def _no_tensors(d):
    (d / features.HEAD_FILE).unlink()


def _garbage_tensors(d):
    (d / features.HEAD_FILE).write_bytes(b"not safetensors")


def _wrong_shape(d):
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 128), "bias": torch.zeros(2)}, str(d / features.HEAD_FILE))


@pytest.mark.parametrize("breakage, problem", [
    (_no_config, "no classifier.json"),
    (lambda d: (d / features.CONFIG_FILE).write_text("{"), "unreadable"),
    (lambda d: edit_config(d, method="lora"), "method"),
    (lambda d: edit_config(d, id2label={"0": "a", "2": "b"}), "without gaps"),
    (lambda d: edit_config(d, pooling="max"), "pooling"),
    (lambda d: edit_config(d, max_seq_length=0), "max_seq_length"),
    (_no_tensors, "no head.safetensors"),
    (_garbage_tensors, "unreadable"),
    (_wrong_shape, "expected"),
])
def test_a_malformed_head_is_invalid(clf, head, tmp_path, breakage, problem):
    bad = broken_copy(head, tmp_path)
    breakage(bad)
    with pytest.raises(TunewireError) as e:
        classify(clf, bad, ["alice"])
    assert e.value.reason == "CLASSIFIER_INVALID" and problem in e.value.message, e.value.message


def test_a_missing_directory_is_invalid(clf, tmp_path):
    with pytest.raises(TunewireError) as e:
        classify(clf, tmp_path / "nowhere", ["alice"])
    assert e.value.reason == "CLASSIFIER_INVALID"


# -- device and precision ---------------------------------------------------------------------
def fake_gpu(monkeypatch):
    """One CUDA device with bf16 as torch reports it: the device is the only thing faked."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)


def test_on_a_cpu_the_body_stays_fp32_whatever_the_served_dtype(tiny_model_dir, head):
    c = HeadClassifier(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert c.dtype == "float32"
    got = classify(c, head, TEXTS)
    assert str(c._model.body.dtype) == "torch.float32" and c._model.body.device.type == "cpu"
    for (label, scores), (want_label, want_probs) in zip(got, by_hand(head, tiny_model_dir, TEXTS)):
        assert label == want_label and [p for _, p in scores] == pytest.approx(want_probs, abs=1e-5)


@pytest.mark.parametrize("kw", [{"device": "gpu"}, {"device": "cuda", "dtype": "bf16"}])
def test_bad_device_or_dtype_is_refused(tiny_model_dir, kw):
    with pytest.raises(ValueError, match="device must be"):
        HeadClassifier(tiny_model_dir, **kw)


def test_on_a_gpu_the_body_loads_onto_it_in_the_served_dtype(tiny_model_dir, monkeypatch):
    import torch

    fake_gpu(monkeypatch)
    calls, real = [], loading.load_body
    # the real body on the CPU stands in for the GPU one: only where it would load is checked
    monkeypatch.setattr(loading, "load_body",
                        lambda base, **kw: calls.append(kw) or real(base))
    HeadClassifier(tiny_model_dir, device="cuda", dtype="bfloat16")._load()
    HeadClassifier(tiny_model_dir, device="cuda", dtype="float16")._load()
    features.load_feature_body(tiny_model_dir, "auto")  # auto: the GPU, in bf16 (its precision)
    features.load_feature_body(tiny_model_dir, "cpu")    # a CPU: fp32, the loader's placement
    cuda0 = torch.device("cuda", 0)
    assert calls == [{"dtype": torch.bfloat16, "device": cuda0},
                     {"dtype": torch.float16, "device": cuda0},
                     {"dtype": torch.bfloat16, "device": cuda0},
                     {"dtype": torch.float32, "device": None}]


def test_bf16_body_features_are_fp32_and_close_to_fp32_ones(tiny_model_dir):
    """The GPU default precision, run on the CPU: features come back fp32 on the CPU, within
    bf16's rounding (8-bit mantissa, 2^-8 = 0.4% per op, compounded over the layers: measured
    <3% here) of fp32 features computed by hand."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref_body = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    body = features.load_feature_body(tiny_model_dir, "cpu", torch.bfloat16)
    assert body.dtype == torch.bfloat16
    ids, _ = features.encode(tokenizer, TEXTS, 256, no_tokens=ValueError)
    for pooling in features.POOLINGS:
        x = features.pooled_features(body, ids, features.pad_id(tokenizer), pooling)
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        with torch.no_grad():
            for row, text in zip(x, TEXTS):
                hidden = ref_body(input_ids=tokenizer(text, return_tensors="pt").input_ids
                                  ).last_hidden_state[0]
                want = hidden.mean(0) if pooling == "mean" else hidden[-1]
                assert ((row - want).norm() / want.norm()).item() < 0.05
