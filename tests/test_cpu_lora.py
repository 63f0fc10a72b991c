"""Op-level checks of serving_service.cpu_lora (no engine): the grouped CPU LoRA ops equal the
upstream vLLM torch ops applied with the no-adapter (-1) rows' inputs zeroed."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from serving_service import cpu_lora  # noqa: E402

UPSTREAM = {name: getattr(getattr(lora_ops, name), cpu_lora._MARK, getattr(lora_ops, name))
            for name in cpu_lora.PATCHED}
FAST = cpu_lora.build_ops(UPSTREAM, "grouped")


def reference(name):
    """The upstream op with rows whose index is negative fed zeros (written out independently)."""
    def op(inputs, weights, out, idx, *args):
        inputs = inputs * (idx >= 0).unsqueeze(-1).to(inputs.dtype)
        return UPSTREAM[name](inputs, weights, out, idx, *args)
    return op


INDEX_SETS = {
    "mixed": [0, -1, 2, 1, -1, 0, 2, 2, -1, 1, 3],
    "one_adapter": [2] * 11,
    "no_adapter": [-1] * 11,
    "one_and_base": [-1, 1, 1, -1, 1, 1, 1, -1, 1, 1, 1],
    "single_row": [3],
}


def _weights(num_loras, out, inp, ranks, four_d, rank_dim):
    """A stack as vLLM keeps it: every slot padded to max rank with zeros beyond its own rank."""
    w = torch.randn(num_loras, out, inp)
    for slot, r in enumerate(ranks):
        if rank_dim == "out":
            w[slot, r:] = 0
        else:
            w[slot, :, r:] = 0
    return w.unsqueeze(1) if four_d else w


@pytest.mark.parametrize("case,four_d", list(itertools.product(INDEX_SETS, [True, False])))
def test_grouped_ops_match_masked_upstream(case, four_d):
    torch.manual_seed(list(INDEX_SETS).index(case))
    idx = torch.tensor(INDEX_SETS[case])
    n, hidden, max_rank, ranks = len(idx), 24, 16, [8, 16, 4, 16]

    # shrink: [n, hidden] x A[slot] ([max_rank, hidden]) -> buffer[:, :max_rank], assigned
    x = torch.randn(n, hidden)
    a = _weights(4, max_rank, hidden, ranks, four_d, "out")
    for width in (max_rank, max_rank + 3):  # buffer may be wider than the rank
        want, got = torch.full((n, width), 7.0), torch.full((n, width), 7.0)
        reference("bgmv_shrink")(x, a, want, idx, 0.5)
        FAST["bgmv_shrink"](x, a, got, idx, 0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # expand / expand_slice: buffer [n, max_rank] x B[slot] ([out, max_rank]) -> y
    buf = torch.randn(n, max_rank)
    b = _weights(4, 10, max_rank, ranks, four_d, "in")
    for add in (True, False):
        for y_width in (10, 8, 13):  # same width, model narrower (adapter padded), wider
            y0 = torch.randn(n, y_width)
            want, got = y0.clone(), y0.clone()
            reference("bgmv_expand")(buf, b, want, idx, add)
            FAST["bgmv_expand"](buf, b, got, idx, add)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for offset in (0, 5, 20):
            y0 = torch.randn(n, 30)
            want, got = y0.clone(), y0.clone()
            reference("bgmv_expand_slice")(buf, b, want, idx, offset, 10, add)
            FAST["bgmv_expand_slice"](buf, b, got, idx, offset, 10, add)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if case == "no_adapter" and add:
                assert torch.equal(got, y0)


def test_prefill_indices_and_dtype_casts():
    """Prefill-style indices (sgmv_* repeat each sequence's index per token, then call bgmv_*),
    bf16 inputs and weights with a float32 buffer and a bf16 output."""
    torch.manual_seed(3)
    seq_idx, seq_len = torch.tensor([1, -1, 0]), torch.tensor([3, 2, 4])
    tok_idx = torch.repeat_interleave(seq_idx, seq_len)
    x = torch.randn(9, 24, dtype=torch.bfloat16)
    a = torch.randn(2, 1, 8, 24, dtype=torch.bfloat16)
    want, got = torch.zeros(9, 8), torch.zeros(9, 8)  # float32 buffer, as vLLM allocates it
    reference("bgmv_shrink")(x, a, want, tok_idx, 0.25)
    FAST["bgmv_shrink"](x, a, got, tok_idx, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    b = torch.randn(2, 1, 12, 8, dtype=torch.bfloat16)
    y0 = torch.randn(9, 12, dtype=torch.bfloat16)
    want, got = y0.clone(), y0.clone()
    reference("bgmv_expand_slice")(torch.ones(9, 8), b, want, tok_idx, 0, 12, True)
    FAST["bgmv_expand_slice"](torch.ones(9, 8), b, got, tok_idx, 0, 12, True)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bf16 output
    assert torch.equal(got[3:5], y0[3:5])  # the base sequence's rows are untouched


def test_register_installs_grouped_ops_everywhere(monkeypatch):
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    monkeypatch.delenv("TUNEWIRE_DISABLE_CPU_LORA_FIX", raising=False)
    monkeypatch.setenv("TUNEWIRE_CPU_LORA_OPS", "grouped")
    cpu_lora.register()
    assert "update_metadata" not in punica_cpu.PunicaWrapperCPU.__dict__  # grouped: ops only
    assert not hasattr(punica_cpu.PunicaWrapperCPU.add_lora_linear, cpu_lora._MARK)
    monkeypatch.delenv("TUNEWIRE_CPU_LORA_OPS")  # the default: fused
    cpu_lora.register()
    cpu_lora.register()  # idempotent: still wraps the upstream op, not our own
    for name in cpu_lora.PATCHED:
        fn = getattr(lora_ops, name)
        assert getattr(torch_ops, name) is fn and getattr(punica_cpu, name) is fn
        assert getattr(fn, cpu_lora._MARK) is UPSTREAM[name]
        assert fn.__wrapped__ is UPSTREAM[name]
    update = punica_cpu.PunicaWrapperCPU.update_metadata
    assert getattr(update, cpu_lora._MARK) is None  # inherited upstream: restored by deleting ours
    assert update.__wrapped__ is PunicaWrapperBase.update_metadata
    for name in ("add_lora_linear", "add_shrink", "add_expand"):
        assert hasattr(getattr(punica_cpu.PunicaWrapperCPU, name), cpu_lora._MARK)
    assert hasattr(LoRAModelManager.activate_adapter, cpu_lora._MARK)


def _definition(y, x, a, b, scale, slices, idx):
    """add_lora_linear written out row by row: y[i, slice] += scale * x[i] @ A[slot].T @ B[slot].T."""
    y, offset = y.clone(), 0
    for a_i, b_i, n in zip(a, b, slices):
        for row, slot in enumerate(idx.tolist()):
            if slot >= 0:
                y[row, offset:offset + n] += scale * x[row] @ a_i[slot, 0].T @ b_i[slot, 0].T
        offset += n
    return y


def _wrapper(monkeypatch, prefill):
    """vLLM's CPU punica wrapper, fused methods installed, after a step's real update_metadata:
    adapters 11, 13, 14 in slots 0, 2, 3; id 0 = base rows, which get nothing."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    monkeypatch.delenv("TUNEWIRE_DISABLE_CPU_LORA_FIX", raising=False)
    monkeypatch.delenv("TUNEWIRE_CPU_LORA_OPS", raising=False)
    cpu_lora.register()
    torch.manual_seed(1)
    w = PunicaWrapperCPU(max_num_batched_tokens=32, max_batches=16, device="cpu")
    ids = (11, 0, 13, 13, 0, 14, 11, 14, 13, 0)
    w.update_metadata(LoRAMapping(ids, ids, is_prefill=prefill), [11, None, 13, 14], 4, 1000)
    assert w.token_lora_indices.tolist() == [0, -1, 2, 2, -1, 3, 0, 3, 2, -1]
    return w


def _stacks(slices, hidden=24, rank=8):
    """A/B stacks for 4 slots; slot 2 does not target slice 1, slot 3 only targets slice 0:
    their weights are zeros, as vLLM's reset_lora leaves them."""
    a = tuple(torch.randn(4, 1, rank, hidden) for _ in slices)
    b = tuple(torch.randn(4, 1, n, rank) for n in slices)
    for i, slot in ((1, 2), (1, 3), (2, 3)):
        if i < len(slices):
            a[i][slot].zero_()
            b[i][slot].zero_()
    return a, b


@pytest.mark.parametrize("prefill", [False, True])
def test_fused_add_lora_linear_matches_the_definition_and_skips_untargeted_slices(monkeypatch, prefill):
    w = _wrapper(monkeypatch, prefill)
    slices = (12, 4, 4)  # q, k, v of a merged qkv projection
    a, b = _stacks(slices)
    x, y = torch.randn(10, 24), torch.randn(10, 20)
    want = _definition(y, x, a, b, 0.5, slices, w.token_lora_indices)
    base_rows = y[[1, 4, 9]].clone()
    cpu_lora.forget()
    w.add_lora_linear(y, x, a, b, 0.5, slices)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(y[[1, 4, 9]], base_rows)  # no adapter: untouched, bit for bit
    assert cpu_lora._FILLED[(a[1].data_ptr(), 2)] is False  # skipped, not multiplied by zeros
    assert cpu_lora._FILLED[(a[0].data_ptr(), 3)] is True


@pytest.mark.parametrize("prefill", [False, True])
def test_fused_shrink_then_expand_as_row_parallel_layers_call_them(monkeypatch, prefill):
    """o_proj / down_proj call add_shrink into a zeroed float32 buffer, then add_expand."""
    w = _wrapper(monkeypatch, prefill)
    slices = (16, 6)
    a, b = _stacks(slices)
    x, y = torch.randn(10, 24), torch.randn(10, 22)
    want = _definition(y, x, a, b, 1.0, slices, w.token_lora_indices)
    buffer = torch.full((2, 10, 8), 5.0)  # shrink assigns: nothing of this may survive
    cpu_lora.forget()
    w.add_shrink(buffer, x, a, 1.0)
    assert torch.equal(buffer[:, [1, 4, 9]], torch.zeros(2, 3, 8))  # base rows
    assert torch.equal(buffer[1, [2, 3, 5, 7]], torch.zeros(4, 8))  # slots without weights there
    w.add_expand(y, buffer, b, slices, offset_start=0, add_input=True)  # vLLM's spelling
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_activating_an_adapter_forgets_which_slots_hold_weights():
    calls, active = [], {3}

    def upstream_activate(self, lora_id):  # like vLLM's: False, writing nothing, if already in a slot
        calls.append(lora_id)
        if lora_id in active:
            return False
        active.add(lora_id)
        return True

    up = {"add_lora_linear": None, "add_shrink": None, "add_expand": None, "update_metadata": None,
          "activate_adapter": upstream_activate}
    fast = cpu_lora._fused_methods(up)
    cpu_lora.forget()
    cpu_lora._FILLED[(1, 0)] = False
    cpu_lora._PLANS[(1, 0, 1.0, None)] = None
    assert fast["activate_adapter"](object(), 3) is False  # vLLM calls it every step
    assert cpu_lora._FILLED == {(1, 0): False}  # nothing written: the scan is kept
    assert cpu_lora._PLANS == {(1, 0, 1.0, None): None}
    assert fast["activate_adapter"](object(), 7) is True and calls == [3, 7]
    assert cpu_lora._FILLED == {} and cpu_lora._PLANS == {}  # every slot is looked at again


_SUBPROCESS_CHECK = """
import os, sys
import vllm.lora.ops.torch_ops.lora_ops as ops
import vllm.lora.ops.torch_ops as torch_ops
import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
from vllm.platforms import current_platform
from serving_service import cpu_lora
before = {n: getattr(ops, n) for n in cpu_lora.PATCHED}
if sys.argv[1] == "not_cpu":
    type(current_platform).is_cpu = lambda *a, **k: False
cpu_lora.register()
for n, fn in before.items():
    for m in (ops, torch_ops, punica_cpu):
        assert getattr(m, n) is fn, (n, m)
    assert not hasattr(fn, cpu_lora._MARK)
from vllm.lora.model_manager import LoRAModelManager
assert "update_metadata" not in punica_cpu.PunicaWrapperCPU.__dict__
for name in ("add_lora_linear", "add_shrink", "add_expand"):
    assert not hasattr(getattr(punica_cpu.PunicaWrapperCPU, name), cpu_lora._MARK)
assert not hasattr(LoRAModelManager.activate_adapter, cpu_lora._MARK)
print("untouched")
"""


@pytest.mark.parametrize("why", ["not_cpu", "disabled"])
def test_register_leaves_upstream_ops_alone(why):
    """On a non-CPU platform (GPU: triton ops, never these) or with the kill switch, register()
    changes nothing. In a subprocess so this process's vLLM modules stay as they are."""
    import os

    env = dict(os.environ, TUNEWIRE_DISABLE_CPU_LORA_FIX="1" if why == "disabled" else "0")
    done = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK, why], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "untouched" in done.stdout, done.stderr[-3000:]


def test_compiled_mode_ops_trace_once_and_follow_every_step(monkeypatch):
    """With TUNEWIRE_CPU_LORA_COMPILE=1 the LoRA methods are custom ops: a function calling them
    compiles with fullgraph (no graph break), and the graph traced on one step stays right on a
    later step with other adapters and another token count (no per-step state baked in)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.delenv("TUNEWIRE_DISABLE_CPU_LORA_FIX", raising=False)
    monkeypatch.delenv("TUNEWIRE_CPU_LORA_OPS", raising=False)
    monkeypatch.setenv("TUNEWIRE_CPU_LORA_COMPILE", "1")
    try:
        cpu_lora.register()
        assert hasattr(CpuPlatform.__dict__["check_and_update_config"].__func__, cpu_lora._MARK)
        torch.manual_seed(3)
        w = PunicaWrapperCPU(max_num_batched_tokens=32, max_batches=16, device="cpu")
        qkv, down = (12, 4, 4), (10,)
        a, b = _stacks(qkv)
        a2, b2 = _stacks(down)
        cpu_lora.forget()  # plans are keyed by weight addresses, which earlier tests' freed

        def layer(x, y1, y2):  # a column-parallel (qkv) and a row-parallel (down) LoRA layer
            w.add_lora_linear(y1, x, a, b, 0.5, qkv)
            buf = torch.zeros((1, x.shape[0], 8), dtype=torch.float32)
            w.add_shrink(buf, x, a2, 1.0)
            w.add_expand(y2, buf, b2, down, offset_start=0, add_input=True)
            return y1, y2

        compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
        for ids in [(11, 0, 13, 13, 0, 14, 11, 14, 13, 0), (14, 14, 0, 11, 13, 13, 0)]:
            w.update_metadata(LoRAMapping(ids, ids, is_prefill=False), [11, None, 13, 14], 4, 1000)
            n = len(ids)
            x, y1, y2 = torch.randn(n, 24), torch.randn(n, 20), torch.randn(n, 10)
            want1 = _definition(y1, x, a, b, 0.5, qkv, w.token_lora_indices)
            want2 = _definition(y2, x, a2, b2, 1.0, down, w.token_lora_indices)
            got1, got2 = compiled(x, y1.clone(), y2.clone())
            torch.testing.assert_close(got1, want1, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got2, want2, rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.delenv("TUNEWIRE_CPU_LORA_COMPILE")
        cpu_lora.register()  # back to the plain fused mode for the other tests
    assert not hasattr(PunicaWrapperCPU.add_lora_embedding, cpu_lora._MARK)  # upstream's again
    assert not hasattr(CpuPlatform.check_and_update_config, cpu_lora._MARK)


def test_cpp_kernel_is_built_and_computes_the_definition():
    """tunewire::lora_linear's C++ kernel (serving_service/cpu_lora_ops.cpp) builds on this
    machine and computes what the row-by-row definition and its Python twin compute: three slots
    and base rows in one batch, slots whose weights are zeros in a slice, rows past the step's
    own tokens (padding) left alone; weights rewritten in a slot are used after forget(); and in
    bfloat16 (its row loops are typed), equal to the twin."""
    from serving_service import cpu_lora_compile

    assert cpu_lora_compile.load_kernels() == "c++"  # a compiler is there: no silent fallback
    torch.manual_seed(5)
    slices = (12, 4, 4)
    a, b = _stacks(slices)
    cpu_lora.forget()
    idx = torch.tensor([0, -1, 2, 2, -1, 3, 0, 3, 2, -1])
    for valid, rewrite in ((10, False), (7, False), (10, True)):
        if rewrite:  # as activate_adapter does: new weights in slot 0, then forget
            a[0][0].mul_(-2.0)
            cpu_lora.forget()
        torch.ops.tunewire_cpp.set_step(valid)  # what update_metadata does every step
        live = torch.where(torch.arange(10) < valid, idx, torch.tensor(-1))
        x, y = torch.randn(10, 24), torch.randn(10, 20)
        want = _definition(y, x, a, b, 0.5, slices, live)
        got, twin = y.clone(), y.clone()
        torch.ops.tunewire.lora_linear(got, x, list(a), list(b), 0.5, list(slices), idx)
        cpu_lora.lora_linear(twin, x, a, b, 0.5, slices, cpu_lora._groups(live))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(twin, want, rtol=1e-4, atol=1e-4)
        untouched = (live < 0).nonzero().squeeze(1)
        assert torch.equal(got[untouched], y[untouched])  # base and padding rows, bit for bit
    # bfloat16 (the row loops are typed): the C++ kernel and the Python twin (index_add_) agree
    a16, b16 = tuple(t.bfloat16() for t in a), tuple(t.bfloat16() for t in b)
    cpu_lora.forget()
    torch.ops.tunewire_cpp.set_step(10)
    x, y = torch.randn(10, 24).bfloat16(), torch.randn(10, 20).bfloat16()
    got, twin = y.clone(), y.clone()
    torch.ops.tunewire.lora_linear(got, x, list(a16), list(b16), 0.5, list(slices), idx)
    cpu_lora.lora_linear(twin, x, a16, b16, 0.5, slices, cpu_lora._groups(idx))
    torch.testing.assert_close(got, twin)
    assert torch.equal(got[[1, 4, 9]], y[[1, 4, 9]])
    assert not torch.equal(got, y)


def test_a_stale_build_lock_does_not_hang_the_kernel_load():
    """torch waits forever on the lock of a C++ build that was killed; build_kernels takes a
    lock older than any real build for such a one (a fresh lock is a live build: left alone)."""
    import os
    import time
    from pathlib import Path

    from torch.utils import cpp_extension

    from serving_service import cpu_lora_compile

    lock = (Path(cpp_extension.get_default_build_root())
            / f"tunewire_cpu_lora-{torch.__version__}" / "lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    old = time.time() - cpu_lora_compile._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_lora_compile.build_kernels()  # would never return with the lock left in place
    assert not lock.exists()
