"""The training core's device, precision and memory settings, as far as a CPU can check them:
bf16 autocast close to fp32, gradient accumulation equal to one big batch (against a loss and
gradients computed by hand with torch), gradient checkpointing giving the same gradients, the
resume tolerance table, training.json, CUDA out-of-memory as OUT_OF_MEMORY, the refusals (fp16
and nf4 on a CPU) and the MFU FLOP count against a by-hand count of the tiny model."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from test_recipe import ListReporter, person_rows, spec_for, write_jsonl
from trainer_service import common, loop, packing, qlora, recipe_lora, resume, telemetry
from trainer_service.data_tokens import IGNORE
from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec, LoraSpec
from tunewire import reasons as R
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")
VOCAB = 456  # the tiny Llama's (tunewire.tiny_model)


def random_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths and prompt lengths, so micro-batches carry different numbers
    of labelled tokens (an unweighted mean of micro-batch means would then be wrong)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length, prompt = rng.randint(6, 30), rng.randint(1, 5)
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def by_hand(model, rows: list[dict]) -> tuple[float, list[torch.Tensor]]:
    """The plain token-mean next-token loss over all rows at once, and its gradients (torch only)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    model.train()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def one_step(model, train_rows, tmp_path, *, batch_size, accumulation, packed=False):
    """One step of the shared loop; (reported loss, the gradients the optimizer stepped with)."""
    params = list(model.parameters())
    seen: list[torch.Tensor] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.extend(p.grad.clone() for p in params)
            return super().step(closure)

    spec = JobSpec(base_model="unused", training_data="unused", adapter_name="acc",
                   hyperparameters=Hyperparameters(batch_size=batch_size, max_steps=1, max_grad_norm=0.0,
                                                   gradient_accumulation_steps=accumulation,
                                                   max_seq_length=64, packing=packed),
                   eval=EvalSpec(validation_fraction=0.0))
    rep = ListReporter()
    loop.train(spec, model, params, Recording(params, lr=0.0), rows=train_rows, train_rows=train_rows,
               val_rows=[], pad_id=0, total_steps=1, steps_per_epoch=1, out_dir=tmp_path,
               final_dir=tmp_path / "final", save_dir=lambda path: path, packed=packed,
               reporter=rep, should_stop=lambda: False)
    (metric,) = rep.metrics
    return metric, seen


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


# -- accumulation -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size,accumulation", [(8, 1), (8, 2), (8, 8)])
def test_accumulated_micro_batches_give_the_whole_batch_loss_and_gradients(model, tmp_path,
                                                                           batch_size, accumulation):
    rows = random_rows(8)
    want_loss, want_grads = by_hand(copy.deepcopy(model), rows)
    metric, got = one_step(copy.deepcopy(model), rows, tmp_path, batch_size=batch_size,
                           accumulation=accumulation)
    assert metric["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert metric["tokens_seen"] == sum(len(r["input_ids"]) for r in rows)  # the whole step's
    assert len(got) == len(want_grads)
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_accumulation_with_packing_matches_the_unpacked_batch(model, tmp_path):
    rows = random_rows(8, seed=1)
    packed = packing.pack(rows, 64)
    assert 2 <= len(packed) < len(rows)
    want_loss, want_grads = by_hand(copy.deepcopy(model), rows)
    # every packed row in one step, one per micro-batch
    metric, got = one_step(copy.deepcopy(model), packed, tmp_path, batch_size=len(packed),
                           accumulation=len(packed), packed=True)
    assert metric["loss"] == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# -- checkpointing and precision ----------------------------------------------------------------
def lora_spec(tiny_model_dir, **hp) -> JobSpec:
    return JobSpec(base_model=str(tiny_model_dir), training_data="unused", adapter_name="p",
                   lora=LoraSpec(r=8, target_modules=("all-linear",)),
                   hyperparameters=Hyperparameters(**hp))


def lora_grads(spec: JobSpec, rows, compute=common.Compute()):
    torch.manual_seed(0)  # the same LoRA initialisation
    m = recipe_lora.build_model(spec, compute)
    for name, p in m.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A without a gradient
            torch.nn.init.normal_(p, std=0.1)
    m.train()
    batch = compute.batch(loop.micro_batches(rows, len(rows), 0, packed=False)[0])
    with compute.autocast():
        loss = common.completion_loss(m, batch)
    loss.backward()
    return m, loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    rows = random_rows(4)
    plain, loss, grads = lora_grads(lora_spec(tiny_model_dir), rows)
    ckpt, loss_c, grads_c = lora_grads(lora_spec(tiny_model_dir, gradient_checkpointing=True), rows)
    assert ckpt.get_base_model().is_gradient_checkpointing
    assert not plain.get_base_model().is_gradient_checkpointing
    assert loss_c == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_c.keys() and len(grads) > 4
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-7, rtol=1e-5)


def test_bf16_keeps_lora_weights_fp32_and_lands_close_to_fp32(tiny_model_dir):
    rows = random_rows(4)
    bf16 = common.Compute(CPU, torch.bfloat16)
    m, loss16, g16 = lora_grads(lora_spec(tiny_model_dir, precision="bf16"), rows, bf16)
    _, loss32, g32 = lora_grads(lora_spec(tiny_model_dir), rows)
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}  # + AdamW state
    assert {p.dtype for p in m.parameters() if not p.requires_grad} == {torch.bfloat16}
    # bf16 keeps 8 significant bits (epsilon 2^-7 = 7.8e-3): the loss within 1e-2 relative (seen:
    # ~1e-3 with a bf16 base), and every gradient pointing the same way (cosine > 0.99).
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for name in g32:
        cos = F.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_bf16_run_on_a_cpu_trains_and_records_its_precision(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", person_rows() * 4)
    runs = {}
    for precision in ("fp32", "bf16"):
        rep = ListReporter()
        recipe_lora.run(spec_for(tiny_model_dir, data, max_steps=6, precision=precision),
                        tmp_path / precision, rep, lambda: False, device="cpu")
        runs[precision] = [m["loss"] for m in rep.metrics]
        info = json.loads((tmp_path / precision / "adapter" / "training.json").read_text())
        assert info == {"precision": precision, "device": "cpu", "quantization": "none",
                        "gradient_checkpointing": False, "gradient_accumulation_steps": 1}
    assert runs["bf16"][0] == pytest.approx(runs["fp32"][0], rel=1e-2)
    assert runs["bf16"][-1] < runs["bf16"][0]


# -- refusals ----------------------------------------------------------------------------------
def test_fp16_on_a_cpu_is_refused_before_loading(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", person_rows())
    rep = ListReporter()
    with pytest.raises(TunewireError) as e:
        recipe_lora.run(spec_for(tiny_model_dir, data, precision="fp16"), tmp_path / "o", rep,
                        lambda: False, device="cpu")
    assert e.value.reason == R.DEVICE_UNAVAILABLE and "fp16" in e.value.message
    assert rep.events == []


def test_nf4_without_cuda_is_refused_before_loading(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", person_rows())
    rep = ListReporter()
    with pytest.raises(TunewireError) as e:
        recipe_lora.run(spec_for(tiny_model_dir, data, quantization="nf4"), tmp_path / "o", rep,
                        lambda: False, device="cpu")
    assert e.value.reason == R.QUANTIZATION_UNAVAILABLE and "CUDA" in e.value.message
    assert rep.events == []


def test_nf4_without_bitsandbytes_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TunewireError) as e:
        qlora.check_available(torch.device("cuda", 0))  # a device object only: no GPU touched
    assert e.value.reason == R.QUANTIZATION_UNAVAILABLE and "bitsandbytes" in e.value.message


# -- out of memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_at_call,where", [(1, "the warm-up step at step 0"),
                                                (3, "a training step at step 1")])
def test_cuda_out_of_memory_is_the_user_error_out_of_memory(tiny_model_dir, tmp_path, monkeypatch,
                                                            fail_at_call, where):
    calls = {"n": 0}

    def oom(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] >= fail_at_call:  # the warm-up runs 2 forwards, then step 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    build = recipe_lora.build_model

    def build_failing(*args, **kwargs):
        m = build(*args, **kwargs)
        m.register_forward_pre_hook(oom, with_kwargs=True)
        return m

    monkeypatch.setattr(recipe_lora, "build_model", build_failing)
    data = write_jsonl(tmp_path / "train.jsonl", person_rows())
    with pytest.raises(TunewireError) as e:
        recipe_lora.run(spec_for(tiny_model_dir, data), tmp_path / "o", ListReporter(),
                        lambda: False, device="cpu")
    assert e.value.reason == R.OUT_OF_MEMORY
    assert where in e.value.message and "gradient_checkpointing" in e.value.message  # the advice


# -- resume and telemetry ------------------------------------------------------------------------
def test_resume_tolerance_follows_the_precision():
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        tol, eps = resume.TOLERANCE[precision], torch.finfo(dtype).eps
        assert eps <= tol <= 1e3 * eps  # between one rounding and a thousand of the dtype
        assert resume.continuous(2.0, 2.0 * (1 + tol / 2), precision)
        assert not resume.continuous(2.0, 2.0 * (1 + 2 * tol), precision)
        assert not resume.continuous(2.0, 2.04, precision)  # 2%: another step's loss fails
    assert resume.TOLERANCE["fp32"] == 1e-4  # as before there were precisions


def test_step_flops_against_a_hand_count_of_the_tiny_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    # By hand from config.json: hidden 128, 2 layers, 4 heads x 32, 2 kv heads (64 wide),
    # intermediate 256, vocab 456, untied head.
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256 + 2 * 128  # + 2 norms
    lora_per_layer = 8 * (128 + 128) + 2 * 8 * (128 + 64) + 8 * (128 + 128)    # A: r x in, B: out x r
    n_train = 2 * lora_per_layer
    n = 2 * per_layer + 128 + n_train  # + the final norm
    stats = telemetry.model_stats(m)
    assert stats == telemetry.ModelStats(params=n, trainable_params=n_train, layers=2,
                                         attention_dim=128, head_params=456 * 128, head_trainable=False)
    # Two rows of 10 and 6 tokens: 55 + 21 causal (query, key) pairs; the head on 7 positions.
    tokens, pairs, head = 16, 55 + 21, 7
    assert telemetry.attention_pairs([10, 6]) == pairs
    want = (2 * n + 2 * n + 2 * n_train) * tokens + 3 * 2 * 4 * 128 * pairs + 4 * 456 * 128 * head
    assert telemetry.step_flops(stats, tokens, pairs / tokens, head) == pytest.approx(want, rel=1e-12)
    assert telemetry.mfu(want, 2.0, 0.0) == 0.0  # a CPU: no peak, no MFU
    assert telemetry.mfu(want, 2.0, want) == pytest.approx(0.5)


def test_packed_rows_attend_only_within_each_example():
    rows = packing.pack([{"input_ids": [5] * 3, "labels": [5] * 3},
                         {"input_ids": [6] * 4, "labels": [6] * 4}], 16)
    assert len(rows) == 1
    assert loop._keys_per_token(rows) == pytest.approx((6 + 10) / 7)  # not 28 / 7


def test_each_metric_point_carries_mfu_from_the_steps_own_tokens(model, tmp_path, monkeypatch):
    monkeypatch.setattr(loop.devices, "peak_flops", lambda device, dtype: 1e12)  # as on a GPU
    rows = random_rows(8, seed=2)
    metric, _ = one_step(copy.deepcopy(model), rows, tmp_path, batch_size=8, accumulation=1)
    lengths = [len(r["input_ids"]) for r in rows]
    # the head runs on every row at each target column some row labels (labels[j + 1] set)
    columns = {j for r in rows for j in range(len(r["labels"]) - 1) if r["labels"][j + 1] != IGNORE}
    stats = telemetry.model_stats(model)
    want = telemetry.step_flops(stats, sum(lengths), telemetry.attention_pairs(lengths) / sum(lengths),
                                len(rows) * len(columns))
    assert metric["mfu"] * 1e12 * metric["step_seconds"] == pytest.approx(want, rel=1e-9)
    assert metric["peak_gpu_memory_bytes"] == 0  # a CPU
