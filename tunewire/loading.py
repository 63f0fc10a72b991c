"""Loading a base model directory with transformers: tokenizer, stop tokens, causal LM, body.

The trainer (recipes, pre-flight, warm-up), feature extraction and serving's Classify all load
base models through here, so a directory that cannot be used fails the same way everywhere:
`TunewireError(BASE_MODEL_INVALID)` (FAILED_PRECONDITION for an RPC, a user error in a job).
torch and transformers are imported inside the functions, so importing this module is cheap.

    tokenizer = load_tokenizer("/models/tiny")
    stops = stop_ids("/models/tiny", tokenizer)      # EOS + generation_config's end tokens
    model = load_causal_lm("/models/tiny")            # fp32, train mode
    body = load_body("/models/tiny")                  # no LM head, fp32, frozen, eval mode
"""

from __future__ import annotations

from pathlib import Path

from tunewire import reasons as R
from tunewire.errors import TunewireError


def _unusable(what: str, base_model: str | Path, e: Exception) -> TunewireError:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):  # the directory is fine; the GPU is full
        return TunewireError(R.INSUFFICIENT_GPU_MEMORY, f"{what} of {base_model} does not fit in "
                             f"the GPU's free memory (a training job: see its memory estimate; "
                             f"serving: lower gpu_memory_utilization to leave room): {e}")
    return TunewireError(R.BASE_MODEL_INVALID, f"cannot load {what} from {base_model}: "
                         f"{type(e).__name__}: {e}")


def load_tokenizer(base_model: str | Path):
    """The base model's tokenizer."""
    from transformers import AutoTokenizer

    if not (Path(base_model) / "config.json").is_file():
        raise TunewireError(R.BASE_MODEL_INVALID, f"no model directory (config.json) at {base_model}")
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except Exception as e:  # noqa: BLE001 - any loader error means the directory is unusable
        raise _unusable("the tokenizer", base_model, e) from None


def stop_ids(base_model: str | Path, tokenizer) -> set[int]:
    """Tokens that end a generation on the server: the tokenizer's EOS and generation_config's.
    A tokenizer without EOS is refused: a model trained on it could never learn to stop."""
    from transformers import GenerationConfig

    if tokenizer.eos_token_id is None:
        raise TunewireError(R.BASE_MODEL_INVALID, f"the tokenizer of {base_model} has no EOS "
                            f"token, so the model could not learn to stop")
    ids = {tokenizer.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(base_model).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS is all
        return ids
    return ids | ({eos} if isinstance(eos, int) else set(eos or ()))


def load_causal_lm(base_model: str | Path, *, dtype=None, device=None):
    """The causal LM in `dtype` (default fp32: on a CPU half precision brings no speed and costs
    accuracy) on `device` (default CPU), loaded straight onto it; SDPA attention where the model
    has it. QLoRA's 4-bit load is trainer_service's (it needs bitsandbytes and CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype or torch.float32,
                                                    device_map=device)
    except Exception as e:  # noqa: BLE001 - any loader error means the directory is unusable
        raise _unusable("a causal LM", base_model, e) from None


def load_body(base_model: str | Path, *, dtype=None, device=None):
    """The model without its LM head in `dtype` (default fp32) on `device` (default CPU), frozen
    and in eval mode (no dropout)."""
    import torch
    from transformers import AutoModel

    try:
        body = AutoModel.from_pretrained(base_model, dtype=dtype or torch.float32, device_map=device)
    except Exception as e:  # noqa: BLE001 - any loader error means the directory is unusable
        raise _unusable("the model", base_model, e) from None
    return body.eval().requires_grad_(False)
