"""QLoRA's base model (`hyperparameters.quantization = "nf4"`): the frozen base loaded in 4-bit
NF4 with bitsandbytes, ready for LoRA.

    qlora.check_available(compute.device)     # before anything is loaded; refusal is testable on a CPU
    base = qlora.load_base(spec.base_model, compute, gradient_checkpointing=hp.gradient_checkpointing)
    model = recipe_lora.add_lora(base, spec)  # the adapter as for any LoRA job

The base weights are stored as 4-bit NF4 (double-quantised block scales: ~0.5 bytes per weight)
and dequantised block by block to the job's dtype (bnb_4bit_compute_dtype) inside each matmul.
peft's prepare_model_for_kbit_training freezes the base, casts the remaining half-precision
parameters (norms, embeddings, LM head: bitsandbytes does not quantise them) to fp32 for stable
training, and turns on gradient checkpointing when the job asks for it. The LoRA weights are
fp32 as in plain LoRA.

The adapter trained this way is an ordinary LoRA adapter: the same peft files, for the
UNQUANTISED base. vLLM serves it on the bf16/fp32 base, so the served model is the base the
adapter was trained against minus the NF4 rounding of the base weights (the adapter learned to
correct the quantised base; on the exact base its effect is the same up to that rounding).
bench/gpu_train.py measures the served-vs-trained difference.

bitsandbytes is an optional extra (`pip install tunewire[qlora]`, CUDA only): without it, or on
a worker without a CUDA device, the job is refused with QUANTIZATION_UNAVAILABLE before loading.
"""

from __future__ import annotations

import importlib.util

from tunewire import reasons as R
from tunewire.errors import TunewireError


def check_available(device) -> None:
    """Refuses nf4 where it cannot run: no CUDA device, or bitsandbytes not installed."""
    if device.type != "cuda":
        raise TunewireError(R.QUANTIZATION_UNAVAILABLE, f"quantization nf4 (QLoRA) needs a CUDA "
                            f"GPU; this job computes on {device.type}: use quantization none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunewireError(R.QUANTIZATION_UNAVAILABLE, "quantization nf4 (QLoRA) needs "
                            "bitsandbytes, which this worker lacks: install the trainer's qlora "
                            "extra (pip install bitsandbytes) or use quantization none")


def quantization_config(dtype):
    """transformers' BitsAndBytesConfig for NF4 with `dtype` as the compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)


def load_base(base_model: str, compute, *, gradient_checkpointing: bool):
    """The base causal LM in 4-bit on compute.device, prepared for k-bit training (see the
    module docstring). Raises QUANTIZATION_UNAVAILABLE (check_available) or BASE_MODEL_INVALID."""
    check_available(compute.device)
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_model, quantization_config=quantization_config(compute.dtype),
            dtype=compute.dtype, device_map={"": compute.device.index or 0})
    except Exception as e:  # noqa: BLE001 - any loader error means the directory is unusable
        raise TunewireError(R.BASE_MODEL_INVALID, f"cannot load a 4-bit causal LM from "
                            f"{base_model}: {type(e).__name__}: {e}") from None
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
