"""The GPU memory estimate (trainer_service/memory.py): its parts by hand, against the peak of live
tensor memory measured on CPU training steps (memory_measure.py) on shapes the constants were not
fitted on, the advice, and the refusal."""

from __future__ import annotations

import json

import pytest
import torch

from trainer_service import memory, memory_measure
from trainer_service.spec import Hyperparameters, JobSpec, LoraSpec
from tunewire import reasons as R
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(120)

# Llama 3 8B's shape (the GPU bench's 8B).
LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False, "model_type": "llama"}
TOLERANCE = 0.15  # the target for the fit estimate against a measured peak


def job(base="m", *, method="lora", targets=("all-linear",), r=8, **hp) -> JobSpec:
    return JobSpec(base_model=str(base), training_data="x", adapter_name="a", method=method,
                   lora=LoraSpec(r=r, target_modules=targets), hyperparameters=Hyperparameters(**hp))


def config_of(d) -> dict:
    return json.loads((d / "config.json").read_text())


def test_weights_are_parameters_times_bytes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    n = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    for precision, b in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        est = memory.estimate(job(tiny_model_dir, precision=precision))
        assert est.params == n
        assert est.weights_bytes == n * b
    # full fine-tuning: fp32 master weights (+ the bf16 copies of the linear weights under autocast)
    full = memory.estimate(job(tiny_model_dir, method="full", precision="fp32"))
    assert full.weights_bytes == 4 * n and full.trainable_params == n
    assert full.gradient_bytes == 4 * n and full.optimizer_bytes == 8 * n and full.adapter_bytes == 0


@pytest.mark.parametrize("targets", [(), ("all-linear",), ("q_proj", "down_proj")])
def test_lora_parameters_match_peft(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = "all-linear" if targets == ("all-linear",) else (list(targets) or None)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=names))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = memory.estimate(job(tiny_model_dir, targets=targets, r=4))
    assert est.trainable_params == trainable
    assert est.adapter_bytes == est.gradient_bytes == 4 * trainable  # fp32
    assert est.optimizer_bytes == 8 * trainable                       # AdamW's two moments


def test_nf4_weights_by_hand():
    est = memory.estimate(job(quantization="nf4"), config=LLAMA_8B)
    h, i, layers, vocab = 4096, 14336, 32, 128256
    linear = layers * (2 * h * h + 2 * h * 1024 + 3 * h * i)   # q, o; k, v (8 kv heads x 128); MLP
    other = 2 * vocab * h + h * (2 * layers + 1)               # embeddings, LM head, norms
    assert est.params == linear + other == 8_030_261_248       # Llama 3 8B's published count
    # the rest in fp32: peft's prepare_model_for_kbit_training upcasts what it does not quantise
    assert est.weights_bytes == int(linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + 4 * other
    plain = memory.estimate(job(), config=LLAMA_8B)
    assert plain.weights_bytes == 2 * est.params
    assert est.total_bytes < plain.total_bytes - 7 * memory.GIB  # QLoRA saves ~7.7 GiB of weights


def test_checkpointing_and_micro_batch_shrink_the_estimate():
    plain = memory.estimate(job(batch_size=8, max_seq_length=2048), config=LLAMA_8B)
    ckpt = memory.estimate(job(batch_size=8, max_seq_length=2048, gradient_checkpointing=True),
                           config=LLAMA_8B)
    assert plain.total_bytes_checkpointed == ckpt.total_bytes == ckpt.total_bytes_checkpointed
    assert ckpt.total_bytes < plain.total_bytes
    assert ckpt.activation_bytes_checkpointed < plain.activation_bytes / 10
    accum = memory.estimate(job(batch_size=8, max_seq_length=2048, gradient_accumulation_steps=4),
                            config=LLAMA_8B)
    assert accum.tokens == 2 * 2048 and accum.activation_bytes == plain.activation_bytes // 4
    # the GPU forecast adds the CUDA context; a CPU run does not
    cpu = memory.estimate(job(batch_size=8, max_seq_length=2048), config=LLAMA_8B, device="cpu")
    assert cpu.overhead_bytes == 0 and plain.overhead_bytes >= memory.CUDA_CONTEXT_BYTES
    assert plain.allocated_bytes == plain.total_bytes - plain.overhead_bytes
    assert set(plain.to_dict()) >= {"weights_bytes", "adapter_bytes", "optimizer_bytes",
                                    "activation_bytes", "activation_bytes_checkpointed",
                                    "total_bytes", "total_bytes_checkpointed"}


def test_measure_peak_counts_live_storages_by_hand():
    def fn():
        a = torch.empty(1000)          # 4000 bytes
        b = torch.zeros(500)           # + 2000: the peak, 6000
        del a
        c = torch.ones(250, dtype=torch.bfloat16)  # 2000 + 500
        return b, c

    assert memory_measure.measure_peak(fn) == 6000
    w = torch.nn.Linear(10, 10, bias=False)  # 400 bytes of weights, the baseline
    assert memory_measure.measure_peak(lambda: w(torch.ones(3, 10)), baseline=[w]) == 400 + 2 * 120


def within_tolerance(d, method, precision, ckpt, mb, seq) -> None:
    measured = memory_measure.step_peak(d, method=method, precision=precision,
                                        checkpointing=ckpt, micro_batch=mb, seq_len=seq)
    est = memory.estimate(memory_measure.spec_for(d, method, precision, ckpt, mb, seq),
                          config=config_of(d), device="cpu")
    assert abs(est.total_bytes / measured - 1) < TOLERANCE, (d, mb, seq, est, measured)


@pytest.mark.parametrize("regime", [("lora", "fp32", False), ("lora", "bf16", True)])
def test_estimate_within_tolerance_on_the_tiny_model(tiny_model_dir, regime):
    within_tolerance(tiny_model_dir, *regime, 2, 64)


# A shape the constants were NOT fitted on (memory_measure.FIT_SHAPES), every regime, two token counts.
@pytest.mark.slow
@pytest.mark.parametrize("regime", memory_measure.REGIMES)
def test_estimate_within_tolerance_of_measured_peak(tmp_path, regime):
    d = memory_measure.write_model(tmp_path / "check", *memory_measure.CHECK_SHAPES[0])
    for mb, seq in ((2, 128), (1, 384)):
        within_tolerance(d, *regime, mb, seq)


def test_advice_names_only_what_applies():
    text = memory.advice(job(batch_size=8, max_seq_length=2048))
    assert "turn on gradient_checkpointing" in text
    assert "gradient_accumulation_steps=2 keeps batch_size=8" in text
    assert "lower max_seq_length (now 2048)" in text
    assert "QLoRA: quantization=nf4" in text
    assert "num_processes=2" in text
    lean = memory.advice(job(batch_size=4, max_seq_length=128, gradient_checkpointing=True,
                             gradient_accumulation_steps=4, quantization="nf4"))
    for absent in ("checkpointing", "gradient_accumulation", "max_seq_length", "QLoRA", "num_processes"):
        assert absent not in lean
    # the next accumulation that divides the batch: 9 -> 3 (2 does not divide it)
    assert "gradient_accumulation_steps=3 keeps batch_size=9" in memory.advice(job(batch_size=9, max_seq_length=64))
    full = memory.advice(job(method="full", batch_size=1, max_seq_length=64))
    assert "QLoRA" not in full and "method=lora" in full and "num_processes" not in full


def test_check_fits_refuses_with_advice_and_never_on_a_cpu():
    spec = job(batch_size=8, max_seq_length=2048)
    est = memory.estimate(spec, config=LLAMA_8B)
    memory.check_fits(est, spec, 0)                     # a CPU: nothing to check against
    memory.check_fits(est, spec, est.total_bytes)       # exactly fits
    with pytest.raises(TunewireError) as e:
        memory.check_fits(est, spec, 80 * memory.GIB)
    assert e.value.reason == R.INSUFFICIENT_GPU_MEMORY and e.value.reason.user_error
    assert f"needs ~{est.total_bytes / memory.GIB:.1f} GiB, the GPU has 80.0 GiB" in e.value.message
    assert "turn on gradient_checkpointing" in e.value.message
