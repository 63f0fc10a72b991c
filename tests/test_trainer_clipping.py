"""hyperparameters.max_grad_norm: unset means 1.0 and 0 means no clipping, from the request a
client sends through the stored spec to the training step (fast: the servicer's mapping and one
step of the shared training loop on the tiny model, checked against HF's own loss and torch)."""

from __future__ import annotations

import copy

import pytest
import torch

from test_recipe import ListReporter, person_rows
from trainer_service import loop
from trainer_service.data_tokens import IGNORE, tokenize_dataset
from trainer_service.servicer import job_to_proto, spec_from_proto
from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec
from trainer_service.store import Job
from tunewire.errors import TunewireError
from tunewire.trainer.v1 import trainer_pb2 as tpb

pytestmark = pytest.mark.timeout(60)


def job(**hyperparameters) -> tpb.TrainingJob:
    return tpb.TrainingJob(base_model="m", adapter_name="a", lora=tpb.LoraMethod(),
                           training_data=tpb.DatasetRef(path="d.jsonl"),
                           hyperparameters=tpb.Hyperparameters(**hyperparameters))


def through_the_wire(training_job: tpb.TrainingJob) -> tpb.TrainingJob:
    """What the server gets: the request serialised and parsed again."""
    wire = tpb.CreateTrainingJobRequest(training_job=training_job).SerializeToString()
    return tpb.CreateTrainingJobRequest.FromString(wire).training_job


def test_unset_is_the_default_and_zero_stays_zero_through_the_service_mapping():
    assert Hyperparameters().max_grad_norm == 1.0
    for sent, kept in ((None, 1.0), (0.0, 0.0), (0.5, 0.5), (3.0, 3.0)):
        request = job() if sent is None else job(max_grad_norm=sent)
        spec = spec_from_proto(through_the_wire(request))
        assert spec.hyperparameters.max_grad_norm == kept, sent
        stored = JobSpec.from_json(spec.to_json())  # what the store keeps and the worker reads
        assert stored.hyperparameters.max_grad_norm == kept
        # what GetTrainingJob answers: the value, with its presence, even when it is 0
        answer = through_the_wire(job_to_proto(Job(id="j", spec=spec.to_json(), state="QUEUED",
                                                   token_hash="", create_time=0.0)))
        assert answer.hyperparameters.HasField("max_grad_norm")
        assert answer.hyperparameters.max_grad_norm == kept
    with pytest.raises(TunewireError) as e:
        spec_from_proto(job(max_grad_norm=-1.0))
    assert list(e.value.field_violations) == ["training_job.hyperparameters.max_grad_norm"]


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = tokenize_dataset(person_rows(), tokenizer, max_seq_length=64)
    return rows, tokenizer.pad_token_id


def reference_gradients(model, rows: list[dict], pad_id: int) -> tuple[float, list[torch.Tensor]]:
    """The batch's loss by transformers' own causal-LM loss (labels=), and torch's gradients."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_a_step_clips_the_gradients_only_when_asked(tiny_model_dir, tmp_path, batch, max_grad_norm):
    from transformers import AutoModelForCausalLM

    rows, pad_id = batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref_loss, ref_grads = reference_gradients(copy.deepcopy(model), rows, pad_id)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in ref_grads])).item()
    assert norm > 2.0  # well over the default 1.0: clipping at 1.0 changes the gradients

    params = list(model.parameters())
    seen: list[torch.Tensor] = []

    class Recording(torch.optim.SGD):  # keeps the gradients the step is taken with
        def step(self, closure=None):
            seen.extend(p.grad.clone() for p in params)
            return super().step(closure)

    spec = JobSpec(base_model=str(tiny_model_dir), training_data="unused", adapter_name="clip",
                   hyperparameters=Hyperparameters(batch_size=len(rows), max_steps=1, max_seq_length=64,
                                                   max_grad_norm=max_grad_norm),
                   eval=EvalSpec(validation_fraction=0.0))
    rep = ListReporter()
    loop.train(spec, model, params, Recording(params, lr=0.1), rows=rows, train_rows=rows, val_rows=[],
               pad_id=pad_id, total_steps=1, steps_per_epoch=1, out_dir=tmp_path,
               final_dir=tmp_path / "final", save_dir=lambda path: path, reporter=rep,
               should_stop=lambda: False)

    (metric,) = rep.metrics
    assert metric["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert metric["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the norm before any clipping
    scale = 1.0 if max_grad_norm == 0 else max_grad_norm / norm
    assert len(seen) == len(ref_grads)
    for got, want in zip(seen, ref_grads):
        torch.testing.assert_close(got, want * scale, atol=1e-6, rtol=1e-4)
    got_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in seen])).item()
    assert got_norm == pytest.approx(norm if max_grad_norm == 0 else max_grad_norm, rel=1e-4)
