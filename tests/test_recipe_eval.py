"""Validation, checkpoints, best-checkpoint selection, early stopping and overfitting detection
in the LoRA recipe — real training runs on the tiny model."""

from __future__ import annotations

import json

import pytest

from test_recipe import ListReporter, write_jsonl
from trainer_service.evaluation import EvalTracker, split_validation
from trainer_service.recipe_lora import run
from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec, LoraSpec
from tunewire.adapters import sha256_file

pytestmark = pytest.mark.timeout(120)
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


def rows(n, offset=0):
    return [{"prompt": f"{NAMES[i % 8]} is {20 + i} years old.\nJSON: ",
             "completion": json.dumps({"name": NAMES[i % 8], "age": 20 + i + offset})} for i in range(n)]


def spec(model_dir, train, *, validation="", max_steps=20, lr=1e-2, **ev):
    return JobSpec(base_model=str(model_dir), training_data=train, validation_data=validation,
                   adapter_name="evals", lora=LoraSpec(r=8, target_modules=("q_proj", "v_proj")),
                   hyperparameters=Hyperparameters(learning_rate=lr, batch_size=4, max_steps=max_steps,
                                                   max_seq_length=48, seed=0),
                   eval=EvalSpec(**ev))


def test_tracker_best_patience_and_overfitting_streaks():
    t = EvalTracker(patience=2, min_delta=0.01)
    d = [t.update(s, e, tr) for s, e, tr in [(1, 1.0, 2.0), (2, 0.8, 1.5), (3, 0.795, 1.4),
                                             (4, 0.9, 1.2), (5, 0.95, 1.0)]]
    assert [x.best for x in d] == [True, True, False, False, False]
    assert [x.stop for x in d] == [False, False, False, True, True]
    # eval rose while train fell at steps 4 and 5: one event for the streak
    assert [x.overfitting for x in d] == [False, False, False, True, False]
    assert (t.best_step, t.best_loss) == (2, 0.8)
    assert EvalTracker(patience=0).update(1, 1.0, 1.0).stop is False


def test_split_validation_is_seeded_disjoint_and_sized():
    data = [{"input_ids": [i], "labels": [i]} for i in range(50)]
    train, val = split_validation(data, EvalSpec(), seed=3)
    assert len(val) == 5 and len(train) == 45
    assert {r["input_ids"][0] for r in train}.isdisjoint({r["input_ids"][0] for r in val})
    assert split_validation(data, EvalSpec(), seed=3) == (train, val)
    assert split_validation(data[:10], EvalSpec(), seed=3)[1] == []  # < 20 examples: none by default
    assert len(split_validation(data[:10], EvalSpec(validation_fraction=0.2), seed=3)[1]) == 2
    assert split_validation(data, EvalSpec(validation_fraction=0.0), seed=3)[1] == []


def test_evaluations_checkpoints_and_best_checkpoint_is_the_result(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "t.jsonl", rows(32))
    rep = ListReporter()
    result = run(spec(tiny_model_dir, train, max_steps=20, validation_fraction=0.25, eval_every_steps=5,
                      early_stopping_patience=0), tmp_path / "out", rep, lambda: False)
    assert [s for s, _ in rep.evaluations] == [5, 10, 15, 20]
    assert all(m["eval_loss"] > 0 and m["train_loss"] > 0 for _, m in rep.evaluations)
    assert rep.events.count("CHECKPOINT_SAVED") == 4 and "BEST_CHECKPOINT_SELECTED" in rep.events
    best = min(rep.evaluations, key=lambda e: e[1]["eval_loss"])[0]
    assert result["best_step"] == best and result["validation_examples"] == 8
    ckpt = tmp_path / "out" / "checkpoints" / f"step-{best:06d}" / "adapter_model.safetensors"
    assert sha256_file(ckpt) == sha256_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")


def test_early_stopping_and_overfitting_on_a_validation_set_that_disagrees(tmp_path, tiny_model_dir):
    # Validation answers contradict training answers for the same prompts: the better the model
    # learns the training set, the worse validation gets.
    train = write_jsonl(tmp_path / "t.jsonl", rows(16))
    val = write_jsonl(tmp_path / "v.jsonl", rows(8, offset=7))
    rep = ListReporter()
    result = run(spec(tiny_model_dir, train, validation=val, max_steps=200, lr=2e-2, eval_every_steps=4,
                      early_stopping_patience=2), tmp_path / "out", rep, lambda: False)
    assert "EARLY_STOPPED" in rep.events and result["early_stopped"] == 1.0
    assert len(rep.metrics) < 200
    assert "OVERFITTING" in rep.events
    assert result["best_step"] < rep.metrics[-1]["step"]


def test_no_validation_means_no_checkpoints_and_the_last_weights(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "t.jsonl", rows(12))
    rep = ListReporter()
    result = run(spec(tiny_model_dir, train, max_steps=4), tmp_path / "out", rep, lambda: False)
    assert rep.evaluations == [] and "CHECKPOINT_SAVED" not in rep.events
    assert "best_step" not in result and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from trainer_service.recipe_lora import Cancelled

    train = write_jsonl(tmp_path / "t.jsonl", rows(32))
    s = JobSpec(base_model=str(tiny_model_dir), training_data=train, adapter_name="resume",
                lora=LoraSpec(r=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.1),
                hyperparameters=Hyperparameters(learning_rate=1e-2, batch_size=4, max_steps=14,
                                                max_seq_length=48, seed=0),
                eval=EvalSpec(validation_fraction=0.25, eval_every_steps=4, early_stopping_patience=0))
    whole = ListReporter()
    run(s, tmp_path / "whole", whole, lambda: False)

    first = ListReporter()
    with pytest.raises(Cancelled):  # "crash" after step 6: the last resume state is step 4's
        run(s, tmp_path / "split", first, lambda: len(first.metrics) >= 6)
    second = ListReporter()
    run(s, tmp_path / "split", second, lambda: False)
    assert "RESUMED" in second.events
    assert [m["step"] for m in second.metrics] == list(range(5, 15))
    # same data order, dropout masks and optimizer state: the same numbers as one unbroken run
    assert [m["loss"] for m in second.metrics] == pytest.approx([m["loss"] for m in whole.metrics[4:]], rel=1e-5)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("lora, expect", [
    (LoraSpec(r=4, target_modules=("all-linear",)),
     {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (LoraSpec(r=4, target_modules=("q_proj", "v_proj"), use_dora=True, use_rslora=True), {"q_proj", "v_proj"}),
])
def test_all_linear_dora_and_rslora_reach_peft(tmp_path, tiny_model_dir, lora, expect):
    train = write_jsonl(tmp_path / "t.jsonl", rows(8))
    s = JobSpec(base_model=str(tiny_model_dir), training_data=train, adapter_name="x", lora=lora,
                hyperparameters=Hyperparameters(learning_rate=1e-2, batch_size=4, max_steps=2, max_seq_length=48))
    run(s, tmp_path / "out", ListReporter(), lambda: False)
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == expect
    assert cfg["use_dora"] == lora.use_dora and cfg["use_rslora"] == lora.use_rslora
