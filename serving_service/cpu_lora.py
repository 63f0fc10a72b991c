"""vLLM general plugin: a correct, fast LoRA path for vLLM's CPU backend.

What: on CPU, vLLM 0.32 runs LoRA through the pure-torch punica ops in
`vllm.lora.ops.torch_ops.lora_ops`. They gather a copy of the adapter weights for every row
(`lora_b_weights[lora_indices_tensor]`, then a batched einsum), which made adapter requests ~2.6x
slower than base ones. Worse, a row without an adapter carries the index -1, which torch reads as
"the last slot", so in a batch that mixes base rows with LoRA rows the base rows got the delta of
whatever adapter sits in the last slot (the GPU kernels skip -1; upstream vllm#48421, vllm#49656).

This module installs the replacements; their arithmetic is in serving_service/cpu_lora_kernels.py
(plain torch), and with TUNEWIRE_CPU_LORA_COMPILE=1 the custom ops of
serving_service/cpu_lora_compile.py take over the linear layers' methods so that torch.compile
stays on. Replaced (vllm 0.32.0):
    vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink / bgmv_expand / bgmv_expand_slice: grouped by
        slot, rows with a negative index skipped (kernels.grouped_ops). The sgmv_* ops call them
        through module globals, so they are covered too; `vllm.lora.ops.torch_ops` and
        `vllm.lora.punica_wrapper.punica_cpu` import the names directly, so they are rebound there.
    PunicaWrapperCPU.add_lora_linear / add_shrink / add_expand: the linear layers' entry points,
        skipping the slices whose slot weights are all zero (a q/v adapter ran shrink + expand on
        zeros for 5 of a Llama layer's 7 slices), one grouping per step
    PunicaWrapperCPU.update_metadata: computes that grouping (upstream's, inherited from
        PunicaWrapperBase, runs first)
    LoRAModelManager.activate_adapter: forgets what was learnt about slot weights when it writes a slot
    (compiled mode, cpu_lora_compile.py: add_lora_embedding and CpuPlatform.check_and_update_config)
The GPU path (triton punica ops) is never touched: on non-CPU platforms `register()` returns
without doing anything.

How it runs: pyproject declares the entry point `vllm.general_plugins:
tunewire_cpu_lora = serving_service.cpu_lora:register`, and vLLM calls `register()` in every
process it starts (front end, engine core, workers). On CPU it checks the vLLM version it was
written against and raises at start-up if it differs (re-check the upstream ops, then bump
`VLLM_VERSION`). Every call first puts back what an earlier call replaced (`unregister()`), so
calling it again, e.g. after changing the switches, is harmless.

Switches (environment, read by `register()` in each vLLM process):
    TUNEWIRE_DISABLE_CPU_LORA_FIX=1   vLLM's own ops and methods (shows the mixed-batch bug)
    TUNEWIRE_CPU_LORA_COMPILE=1       keep torch.compile on under LoRA (the serving service sets
                                      it from `cpu_lora_compile`, on unless enforce_eager)
    TUNEWIRE_CPU_LORA_KERNEL=python   compiled mode with the Python twin of the C++ kernel
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

from serving_service import cpu_lora_kernels as kernels

VLLM_VERSION = "0.32.0"  # the vLLM whose torch LoRA ops this patch was checked against
PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MARK = "_tunewire_cpu_lora"  # set on our replacements; its value is what to restore

log = logging.getLogger(__name__)


def fused_methods(upstream: dict, forget: Callable[[], None] = kernels.forget) -> dict:
    """Replacements for PunicaWrapperCPU.add_lora_linear / add_shrink / add_expand /
    update_metadata and LoRAModelManager.activate_adapter; `upstream` maps each name to the
    upstream method, `forget` drops what the kernels learnt about slot weights. The row grouping
    is computed once per step (update_metadata); anything the fused code does not handle goes to
    the upstream method unchanged."""

    def step_groups(self, x2):
        groups = getattr(self, "_tunewire_groups", None)
        return groups[1] if groups is not None and groups[0] == x2.shape[0] else None

    @functools.wraps(upstream["update_metadata"])
    def update_metadata(self, *args, **kwargs):
        upstream["update_metadata"](self, *args, **kwargs)
        idx = self.token_lora_indices
        self._tunewire_groups = (idx.shape[0], kernels.row_groups(idx))

    @functools.wraps(upstream["add_lora_linear"])
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                        buffer=None, **kwargs):
        x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        groups = step_groups(self, x2)
        if (groups is None or buffer is not None or y2.shape[0] != x2.shape[0]
                or sum(output_slices) > y2.shape[1]
                or any(b.shape[-2] != n for b, n in zip(lora_b_stacked, output_slices))):
            return upstream["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                               output_slices, buffer=buffer, **kwargs)
        kernels.lora_linear(y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, groups)

    @functools.wraps(upstream["add_shrink"])
    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        # Used by the row-parallel layers (o_proj, down_proj): y[i][:, :r] = scale * x @ A_i.T,
        # rows without an adapter (or whose slot holds no weights here) get 0.
        x2 = x.view(-1, x.shape[-1])
        groups = step_groups(self, x2)
        outs = [y[i].view(-1, y[i].shape[-1]) for i in range(len(lora_a_stacked))]
        if groups is None or any(o.shape[0] != x2.shape[0] or o.shape[1] < a.shape[-2]
                                 for o, a in zip(outs, lora_a_stacked)):
            return upstream["add_shrink"](self, y, x, lora_a_stacked, scale, **kwargs)
        kernels.lora_shrink(outs, x2, lora_a_stacked, scale, groups)

    @functools.wraps(upstream["add_expand"])
    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True,
                   **kwargs):
        # y[:, slice i] += x[i] @ B_i.T for rows with an adapter whose slot holds weights here.
        y2 = y.view(-1, y.shape[-1])
        groups = step_groups(self, y2)
        ins = [x[i].view(-1, x[i].shape[-1]) for i in range(len(lora_b_stacked))]
        if (groups is None or not add_inputs or offset_start + sum(output_slices) > y2.shape[1]
                or any(b.shape[-2] != n or h.shape != (y2.shape[0], b.shape[-1])
                       for b, n, h in zip(lora_b_stacked, output_slices, ins))):
            return upstream["add_expand"](self, y, x, lora_b_stacked, output_slices,
                                          offset_start, add_inputs, **kwargs)
        kernels.lora_expand(y2, ins, lora_b_stacked, output_slices, offset_start, groups)

    @functools.wraps(upstream["activate_adapter"])
    def activate_adapter(self, *args, **kwargs):
        # vLLM calls this for every adapter of every step; it returns False (writes nothing) when
        # the adapter is already in a slot. Forgetting then would re-scan every slot each step.
        wrote = True  # an exception may leave a slot half-written: forget then too
        try:
            wrote = upstream["activate_adapter"](self, *args, **kwargs)
            return wrote
        finally:
            if wrote is not False:
                forget()  # slot weights were (re)written

    return {"add_lora_linear": add_lora_linear, "add_shrink": add_shrink, "add_expand": add_expand,
            "update_metadata": update_metadata, "activate_adapter": activate_adapter}


def build_ops(upstream: dict) -> dict:
    """The replacements of the PATCHED ops ({name: upstream op}), marked with what they replace."""
    ops = kernels.grouped_ops(upstream)
    for name, op in ops.items():
        setattr(op, _MARK, upstream[name])
    return ops


def _patched_modules():
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    return lora_ops, torch_ops, punica_cpu


def _method_owners() -> dict:
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform

    return {"add_lora_linear": PunicaWrapperCPU, "add_shrink": PunicaWrapperCPU,
            "add_expand": PunicaWrapperCPU, "update_metadata": PunicaWrapperCPU,
            "add_lora_embedding": PunicaWrapperCPU, "activate_adapter": LoRAModelManager,
            "check_and_update_config": CpuPlatform}


def _function(attr):
    return attr.__func__ if isinstance(attr, classmethod) else attr


def unregister() -> None:
    """Puts back everything `register()` replaced in this process (nothing replaced: no-op)."""
    for module in _patched_modules():
        for name in PATCHED:
            op = getattr(module, name)
            setattr(module, name, getattr(op, _MARK, op))
    for name, cls in _method_owners().items():
        fn = _function(cls.__dict__.get(name))
        if fn is not None and hasattr(fn, _MARK):
            original = getattr(fn, _MARK)
            if original is None:
                delattr(cls, name)  # upstream inherits it
            else:
                setattr(cls, name, original)
    kernels.forget()


def _install_methods(compile_: bool) -> None:
    """The fused methods, plus with `compile_` the custom-op methods of cpu_lora_compile and the
    platform hook; call on upstream classes (after unregister)."""
    owners = _method_owners()
    upstream = {name: getattr(cls, name) for name, cls in owners.items()}
    own = {name: (name in cls.__dict__) for name, cls in owners.items()}
    if compile_:
        from serving_service import cpu_lora_compile  # imports torch and defines the ops: on demand

        cpu_lora_compile.load_kernels()
        new = fused_methods(upstream, forget=cpu_lora_compile.forget)
        new.update(cpu_lora_compile.methods(upstream["update_metadata"]))
        new["check_and_update_config"] = cpu_lora_compile.keep_compile(
            upstream["check_and_update_config"])
    else:
        new = fused_methods(upstream)
    for name, fn in new.items():
        cls = owners[name]
        # what to restore: the class's own attribute, or None when it was inherited
        setattr(_function(fn), _MARK, cls.__dict__[name] if own[name] else None)
        setattr(cls, name, fn)


def register() -> None:
    """vLLM general-plugin entry point: replace the CPU LoRA ops and methods (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if os.environ.get("TUNEWIRE_DISABLE_CPU_LORA_FIX") == "1":
        log.warning("TUNEWIRE_DISABLE_CPU_LORA_FIX=1: CPU LoRA ops NOT replaced (mixed batches "
                    "are wrong, adapters slow)")
        unregister()
        return
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(
            f"serving_service.cpu_lora replaces vLLM {VLLM_VERSION}'s torch LoRA ops, but vLLM "
            f"{vllm.__version__} is installed: check vllm/lora/ops/torch_ops/lora_ops.py "
            f"(bgmv_shrink/bgmv_expand/bgmv_expand_slice signatures and semantics, the -1 'no "
            f"adapter' sentinel), then update VLLM_VERSION")
    unregister()
    modules = _patched_modules()
    ops = build_ops({name: getattr(modules[0], name) for name in PATCHED})
    for module in modules:
        for name in PATCHED:
            setattr(module, name, ops[name])
    _install_methods(os.environ.get("TUNEWIRE_CPU_LORA_COMPILE") == "1")
