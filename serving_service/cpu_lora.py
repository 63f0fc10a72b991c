"""vLLM general plugin that fixes multi-LoRA batches on the CPU backend.

What: on CPU, vLLM runs LoRA through the pure-torch punica ops in
`vllm.lora.ops.torch_ops.lora_ops`. They gather the adapter weights with the
per-row slot index (`lora_b_weights[lora_indices_tensor]`), and a row without an
adapter carries the index -1, which torch reads as "the last slot". So in a batch
that mixes base-model rows with LoRA rows, the base rows get the delta of whatever
adapter sits in the last slot (the GPU kernels skip -1). Upstream: vllm#48421,
vllm#49656. The fix here: zero the input rows whose index is negative before the
op runs, so those rows contribute exactly 0 (0 @ W == 0).

Replaced functions (vllm 0.32.0):
    vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink / bgmv_expand / bgmv_expand_slice
The sgmv_* ops in that module call the bgmv_* ones through module globals, so they
are covered too. `vllm.lora.ops.torch_ops` and `vllm.lora.punica_wrapper.punica_cpu`
import the names directly (`from ... import bgmv_shrink`), so they are rebound there.

How it runs: pyproject declares the entry point `vllm.general_plugins:
tunewire_cpu_lora = serving_service.cpu_lora:register`, and vLLM calls `register()`
in every process it starts (front end, engine core, workers). On non-CPU platforms
it does nothing. On CPU it checks the vLLM version it was written against and
raises at start-up if it differs (re-check the upstream ops, then bump
`VLLM_VERSION`). Calling it twice is harmless.

Set TUNEWIRE_DISABLE_CPU_LORA_FIX=1 to skip the patch (used to show the bug in
tests/test_engine_lora.py).
"""

from __future__ import annotations

import functools
import logging
import os

VLLM_VERSION = "0.32.0"  # the vLLM whose torch LoRA ops this patch was checked against
PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MARK = "_tunewire_skips_negative_rows"

log = logging.getLogger(__name__)


def _skip_negative_rows(op):
    """Wrap a bgmv op (inputs, weights, output, lora_indices, ...) so rows whose
    lora index is negative (no adapter) feed zeros, hence add exactly zero."""

    @functools.wraps(op)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        import torch

        has_lora = (lora_indices_tensor >= 0).unsqueeze(-1)
        inputs = torch.where(has_lora, inputs, torch.zeros((), dtype=inputs.dtype))
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def register() -> None:
    """vLLM general-plugin entry point: patch the CPU LoRA ops (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if os.environ.get("TUNEWIRE_DISABLE_CPU_LORA_FIX") == "1":
        log.warning("TUNEWIRE_DISABLE_CPU_LORA_FIX=1: CPU mixed-batch LoRA fix NOT applied")
        return
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(
            f"serving_service.cpu_lora patches vLLM {VLLM_VERSION}'s torch LoRA ops, but vLLM "
            f"{vllm.__version__} is installed: check vllm/lora/ops/torch_ops/lora_ops.py still "
            f"indexes weights with the -1 'no adapter' sentinel, then update VLLM_VERSION")

    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in PATCHED:
        original = getattr(lora_ops, name)
        fixed = original if getattr(original, _MARK, False) else _skip_negative_rows(original)
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, fixed)
