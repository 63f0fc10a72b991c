"""The CPU LoRA arithmetic behind serving_service/cpu_lora.py (the vLLM plugin): plain torch.

Two sets of functions, both correct for rows without an adapter (slot index -1: they get exactly
nothing, where vLLM 0.32's torch ops read -1 as "the last slot"):

  * `grouped_ops(upstream)`: drop-in replacements for vLLM's bgmv_shrink / bgmv_expand /
    bgmv_expand_slice. Rows are grouped by adapter slot and each active slot does one plain
    matmul over its rows, instead of upstream's per-row gather of the weights and batched
    einsum. Shapes the grouped code does not handle go to the upstream op with the no-adapter
    rows' inputs zeroed (`masked`): the same result, computed the slow way.
  * `lora_linear`, `lora_shrink`, `lora_expand`: what the fused PunicaWrapperCPU methods do per
    layer, skipping the slices whose slot weights are all zero (vLLM wraps every supported
    projection and keeps zeros where an adapter does not target one). `lora_linear` packs the
    filled slices of one (layer, slot) into a plan of two matrices, so the whole layer's delta is
    two matmuls; cpu_lora_ops.cpp is its C++ twin for the compiled mode.

What is learnt about slot weights (which hold anything, the plans) is cached by tensor address
and must be dropped with `forget()` whenever vLLM writes a slot.

    groups = row_groups(token_lora_indices)           # [(slot, rows or None = every row)]
    lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, groups)

torch is imported inside the functions (vLLM loads the plugin in every process, early).
"""

from __future__ import annotations

import functools


def masked(op):
    """Upstream `op` with the inputs of rows whose lora index is negative zeroed (correct, slow)."""

    @functools.wraps(op)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        import torch

        has_lora = (lora_indices_tensor >= 0).unsqueeze(-1)
        inputs = torch.where(has_lora, inputs, torch.zeros((), dtype=inputs.dtype))
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    return wrapper


def row_groups(idx):
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
    groups = row_groups(idx)
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


def grouped_ops(upstream):
    """The three grouped ops; `upstream` maps name -> upstream op (used, masked, as fallback)."""
    slow = {name: masked(op) for name, op in upstream.items()}

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


def forget() -> None:
    """Drop what was learnt about slot weights (call whenever vLLM writes into a slot)."""
    _FILLED.clear()
    _PLANS.clear()


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
