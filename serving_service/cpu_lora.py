"""vLLM general plugin: a correct, fast LoRA path for vLLM's CPU backend.

What: on CPU, vLLM runs LoRA through the pure-torch punica ops in
`vllm.lora.ops.torch_ops.lora_ops`. They gather a copy of the adapter weights for every row
(`lora_b_weights[lora_indices_tensor]`, then a batched einsum), which made adapter requests ~2.6x
slower than base ones. Worse, a row without an adapter carries the index -1, which torch reads as
"the last slot", so in a batch that mixes base rows with LoRA rows the base rows got the delta of
whatever adapter sits in the last slot (the GPU kernels skip -1; upstream vllm#48421, vllm#49656).

The fix here replaces those ops with grouped ones: rows are grouped by adapter slot, each active
adapter does one plain matmul over its rows, and rows with a negative index are skipped (they
contribute exactly 0; never multiplied by anything). Semantics otherwise as upstream: weights are
[num_loras, out, in] or [num_loras, 1, out, in]; inputs and weights are cast to the output dtype;
shrink writes `output[:, :out] = scaling * x @ A.T` (rows without an adapter get 0), expand
writes/adds `x @ B.T` into `output[:, :min(out, output width)]`, expand_slice into
`output[:, slice_offset:slice_offset + slice_size]`, `add_inputs` choosing += or = (rows without
an adapter: += 0, or = 0). Shapes the grouped code does not handle (row counts that differ,
i.e. upstream's broadcast/truncation corner cases) go to the upstream op with the no-adapter rows'
inputs zeroed, which is the same result computed the slow way.

On top of that (mode "fused", the default), the linear layers' entry point skips the work
upstream does on zeros: vLLM wraps every supported projection (in a Llama layer qkv, o, gate_up,
down: 7 slices) and keeps all-zero slot weights where an adapter does not target one, so a q/v
adapter ran shrink + expand on zeros for 5 of 7 slices. `add_lora_linear` here does two
matmuls per (layer, adapter slot): the slices that hold weights are packed once into one A and
one B (`_plan`), from a row grouping computed once per step in `update_metadata` instead of once
per op; plans are forgotten whenever `activate_adapter` writes new weights into a slot.

Replaced functions (vllm 0.32.0):
    vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink / bgmv_expand / bgmv_expand_slice
    vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU.add_lora_linear (fused)
    PunicaWrapperCPU.update_metadata (fused; upstream inherits PunicaWrapperBase's, called first)
    vllm.lora.model_manager.LoRAModelManager.activate_adapter (fused; upstream called first)
The sgmv_* ops in that module call the bgmv_* ones through module globals, so they are covered
too. `vllm.lora.ops.torch_ops` and `vllm.lora.punica_wrapper.punica_cpu` import the names
directly (`from ... import bgmv_shrink`), so they are rebound there. The GPU path (triton punica
ops) is never touched: on non-CPU platforms `register()` returns without doing anything.

How it runs: pyproject declares the entry point `vllm.general_plugins:
tunewire_cpu_lora = serving_service.cpu_lora:register`, and vLLM calls `register()` in every
process it starts (front end, engine core, workers). On CPU it checks the vLLM version it was
written against and raises at start-up if it differs (re-check the upstream ops, then bump
`VLLM_VERSION`). Calling it twice is harmless: each call first restores what an earlier call
replaced. (vLLM turns torch.compile off on CPU when LoRA is enabled, so the data-dependent
grouping here runs eagerly, unless TUNEWIRE_CPU_LORA_COMPILE=1 makes it custom ops; the
serving service sets that from `cpu_lora_compile`, on by default.)

Switches (environment, read by `register()` in each vLLM process):
    TUNEWIRE_DISABLE_CPU_LORA_FIX=1   upstream ops untouched (shows the mixed-batch bug)
    TUNEWIRE_CPU_LORA_OPS=fused       the default: grouped ops + the fused add_lora_linear
    TUNEWIRE_CPU_LORA_COMPILE=1       with fused: keep torch.compile on under LoRA, the fused
                                      methods as custom ops (serving_service/cpu_lora_compile.py)
    TUNEWIRE_CPU_LORA_OPS=grouped     the grouped ops only (for benchmarks)
    TUNEWIRE_CPU_LORA_OPS=masked      the slow correct path: upstream ops with no-adapter rows
                                      zeroed (the first fix; for benchmarks)
"""

from __future__ import annotations

import functools
import logging
import os

VLLM_VERSION = "0.32.0"  # the vLLM whose torch LoRA ops this patch was checked against
PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MARK = "_tunewire_cpu_lora"  # set on our replacements; its value is the upstream op

log = logging.getLogger(__name__)


def _masked(op):
    """Upstream `op` with the inputs of rows whose lora index is negative zeroed (correct, slow)."""

    @functools.wraps(op)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        import torch

        has_lora = (lora_indices_tensor >= 0).unsqueeze(-1)
        inputs = torch.where(has_lora, inputs, torch.zeros((), dtype=inputs.dtype))
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    return wrapper


def _groups(idx):
    """[(slot, rows)] for the non-negative slots in `idx`; rows is None when it is every row."""
    import torch

    if idx.numel() == 0:
        return []
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if hi < 0:
        return []
    if lo == hi:
        return [(hi, None)]
    slots = torch.unique(idx).tolist()
    return [(s, (idx == s).nonzero().squeeze(1)) for s in slots if s >= 0]


def _apply(x, weights, out, idx, scale, add, out_rows=None):
    """out[rows] (+)= scale * x[rows] @ weights[slot][:out_rows].T for each slot's rows; rows
    with a negative slot: untouched if `add`, else set to 0. `out` is a [rows, n] view."""
    groups = _groups(idx)
    if not add and not (len(groups) == 1 and groups[0][1] is None):
        out.zero_()  # assignment semantics: rows without an adapter get exactly 0
    for slot, rows in groups:
        w = weights[slot]
        if w.dim() == 3:  # [1, out, in]
            w = w[0]
        if out_rows is not None:
            w = w[:out_rows]
        w = w.to(dtype=out.dtype)
        xs = (x if rows is None else x.index_select(0, rows)).to(dtype=out.dtype)
        delta = xs @ w.t()
        if scale is not None:
            delta = scale * delta
        if rows is None:
            if add:
                out += delta
            else:
                out.copy_(delta)
        elif add:
            out.index_add_(0, rows, delta)
        else:
            out.index_copy_(0, rows, delta)


def _shapes_ok(inputs, weights, output_tensor, idx, out_cols):
    n = inputs.shape[0]
    return (inputs.dim() == 2 and idx.dim() == 1 and idx.shape[0] == n
            and output_tensor.shape[0] == n and weights.dim() in (3, 4)
            and (weights.dim() == 3 or weights.shape[1] == 1)
            and weights.shape[-1] == inputs.shape[1] and out_cols is not None)


def _grouped_ops(upstream):
    """The three grouped ops; `upstream` maps name -> upstream op (used, masked, as fallback)."""
    slow = {name: _masked(op) for name, op in upstream.items()}

    @functools.wraps(upstream["bgmv_shrink"])
    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        n_out = lora_b_weights.shape[-2]
        if not _shapes_ok(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                          n_out if output_tensor.shape[1] >= n_out else None):
            return slow["bgmv_shrink"](inputs, lora_b_weights, output_tensor,
                                       lora_indices_tensor, scaling)
        _apply(inputs, lora_b_weights, output_tensor[:, :n_out], lora_indices_tensor,
               scaling, add=False)

    @functools.wraps(upstream["bgmv_expand"])
    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        # upstream: the adapter and the model may pad the output differently -> common width
        common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
        if not _shapes_ok(inputs, lora_b_weights, output_tensor, lora_indices_tensor, common):
            return slow["bgmv_expand"](inputs, lora_b_weights, output_tensor,
                                       lora_indices_tensor, add_inputs)
        _apply(inputs, lora_b_weights, output_tensor[:, :common], lora_indices_tensor,
               None, add=add_inputs, out_rows=common)

    @functools.wraps(upstream["bgmv_expand_slice"])
    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                          slice_offset, slice_size, add_inputs=True):
        fits = (lora_b_weights.shape[-2] == slice_size
                and slice_offset >= 0 and slice_offset + slice_size <= output_tensor.shape[1])
        if not _shapes_ok(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                          slice_size if fits else None):
            return slow["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor,
                                             lora_indices_tensor, slice_offset, slice_size,
                                             add_inputs)
        _apply(inputs, lora_b_weights, output_tensor[:, slice_offset:slice_offset + slice_size],
               lora_indices_tensor, None, add=add_inputs)

    return {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand,
            "bgmv_expand_slice": bgmv_expand_slice}


# ---- the linear layers' entry point: PunicaWrapperCPU.add_lora_linear --------------------
# vLLM wraps every supported projection of every layer (qkv, o, gate_up, down: 7 slices in a
# Llama layer) and keeps all-zero weights in a slot whose adapter does not target that
# projection, so upstream runs shrink + expand on zeros for them: for a q/v adapter 5 of 7.
# This cache says which (stacked weights, slot) hold anything; it is emptied whenever an
# adapter is activated into a slot (the only time vLLM writes slot weights).
_FILLED: dict[tuple[int, int], bool] = {}
_PLANS: dict[tuple, tuple | None] = {}  # (A ptr, slot, scale, dtype) -> _plan(); emptied with _FILLED


FORGET_HOOKS: list = []  # more to call on forget() (the C++ kernel's plans)


def forget() -> None:
    """Drop what was learnt about slot weights (call whenever vLLM writes into a slot)."""
    _FILLED.clear()
    _PLANS.clear()
    for hook in FORGET_HOOKS:
        hook()


def _filled(w, slot: int) -> bool:
    key = (w.data_ptr(), slot)
    hit = _FILLED.get(key)
    if hit is None:
        hit = _FILLED[key] = bool(w[slot].any())
    return hit


def _weights(w, slot: int):
    w = w[slot]
    return w[0] if w.dim() == 3 else w  # [1, out, in] -> [out, in]


def _plan(lora_a_stacked, lora_b_stacked, scale: float, output_slices, slot: int, dtype):
    """(A, B) for one slot of one layer, or None when no slice of it holds weights: A [in, R] is
    the filled slices' A.T side by side, in float32 with `scale` folded in; B [R, sum(slices)] in
    `dtype` holds each filled slice's B.T at its own rows and output columns, zeros elsewhere.
    Then the whole layer's delta is `(x @ A).to(dtype) @ B`: two matmuls instead of two per slice
    plus the casts, transposes and views around each (~3 us apiece in Python, x120 per step)."""
    key = (lora_a_stacked[0].data_ptr(), slot, scale, dtype)
    plan = _PLANS.get(key, False)
    if plan is not False:
        return plan
    import torch

    cols, rows, offset = [], [], 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
        if _filled(a, slot) and _filled(b, slot):
            wa, wb = _weights(a, slot), _weights(b, slot)  # [r, in], [size, r]
            cols.append(wa.float().t() * scale)
            block = torch.zeros(wb.shape[1], sum(output_slices), dtype=dtype)
            block[:, offset:offset + size] = wb.t()
            rows.append(block)
        offset += size
    plan = (torch.cat(cols, 1).contiguous(), torch.cat(rows, 0)) if cols else None
    _PLANS[key] = plan
    return plan


def lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, groups) -> None:
    """y[:, slice i] += (scale * x[rows] @ A_i[slot].T) @ B_i[slot].T for each (slot, rows) in
    `groups` (rows None = every row), upstream's add_lora_linear, minus the slices whose slot
    weights are all zero (their delta is exactly 0). The shrink runs in float32 like upstream's
    float32 buffer; the expand in y's dtype. y: [tokens, sum(output_slices)], x: [tokens, in]."""
    for slot, rows in groups:
        plan = _plan(lora_a_stacked, lora_b_stacked, scale, output_slices, slot, y.dtype)
        if plan is None:
            continue
        a, b = plan
        out = y if y.shape[1] == b.shape[1] else y[:, :b.shape[1]]
        if rows is None:
            out.addmm_((x.float() @ a).to(y.dtype), b)
        else:
            out.index_add_(0, rows, (x.index_select(0, rows).float() @ a).to(y.dtype) @ b)


def lora_shrink(outs, x, lora_a_stacked, scale: float, groups) -> None:
    """outs[i][:, :r] = scale * x[rows] @ A_i[slot].T per (slot, rows); every other row of that
    column block, and a slot with no weights in slice i, gets 0 (upstream's assignment)."""
    for out, a in zip(outs, lora_a_stacked):
        out = out[:, :a.shape[-2]]
        out.zero_()
        for slot, rows in groups:
            if _filled(a, slot):
                xs = x if rows is None else x.index_select(0, rows)
                delta = scale * (xs.to(out.dtype) @ _weights(a, slot).to(out.dtype).t())
                if rows is None:
                    out.copy_(delta)
                else:
                    out.index_copy_(0, rows, delta)


def lora_expand(y, ins, lora_b_stacked, output_slices, offset: int, groups) -> None:
    """y[:, slice i] += ins[i][rows] @ B_i[slot].T per (slot, rows) whose slot holds weights."""
    for h, b, size in zip(ins, lora_b_stacked, output_slices):
        out = y[:, offset:offset + size]
        for slot, rows in groups:
            if _filled(b, slot):
                hs = h if rows is None else h.index_select(0, rows)
                delta = hs.to(y.dtype) @ _weights(b, slot).to(y.dtype).t()
                if rows is None:
                    out += delta
                else:
                    out.index_add_(0, rows, delta)
        offset += size


def _fused_methods(upstream: dict) -> dict:
    """Replacements for PunicaWrapperCPU.add_lora_linear / add_shrink / add_expand /
    update_metadata and LoRAModelManager.activate_adapter; `upstream` maps each name to the
    upstream method. The row grouping is computed once per step (update_metadata); anything the
    fused code does not handle goes to the upstream method unchanged."""

    def step_groups(self, x2):
        groups = getattr(self, "_tunewire_groups", None)
        return groups[1] if groups is not None and groups[0] == x2.shape[0] else None

    @functools.wraps(upstream["update_metadata"])
    def update_metadata(self, *args, **kwargs):
        upstream["update_metadata"](self, *args, **kwargs)
        idx = self.token_lora_indices
        self._tunewire_groups = (idx.shape[0], _groups(idx))

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
        lora_linear(y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, groups)

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
        lora_shrink(outs, x2, lora_a_stacked, scale, groups)

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
        lora_expand(y2, ins, lora_b_stacked, output_slices, offset_start, groups)

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


MODES = ("fused", "grouped", "masked")


def build_ops(upstream: dict, mode: str = "fused") -> dict:
    """Replacement ops for `upstream` ({name: upstream op}): "fused" and "grouped" (fast; fused
    also replaces add_lora_linear, see register) or "masked"."""
    if mode in ("fused", "grouped"):
        ops = _grouped_ops(upstream)
    elif mode == "masked":
        ops = {name: _masked(op) for name, op in upstream.items()}
    else:
        raise ValueError(f"TUNEWIRE_CPU_LORA_OPS must be one of {MODES}, not {mode!r}")
    for name, op in ops.items():
        setattr(op, _MARK, upstream[name])
    return ops


def _set_methods(mode: str, compile_: bool = False) -> None:
    """The fused mode's class-level replacements, plus with `compile_` the custom-op methods of
    cpu_lora_compile and the platform hook; everything not wanted is restored to upstream."""
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform

    owners = {"add_lora_linear": PunicaWrapperCPU, "add_shrink": PunicaWrapperCPU,
              "add_expand": PunicaWrapperCPU, "update_metadata": PunicaWrapperCPU,
              "add_lora_embedding": PunicaWrapperCPU, "activate_adapter": LoRAModelManager,
              "check_and_update_config": CpuPlatform}
    raw = {name: cls.__dict__.get(name) for name, cls in owners.items()}  # ours carry _MARK
    for name, cls in owners.items():  # back to upstream first (idempotent)
        fn = raw[name].__func__ if isinstance(raw[name], classmethod) else raw[name]
        if fn is not None and hasattr(fn, _MARK):
            original = getattr(fn, _MARK)
            if original is None:
                delattr(cls, name)  # upstream inherits it
            else:
                setattr(cls, name, original)
    if mode != "fused":
        return
    upstream = {name: getattr(cls, name) for name, cls in owners.items()}
    own = {name: (name in cls.__dict__) for name, cls in owners.items()}
    new = _fused_methods(upstream)
    if compile_:
        from serving_service import cpu_lora_compile

        cpu_lora_compile.load_kernels()
        new.update(cpu_lora_compile.methods(upstream["update_metadata"]))
        new["check_and_update_config"] = cpu_lora_compile.keep_compile(
            upstream["check_and_update_config"])
    for name, fn in new.items():
        cls = owners[name]
        # what to restore: the class's own attribute, or None when it was inherited
        setattr(fn.__func__ if isinstance(fn, classmethod) else fn, _MARK,
                cls.__dict__[name] if own[name] else None)
        setattr(cls, name, fn)


def register() -> None:
    """vLLM general-plugin entry point: replace the CPU LoRA ops (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if os.environ.get("TUNEWIRE_DISABLE_CPU_LORA_FIX") == "1":
        log.warning("TUNEWIRE_DISABLE_CPU_LORA_FIX=1: CPU LoRA ops NOT replaced (mixed batches "
                    "are wrong, adapters slow)")
        return
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(
            f"serving_service.cpu_lora replaces vLLM {VLLM_VERSION}'s torch LoRA ops, but vLLM "
            f"{vllm.__version__} is installed: check vllm/lora/ops/torch_ops/lora_ops.py "
            f"(bgmv_shrink/bgmv_expand/bgmv_expand_slice signatures and semantics, the -1 'no "
            f"adapter' sentinel), then update VLLM_VERSION")

    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    current = {name: getattr(lora_ops, name) for name in PATCHED}
    upstream = {name: getattr(op, _MARK, op) for name, op in current.items()}
    mode = os.environ.get("TUNEWIRE_CPU_LORA_OPS", "fused")
    ops = build_ops(upstream, mode)
    for name in PATCHED:
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, ops[name])
    _set_methods(mode, os.environ.get("TUNEWIRE_CPU_LORA_COMPILE") == "1")
