"""Op-level checks of the CPU LoRA plugin (serving_service/cpu_lora*.py; no engine): the grouped
ops equal the upstream vLLM torch ops applied with the no-adapter (-1) rows' inputs zeroed, the
fused methods equal add_lora_linear written out row by row, register() installs and restores.
(The compiled mode and its C++ kernel: tests/test_serving_cpu_lora_compiled.py, slow.)

Every test starts and ends with vLLM's own functions in place and empty kernel caches (the
`upstream_vllm` fixture).
"""

from __future__ import annotations

import itertools
import sys

import pytest

torch = pytest.importorskip("torch")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from serving_service import cpu_lora  # noqa: E402
from serving_service import cpu_lora_kernels as kernels  # noqa: E402

pytestmark = pytest.mark.timeout(120)

UPSTREAM = {name: getattr(getattr(lora_ops, name), cpu_lora._MARK, getattr(lora_ops, name))
            for name in cpu_lora.PATCHED}
FAST = kernels.grouped_ops(UPSTREAM)
SWITCHES = ("TUNEWIRE_DISABLE_CPU_LORA_FIX", "TUNEWIRE_CPU_LORA_COMPILE", "TUNEWIRE_CPU_LORA_KERNEL")


@pytest.fixture(autouse=True)
def upstream_vllm(monkeypatch):
    """vLLM's own ops and methods, no plugin switch set and nothing cached, before and after."""
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    _upstream_and_forgotten()
    yield
    _upstream_and_forgotten()


def _upstream_and_forgotten():
    cpu_lora.unregister()  # also empties the Python kernels' caches
    compiled = sys.modules.get("serving_service.cpu_lora_compile")
    if compiled is not None:
        compiled.forget()  # and the C++ kernel's, once loaded


def installed() -> dict[str, bool]:
    """Which of the functions register() may replace carry our mark, by name."""
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.platforms.cpu import CpuPlatform

    out = {f"{m.__name__}.{n}": hasattr(getattr(m, n), cpu_lora._MARK)
           for m in (lora_ops, torch_ops, punica_cpu) for n in cpu_lora.PATCHED}
    for cls, names in ((punica_cpu.PunicaWrapperCPU, ("add_lora_linear", "add_shrink", "add_expand",
                                                      "update_metadata", "add_lora_embedding")),
                       (LoRAModelManager, ("activate_adapter",)),
                       (CpuPlatform, ("check_and_update_config",))):
        for n in names:
            attr = cls.__dict__.get(n)
            attr = attr.__func__ if isinstance(attr, classmethod) else attr
            out[f"{cls.__name__}.{n}"] = hasattr(attr, cpu_lora._MARK)
    return out


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


def test_register_installs_the_fused_path_everywhere_and_unregister_restores_it():
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    assert not any(installed().values())
    upstream_activate = LoRAModelManager.__dict__["activate_adapter"]
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
    assert getattr(LoRAModelManager.activate_adapter, cpu_lora._MARK) is upstream_activate
    # the compiled mode's extras stay upstream's without TUNEWIRE_CPU_LORA_COMPILE
    done = installed()
    assert not done["PunicaWrapperCPU.add_lora_embedding"] and not done["CpuPlatform.check_and_update_config"]
    cpu_lora.unregister()
    assert not any(installed().values())
    assert "update_metadata" not in punica_cpu.PunicaWrapperCPU.__dict__
    assert LoRAModelManager.__dict__["activate_adapter"] is upstream_activate
    for name in cpu_lora.PATCHED:
        assert getattr(lora_ops, name) is UPSTREAM[name] and getattr(punica_cpu, name) is UPSTREAM[name]


def _definition(y, x, a, b, scale, slices, idx):
    """add_lora_linear written out row by row: y[i, slice] += scale * x[i] @ A[slot].T @ B[slot].T."""
    y, offset = y.clone(), 0
    for a_i, b_i, n in zip(a, b, slices):
        for row, slot in enumerate(idx.tolist()):
            if slot >= 0:
                y[row, offset:offset + n] += scale * x[row] @ a_i[slot, 0].T @ b_i[slot, 0].T
        offset += n
    return y


def _wrapper(prefill):
    """vLLM's CPU punica wrapper, fused methods installed, after a step's real update_metadata:
    adapters 11, 13, 14 in slots 0, 2, 3; id 0 = base rows, which get nothing."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

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
def test_fused_add_lora_linear_matches_the_definition_and_skips_untargeted_slices(prefill):
    w = _wrapper(prefill)
    slices = (12, 4, 4)  # q, k, v of a merged qkv projection
    a, b = _stacks(slices)
    x, y = torch.randn(10, 24), torch.randn(10, 20)
    want = _definition(y, x, a, b, 0.5, slices, w.token_lora_indices)
    base_rows = y[[1, 4, 9]].clone()
    w.add_lora_linear(y, x, a, b, 0.5, slices)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(y[[1, 4, 9]], base_rows)  # no adapter: untouched, bit for bit
    assert kernels._FILLED[(a[1].data_ptr(), 2)] is False  # skipped, not multiplied by zeros
    assert kernels._FILLED[(a[0].data_ptr(), 3)] is True


@pytest.mark.parametrize("prefill", [False, True])
def test_fused_shrink_then_expand_as_row_parallel_layers_call_them(prefill):
    """o_proj / down_proj call add_shrink into a zeroed float32 buffer, then add_expand."""
    w = _wrapper(prefill)
    slices = (16, 6)
    a, b = _stacks(slices)
    x, y = torch.randn(10, 24), torch.randn(10, 22)
    want = _definition(y, x, a, b, 1.0, slices, w.token_lora_indices)
    buffer = torch.full((2, 10, 8), 5.0)  # shrink assigns: nothing of this may survive
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
    fast = cpu_lora.fused_methods(up)
    kernels._FILLED[(1, 0)] = False
    kernels._PLANS[(1, 0, 1.0, None)] = None
    assert fast["activate_adapter"](object(), 3) is False  # vLLM calls it every step
    assert kernels._FILLED == {(1, 0): False}  # nothing written: the scan is kept
    assert kernels._PLANS == {(1, 0, 1.0, None): None}
    assert fast["activate_adapter"](object(), 7) is True and calls == [3, 7]
    assert kernels._FILLED == {} and kernels._PLANS == {}  # every slot is looked at again


@pytest.mark.parametrize("why", ["not_cpu", "disabled"])
def test_register_leaves_upstream_ops_alone(why, monkeypatch):
    """On a non-CPU platform (GPU: triton ops, never these) register() changes nothing; with the
    kill switch it leaves (or puts back) vLLM's own functions, also after an earlier register()."""
    from vllm.platforms import current_platform

    if why == "not_cpu":
        monkeypatch.setattr(type(current_platform), "is_cpu", lambda *a, **k: False)
    else:
        cpu_lora.register()
        assert all(v for k, v in installed().items() if "embedding" not in k and "Platform" not in k)
        monkeypatch.setenv("TUNEWIRE_DISABLE_CPU_LORA_FIX", "1")
    cpu_lora.register()
    assert not any(installed().values())
    for name in cpu_lora.PATCHED:
        assert getattr(lora_ops, name) is UPSTREAM[name]
