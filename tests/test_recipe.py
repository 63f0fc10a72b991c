"""The LoRA recipe and its data pipeline on the tiny random Llama (no downloads, a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer_service.data_batches import collate
from trainer_service.data_rows import load_examples
from trainer_service.data_tokens import IGNORE, tokenize_dataset
from trainer_service.recipe_lora import Cancelled, run
from trainer_service.spec import Hyperparameters, JobSpec, LoraSpec
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(120)
PEOPLE = [("alice", 20, "paris"), ("bob", 21, "oslo"), ("carol", 22, "lima"), ("dave", 23, "rome")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def person_rows():
    return [{"prompt": f"Extract the person as JSON: {n} is {a} years old and lives in {c}.\n",
             "completion": json.dumps({"name": n, "age": a, "city": c})} for n, a, c in PEOPLE]


class ListReporter:
    def __init__(self):
        self.started_args, self.events, self.metrics, self.evaluations = None, [], [], []

    def started(self, trainable_params, total_params, total_steps):
        self.started_args = (trainable_params, total_params, total_steps)

    def event(self, kind, message, data, metrics=None):
        assert all(isinstance(v, str) for v in data.values())
        assert all(isinstance(v, float) for v in (metrics or {}).values())
        self.events.append(kind)

    def evaluation(self, *, step, metrics):
        self.evaluations.append((step, metrics))

    def metric(self, **point):
        self.metrics.append(point)


def spec_for(model_dir, data_path, **hp) -> JobSpec:
    hp = {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 25, "warmup_steps": 2, **hp}
    return JobSpec(base_model=str(model_dir), training_data=data_path, adapter_name="demo",
                   lora=LoraSpec(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
                   hyperparameters=Hyperparameters(**hp))


# -- labels -----------------------------------------------------------------------------------
def test_prompt_completion_labels_mask_exactly_the_prompt(tokenizer):
    ex = person_rows()[0]
    (row,), _ = tokenize_dataset([ex], tokenizer, max_seq_length=512)
    prompt_ids = tokenizer(ex["prompt"]).input_ids  # what vLLM feeds for the same prompt text
    completion_ids = tokenizer(ex["completion"], add_special_tokens=False).input_ids
    n = len(prompt_ids)
    assert row["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert row["labels"][:n] == [IGNORE] * n
    assert row["labels"][n:] == row["input_ids"][n:]           # completion and EOS all labelled
    assert row["labels"][-1] == tokenizer.eos_token_id


def test_chat_labels_only_the_last_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "alice is 20"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "as JSON"}, {"role": "assistant", "content": '{"age": 20}'}]
    (row,), _ = tokenize_dataset([{"messages": msgs}], tokenizer, max_seq_length=512)
    prefix = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    answer = tokenizer('{"age": 20}', add_special_tokens=False).input_ids
    assert row["labels"] == [IGNORE] * n + answer + [tokenizer.eos_token_id]  # <|im_end|>
    assert row["input_ids"][n:] == answer + [tokenizer.eos_token_id]
    assert tokenizer.decode(row["input_ids"][:n]).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_the_start_and_drops_examples_without_labels(tokenizer):
    ex = person_rows()[0]
    n_prompt = len(tokenizer(ex["prompt"]).input_ids)
    (row,), stats = tokenize_dataset([ex], tokenizer, max_seq_length=n_prompt + 2)
    assert len(row["input_ids"]) == n_prompt + 2 and row["labels"][-1] != IGNORE
    whole = tokenizer(ex["prompt"]).input_ids + tokenizer(ex["completion"], add_special_tokens=False).input_ids
    assert row["input_ids"] == whole[:n_prompt + 2]  # the start is kept
    assert stats.truncated == 1
    rows, stats = tokenize_dataset([ex, {"prompt": "x " * 50, "completion": "y"}], tokenizer,
                                        max_seq_length=n_prompt + 2)
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 1)
    with pytest.raises(TunewireError) as e:
        tokenize_dataset([ex], tokenizer, max_seq_length=8)
    assert e.value.reason == "DATASET_EMPTY"


def test_collate_pads_dynamically():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                          {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# -- bad data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, needle", [
    ('{"prompt": "a", "completion": ', "not valid JSON"),
    ({"prompt": "a"}, "field completion"),
    ({"messages": [{"role": "user", "content": "a"}]}, "field messages[0].role"),
    ({"prompt": "a", "completion": 3}, "field completion"),
])
def test_bad_rows_name_their_line_and_field(tmp_path, bad, needle):
    path = write_jsonl(tmp_path / "d.jsonl", [person_rows()[0], "", bad, person_rows()[1]])
    with pytest.raises(TunewireError) as e:
        load_examples(path)
    assert e.value.reason == "DATASET_INVALID" and e.value.job_error()["user_error"]
    assert "line 3:" in e.value.message and needle in e.value.message


def test_load_examples_reads_both_shapes_and_rejects_empty(tmp_path):
    msgs = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    rows = load_examples(write_jsonl(tmp_path / "d.jsonl", [person_rows()[0], msgs]))
    assert rows == [person_rows()[0], msgs]
    with pytest.raises(TunewireError) as e:
        load_examples(write_jsonl(tmp_path / "e.jsonl", [""]))
    assert e.value.reason == "DATASET_EMPTY" and e.value.job_error()["user_error"]


# -- the recipe -------------------------------------------------------------------------------
def test_short_run_learns_and_saves_a_loadable_adapter(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "d.jsonl", person_rows() * 4)
    rep = ListReporter()
    result = run(spec_for(tiny_model_dir, path), tmp_path / "out", rep, should_stop=lambda: False)

    trainable, total, total_steps = rep.started_args
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert 0 < trainable < total and total_steps == 25
    assert rep.events == ["DATASET_LOADED", "MODEL_LOADED", "FIT_ESTIMATED", "ADAPTER_SAVED"]
    assert [m["step"] for m in rep.metrics] == list(range(1, 26))
    for m in rep.metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "learning_rate", "grad_norm"))
        assert m["tokens_per_second"] > 0 and m["total_steps"] == 25
    assert rep.metrics[0]["learning_rate"] == pytest.approx(5e-3)   # warm-up 1/2
    assert rep.metrics[-1]["learning_rate"] == pytest.approx(1e-2 / 23)
    first, last = rep.metrics[0]["loss"], rep.metrics[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert result["steps"] == 25 and result["train_tokens"] == rep.metrics[-1]["tokens_seen"]
    streamed = [m["loss"] for m in rep.metrics]   # the reference: what the job streamed
    assert result["final_loss"] == streamed[-1]
    assert result["tail_loss"] == pytest.approx(sum(streamed[-10:]) / 10)
    assert result["train_loss"] == pytest.approx(sum(streamed) / len(streamed))

    adapter = tmp_path / "out" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors", "training.json"]
    assert json.loads((adapter / "training.json").read_text()) == {
        "precision": "fp32", "device": "cpu", "quantization": "none",
        "gradient_checkpointing": False, "gradient_accumulation_steps": 1}
    assert all(m["peak_gpu_memory_bytes"] == 0 and m["mfu"] == 0.0 for m in rep.metrics)  # a CPU
    prompt = tokenizer(person_rows()[0]["prompt"], return_tensors="pt")
    greedy = dict(max_new_tokens=12, do_sample=False)
    base_out = base.generate(**prompt, **greedy)[0].tolist()
    tuned = PeftModel.from_pretrained(base, adapter)
    assert tuned.get_nb_trainable_parameters()[1] == total
    tuned_out = tuned.generate(**prompt, **greedy)[0].tolist()
    assert tuned_out != base_out


def test_trainable_count_matches_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "d.jsonl", person_rows())
    rep = ListReporter()
    run(spec_for(tiny_model_dir, path, max_steps=1), tmp_path / "out", rep, lambda: False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert rep.started_args[:2] == model.get_nb_trainable_parameters()


def test_should_stop_cancels_without_saving(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", person_rows() * 4)
    rep = ListReporter()
    with pytest.raises(Cancelled):
        run(spec_for(tiny_model_dir, path), tmp_path / "out", rep,
            should_stop=lambda: len(rep.metrics) >= 3)
    assert [m["step"] for m in rep.metrics] == [1, 2, 3]
    assert not (tmp_path / "out" / "adapter").exists()


def test_unknown_target_module_fails_the_job(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", person_rows())
    spec = JobSpec(base_model=str(tiny_model_dir), training_data=path, adapter_name="demo",
                   lora=LoraSpec(target_modules=("no_such_proj",)))
    with pytest.raises(TunewireError) as e:
        run(spec, tmp_path / "out", ListReporter(), lambda: False)
    assert e.value.reason == "TARGET_MODULES_INVALID" and e.value.job_error()["user_error"]


def test_missing_base_model_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", person_rows())
    spec = JobSpec(base_model=str(tmp_path / "nope"), training_data=path, adapter_name="demo")
    with pytest.raises(TunewireError) as e:
        run(spec, tmp_path / "out", ListReporter(), lambda: False)
    assert e.value.reason == "BASE_MODEL_INVALID" and e.value.job_error()["user_error"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_result_final_loss_is_the_last_streamed_point(tiny_model_dir, tmp_path):
    """Through a real trainer service: a LoRA and a feature-extraction job's result `final_loss`
    is the `loss` of the last MetricPoint WatchTrainingJob streamed (the reference), `tail_loss`
    the mean of the last 10; and the VALIDATED report names the line max_seq_length cuts."""
    import grpc

    from harness import start_service, states, watch_all
    from tunewire.trainer.v1 import trainer_pb2 as tpb
    from tunewire.trainer.v1 import trainer_pb2_grpc

    data = tmp_path / "data"
    data.mkdir()
    rows = person_rows() * 3
    rows[4] = {"prompt": "a b " * 4, "completion": "c d " * 40}   # line 5: 177 tokens, cut at 64
    # (the person rows: 36 tokens each, kept whole)
    write_jsonl(data / "pc.jsonl", rows)
    write_jsonl(data / "cls.jsonl", [{"text": f"{n} lives in {c}", "label": i % 2}
                                     for i, (n, _, c) in enumerate(PEOPLE * 6)])
    svc = start_service("trainer", tmp_path, "--data-root", str(data), "--data-dir", str(tmp_path / "t"),
                        "--adapter-store", str(tmp_path / "store"), "--drain-seconds", "0.2")
    try:
        svc.wait_serving(60)
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(svc.address))
        hp = tpb.Hyperparameters(learning_rate=1e-3, max_steps=12, batch_size=2, max_seq_length=64)
        for name, path, method in [("lora", "pc.jsonl", {"lora": tpb.LoraMethod(r=4)}),
                                   ("fe", "cls.jsonl", {"feature_extraction": tpb.FeatureExtractionMethod()})]:
            job = stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=tpb.TrainingJob(
                base_model=str(tiny_model_dir), adapter_name=name, training_data=tpb.DatasetRef(path=path),
                hyperparameters=hp, **method))).training_job
            entries = watch_all(stub, job.id, timeout=300)
            assert states(entries)[-1] == "SUCCEEDED", name
            losses = [e.metric.loss for e in entries if e.WhichOneof("payload") == "metric"]
            result = stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name)).training_job.result
            assert len(losses) >= 10 and result.metrics["final_loss"] == losses[-1], name
            assert result.metrics["tail_loss"] == pytest.approx(sum(losses[-10:]) / 10), name
            if name == "lora":
                validated = [e.event for e in entries if e.WhichOneof("payload") == "event"
                             and e.event.type == tpb.JobEvent.TYPE_VALIDATED]
                report = json.loads(validated[0].data["report"])
                assert (report["truncated_lines"], report["dropped_lines"]) == ([5], []), report
    finally:
        svc.stop()
