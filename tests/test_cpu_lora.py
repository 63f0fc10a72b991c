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

    monkeypatch.delenv("TUNEWIRE_DISABLE_CPU_LORA_FIX", raising=False)
    monkeypatch.delenv("TUNEWIRE_CPU_LORA_OPS", raising=False)
    cpu_lora.register()
    cpu_lora.register()  # idempotent: still wraps the upstream op, not our own
    for name in cpu_lora.PATCHED:
        fn = getattr(lora_ops, name)
        assert getattr(torch_ops, name) is fn and getattr(punica_cpu, name) is fn
        assert getattr(fn, cpu_lora._MARK) is UPSTREAM[name]
        assert fn.__wrapped__ is UPSTREAM[name]


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
