"""The CPU LoRA plugin's compiled mode (serving_service/cpu_lora_compile.py): its custom ops under
torch.compile, and tunewire::lora_linear's C++ kernel (serving_service/cpu_lora_ops.cpp).

Slow: the C++ kernel builds with g++ the first time (20-40 s, then cached under the torch
extensions directory) and torch.compile traces for seconds. References as in test_cpu_lora.py:
add_lora_linear written out row by row; every test starts and ends with vLLM's own functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from serving_service import cpu_lora  # noqa: E402
from serving_service import cpu_lora_kernels as kernels  # noqa: E402
from test_cpu_lora import _definition, _stacks, installed, upstream_vllm  # noqa: E402,F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # includes building the C++ kernel when it is not cached yet
def test_compiled_mode_ops_trace_once_and_follow_every_step(monkeypatch):
    """With TUNEWIRE_CPU_LORA_COMPILE=1 the LoRA methods are custom ops: a function calling them
    compiles with fullgraph (no graph break), and the graph traced on one step stays right on a
    later step with other adapters and another token count (no per-step state baked in)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    monkeypatch.setenv("TUNEWIRE_CPU_LORA_COMPILE", "1")
    cpu_lora.register()
    done = installed()
    assert done["PunicaWrapperCPU.add_lora_embedding"] and done["CpuPlatform.check_and_update_config"]
    torch.manual_seed(3)
    w = PunicaWrapperCPU(max_num_batched_tokens=32, max_batches=16, device="cpu")
    qkv, down = (12, 4, 4), (10,)
    a, b = _stacks(qkv)
    a2, b2 = _stacks(down)

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
    cpu_lora.unregister()
    assert not any(installed().values())  # the compiled mode's extras are upstream's again


@pytest.mark.timeout(600)  # includes building the C++ kernel when it is not cached yet
def test_cpp_kernel_is_built_and_computes_the_definition():
    """tunewire::lora_linear's C++ kernel (serving_service/cpu_lora_ops.cpp) builds on this
    machine and computes what the row-by-row definition and its Python twin compute: three slots
    and base rows in one batch, slots whose weights are zeros in a slice, rows past the step's
    own tokens (padding) left alone; weights rewritten in a slot are used after forget(); and in
    bfloat16 (its row loops are typed), equal to the twin."""
    from serving_service import cpu_lora_compile

    assert cpu_lora_compile.load_kernels() == "c++"  # a compiler is there: no silent fallback
    cpu_lora_compile.forget()  # the C++ plans are keyed by weight addresses: none from before
    torch.manual_seed(5)
    slices = (12, 4, 4)
    a, b = _stacks(slices)
    idx = torch.tensor([0, -1, 2, 2, -1, 3, 0, 3, 2, -1])
    for valid, rewrite in ((10, False), (7, False), (10, True)):
        if rewrite:  # as activate_adapter does: new weights in slot 0, then forget
            a[0][0].mul_(-2.0)
            cpu_lora_compile.forget()
        torch.ops.tunewire_cpp.set_step(valid)  # what update_metadata does every step
        live = torch.where(torch.arange(10) < valid, idx, torch.tensor(-1))
        x, y = torch.randn(10, 24), torch.randn(10, 20)
        want = _definition(y, x, a, b, 0.5, slices, live)
        got, twin = y.clone(), y.clone()
        torch.ops.tunewire.lora_linear(got, x, list(a), list(b), 0.5, list(slices), idx)
        kernels.lora_linear(twin, x, a, b, 0.5, slices, kernels.row_groups(live))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(twin, want, rtol=1e-4, atol=1e-4)
        untouched = (live < 0).nonzero().squeeze(1)
        assert torch.equal(got[untouched], y[untouched])  # base and padding rows, bit for bit
    # bfloat16 (the row loops are typed): the C++ kernel and the Python twin (index_add_) agree
    a16, b16 = tuple(t.bfloat16() for t in a), tuple(t.bfloat16() for t in b)
    cpu_lora_compile.forget()
    torch.ops.tunewire_cpp.set_step(10)
    x, y = torch.randn(10, 24).bfloat16(), torch.randn(10, 20).bfloat16()
    got, twin = y.clone(), y.clone()
    torch.ops.tunewire.lora_linear(got, x, list(a16), list(b16), 0.5, list(slices), idx)
    kernels.lora_linear(twin, x, a16, b16, 0.5, slices, kernels.row_groups(idx))
    torch.testing.assert_close(got, twin)
    assert torch.equal(got[[1, 4, 9]], y[[1, 4, 9]])
    assert not torch.equal(got, y)
    cpu_lora_compile.forget()


_STALE_LOCK_CHECK = """
import os, sys, time
from pathlib import Path
import torch
from serving_service import cpu_lora_compile
lock = Path(sys.argv[1]) / "lock"
lock.parent.mkdir(parents=True, exist_ok=True)
lock.touch()
old = time.time() - cpu_lora_compile._STALE_LOCK_S - 60
os.utime(lock, (old, old))
cpu_lora_compile.build_kernels()  # would never return with the lock left in place
assert not lock.exists()
torch.ops.tunewire_cpp.forget()  # built and loaded
print("loaded")
"""


@pytest.mark.timeout(600)
def test_a_stale_build_lock_does_not_hang_the_kernel_load(tmp_path):
    """torch waits forever on the lock of a C++ build that was killed; build_kernels takes a
    lock older than any real build for such a one (a fresh lock is a live build: left alone).
    In a subprocess with its own TORCH_EXTENSIONS_DIR: the user's build cache is never written,
    and a second copy of the kernel never loads into this process (its ops would clash)."""
    from torch.utils import cpp_extension

    name = f"tunewire_cpu_lora-{torch.__version__}"
    build = tmp_path / name
    cached = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    if (cached / "build.ninja").is_file():  # reuse a finished build (ninja: up to date), read only
        shutil.copytree(cached, build, ignore=shutil.ignore_patterns("lock"))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _STALE_LOCK_CHECK, str(build)], env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]
    assert (build / "tunewire_cpu_lora.so").is_file()  # it built (or found) the kernel there
