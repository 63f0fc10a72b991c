"""The full fine-tuning recipe on the tiny random Llama: every weight trains, the result is a
model directory of its own, and (slow) vLLM serving it generates what transformers does."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest
import torch

from test_recipe import ListReporter, write_jsonl
from trainer_service.recipe_full import Cancelled, run
from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec
from tunewire.adapters import sha256_file

pytestmark = pytest.mark.timeout(120)
PEOPLE = [("alice", 20, "paris"), ("bob", 21, "oslo"), ("carol", 22, "lima"), ("dave", 23, "rome"),
          ("erin", 24, "kyiv"), ("frank", 25, "cairo"), ("grace", 26, "tokyo"), ("heidi", 27, "quito")]
MAX_NEW = 24


def person_rows():
    return [{"prompt": f"Extract the person as JSON: {n} is {a} years old and lives in {c}.\n",
             "completion": json.dumps({"name": n, "age": a, "city": c})} for n, a, c in PEOPLE]


class Reporter(ListReporter):
    """ListReporter that also keeps each event's data."""

    def __init__(self):
        super().__init__()
        self.event_data = []

    def event(self, kind, message, data, metrics=None):
        super().event(kind, message, data, metrics)
        self.event_data.append((kind, data))


def spec_for(model_dir, data_path, *, ev=None, **hp) -> JobSpec:
    hp = {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 15, "warmup_steps": 2,
          "max_seq_length": 64, **hp}
    return JobSpec(base_model=str(model_dir), training_data=data_path, adapter_name="full",
                   hyperparameters=Hyperparameters(**hp), eval=EvalSpec(**(ev or {})))


def unique_param_count(model) -> int:
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def greedy(model, tok, prompt, max_new=MAX_NEW) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One short full fine-tuning run: (model dir, reporter, result)."""
    root = tmp_path_factory.mktemp("full")
    train = write_jsonl(root / "train.jsonl", person_rows()[:4])
    rep = Reporter()
    result = run(spec_for(tiny_model_dir, train), root / "out", rep, lambda: False)
    return root / "out" / "model", rep, result


# -- fast ---------------------------------------------------------------------------------------
def test_every_weight_trains_and_counts_are_the_whole_model(trained, tiny_model_dir):
    model_dir, rep, result = trained
    base, tuned = load(tiny_model_dir), load(model_dir)
    n = unique_param_count(base)
    assert rep.started_args == (n, n, 15)
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    assert base_sd.keys() == tuned_sd.keys() and len(base_sd) > 0
    unchanged = [k for k in base_sd if torch.equal(base_sd[k], tuned_sd[k])]
    assert not unchanged, f"tensors not trained: {unchanged}"
    assert all(v.dtype == torch.float32 for v in tuned_sd.values())
    assert result["steps"] == 15 and "best_step" not in result  # < 20 examples: no validation


def test_loss_falls_and_events_match_the_lora_recipe(trained):
    _, rep, result = trained
    losses = [m["loss"] for m in rep.metrics]
    assert len(losses) == 15 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert result["final_loss"] < result["train_loss"]
    assert result["final_loss"] == losses[-1]      # the last streamed point, exactly
    assert result["tail_loss"] == pytest.approx(sum(losses[-10:]) / 10)
    assert rep.events == ["DATASET_LOADED", "MODEL_LOADED", "FIT_ESTIMATED", "ADAPTER_SAVED"]
    assert dict(rep.event_data)["ADAPTER_SAVED"]["path"] == str(trained[0])


def test_saved_dir_is_a_standalone_model_that_learned(trained, tiny_model_dir):
    from transformers import AutoTokenizer

    model_dir, _, _ = trained
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.startswith("adapter") for n in names)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = person_rows()[0]["prompt"]
    assert tok(prompt).input_ids == base_tok(prompt).input_ids
    assert tok.chat_template == base_tok.chat_template
    tuned = greedy(load(model_dir), tok, prompt)
    assert tuned != greedy(load(tiny_model_dir), base_tok, prompt)
    # 15 steps on 4 rows memorise them: the completion, then EOS (it learned to stop).
    answer = tok(person_rows()[0]["completion"], add_special_tokens=False).input_ids
    assert tuned == answer + [tok.eos_token_id]


def test_checkpoints_keep_only_best_and_latest_and_the_best_is_the_result(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", person_rows() * 2)
    rep = Reporter()
    out = tmp_path / "out"
    result = run(spec_for(tiny_model_dir, train, max_steps=10,
                          ev={"validation_fraction": 0.25, "eval_every_steps": 2,
                              "early_stopping_patience": 0}), out, rep, lambda: False)
    assert [s for s, _ in rep.evaluations] == [2, 4, 6, 8, 10]
    saved = [d["path"] for k, d in rep.event_data if k == "CHECKPOINT_SAVED"]
    assert len(saved) == 5  # every checkpoint is reported, even those deleted later
    best = min(rep.evaluations, key=lambda e: e[1]["eval_loss"])[0]
    assert result["best_step"] == best and "BEST_CHECKPOINT_SELECTED" in rep.events
    on_disk = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert on_disk == sorted({f"step-{best:06d}", "step-000010"})
    weights = sorted(p.name for p in (out / "model").glob("*.safetensors"))
    assert weights
    for w in weights:
        assert sha256_file(out / "model" / w) == sha256_file(out / "checkpoints" / f"step-{best:06d}" / w)
    assert rep.events[-1] == "ADAPTER_SAVED"
    load(out / "model")


def test_tied_embeddings_count_and_stay_tied(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied_dir = tmp_path / "tied"
    base = LlamaForCausalLM(config)
    base.save_pretrained(tied_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tied_dir)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    naive = sum(p.numel() for _, p in base.named_parameters(remove_duplicate=False))
    n = unique_param_count(base)
    assert n < naive

    rep = Reporter()
    run(spec_for(tied_dir, write_jsonl(tmp_path / "t.jsonl", person_rows()[:4]), max_steps=3),
        tmp_path / "out", rep, lambda: False)
    assert rep.started_args == (n, n, 3)
    tuned = load(tmp_path / "out" / "model")
    assert torch.equal(tuned.lm_head.weight, tuned.model.embed_tokens.weight)
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_resume_continues_exactly_where_the_run_stopped(tiny_model_dir, tmp_path):
    """Like the LoRA recipe's: a run cancelled after step 6 (resume state every 4 steps), started
    again on the same directory, resumes at step 4 and ends where one unbroken run does."""
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "t.jsonl", person_rows() * 4)  # 32 rows: 24 train, 8 validation
    s = spec_for(tiny_model_dir, train, max_steps=14, seed=0,
                 ev={"validation_fraction": 0.25, "eval_every_steps": 4, "early_stopping_patience": 0})
    whole = Reporter()
    run(s, tmp_path / "whole", whole, lambda: False)

    first = Reporter()
    with pytest.raises(Cancelled):  # "crash" after step 6: the last resume state is step 4's
        run(s, tmp_path / "split", first, lambda: len(first.metrics) >= 6)
    assert (tmp_path / "split" / "resume" / "state.pt").is_file()
    second = Reporter()
    run(s, tmp_path / "split", second, lambda: False)
    assert "RESUMED" in second.events
    assert dict(second.event_data)["RESUMED"]["from_step"] == "4"
    assert [m["step"] for m in second.metrics] == list(range(5, 15))
    assert [m["loss"] for m in second.metrics] == pytest.approx([m["loss"] for m in whole.metrics[4:]], rel=1e-5)
    assert [e["eval_loss"] for _, e in second.evaluations] == pytest.approx(
        [e["eval_loss"] for _, e in whole.evaluations[1:]], rel=1e-5)
    # only the best and the latest checkpoint on disk, across the resume too
    best = min(whole.evaluations, key=lambda e: e[1]["eval_loss"])[0]
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == \
        sorted({f"step-{best:06d}", "step-000014"})
    a, b = (load_file(next((tmp_path / d / "model").glob("*.safetensors"))) for d in ("whole", "split"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_should_stop_cancels_without_saving(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", person_rows()[:4])
    with pytest.raises(Cancelled):
        run(spec_for(tiny_model_dir, train), tmp_path / "out", Reporter(), lambda: True)
    assert not (tmp_path / "out" / "model").exists()


# -- slow: serve the result on vLLM --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_served_full_model_generates_what_the_trainer_does(trained):
    """vLLM started on the fine-tuned directory: greedy token ids equal HF generate's."""
    from transformers import AutoTokenizer

    from serving_service.engine import EngineConfig, GenParams, VllmEngine

    model_dir, _, _ = trained
    prompts = [r["prompt"] for r in person_rows()[:3]]            # trained on: memorised answers
    prompts += [person_rows()[6]["prompt"], '{"name": "bob", "age":']  # never seen
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir)
    want = {p: greedy(model, tok, p) for p in prompts}
    assert tok.eos_token_id in want[prompts[0]]  # it learned to stop: EOS handling is compared too
    del model

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def generate(i, prompt):
        ids = []
        async for d in engine.generate(f"full-{i}", prompt, GenParams(max_tokens=MAX_NEW), None):
            ids.extend(d.token_ids)
        return ids

    async def stop():
        engine.shutdown()
        # AsyncLLM cancels its background tasks: let them finish before the loop closes
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=10)

    engine = VllmEngine(EngineConfig(model=str(model_dir), enforce_eager=True, max_model_len=256))
    try:
        on_loop(engine.start(), timeout=600)

        async def all_at_once():
            return await asyncio.gather(*[generate(i, p) for i, p in enumerate(prompts)])

        got = dict(zip(prompts, on_loop(all_at_once())))
    finally:
        on_loop(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    mismatches = [(p, got[p], want[p]) for p in prompts if got[p] != want[p]]
    assert not mismatches, "vLLM vs HF greedy token ids differ:\n" + "\n".join(map(str, mismatches))
