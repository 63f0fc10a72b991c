"""torch.compile with LoRA on vLLM's CPU backend (TUNEWIRE_CPU_LORA_COMPILE=1; the serving
service sets it from its `cpu_lora_compile` setting, on by default unless enforce_eager).

Why: vLLM 0.32 sets the compilation mode to NONE on CPU whenever LoRA is enabled
(`vllm/platforms/cpu.py`, `check_and_update_config`), because its CPU LoRA path branches in
Python on per-step state (`is_prefill`, `indices_len`), which a graph traced once would bake
in. Compiling is worth 1.06-1.29x on this CPU (bench/lora_cpu.py: base_nolora vs
base_nolora_eager, docs/cpu-lora.md), more than all the LoRA arithmetic. Here the fused methods
of `serving_service.cpu_lora` become three torch custom ops (their arithmetic:
serving_service/cpu_lora_kernels.py) that dynamo and inductor treat as opaque calls: the traced
graph holds no per-step Python state, and the ops read the step's row grouping when they run. The platform hook then keeps the compile settings vLLM picks for the
same configuration without LoRA.

tunewire::lora_linear, called 4x per decoder layer every step, runs a C++ kernel
(cpu_lora_ops.cpp, built with torch.utils.cpp_extension at setup or on first use): a Python
kernel costs ~10 us more per call just to be entered. Where it cannot be built (no compiler) the
Python twin runs, with a warning; TUNEWIRE_CPU_LORA_KERNEL=python picks the twin on purpose.

Installed by `cpu_lora.register()` with TUNEWIRE_CPU_LORA_COMPILE=1, in every vLLM process;
`forget()` drops the Python and C++ kernels' plans (the fused activate_adapter calls it).
Replaces, on top of the fused methods:
    PunicaWrapperCPU.add_lora_linear / add_shrink / add_expand / add_lora_embedding -> ops
    PunicaWrapperCPU.update_metadata (also records the step for the ops)
    CpuPlatform.check_and_update_config (called with lora_config hidden)
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

from serving_service import cpu_lora_kernels as kernels

log = logging.getLogger(__name__)
_STEP = {"n": 0, "valid": 0}  # bumped by update_metadata; valid = this step's token count
_GROUPS: dict[tuple[int, int], list] = {}  # (step, rows) -> [(slot, rows)]


def _groups_now(indices: torch.Tensor, n: int) -> list:
    """The row grouping of this step's first n tokens (rows past the step's own tokens, if the
    runner ever pads, get no adapter)."""
    key = (_STEP["n"], n)
    groups = _GROUPS.get(key)
    if groups is None:
        idx = indices[:n]
        if n > _STEP["valid"]:
            idx = idx.clone()
            idx[_STEP["valid"]:] = -1
        _GROUPS.clear()
        groups = _GROUPS[key] = kernels.row_groups(idx)
    return groups


# Registered with Library.define/impl rather than torch.library.custom_op: the latter's Python
# dispatch costs ~50 us a call here (measured), x4 projections x 30 layers every step - more than
# the LoRA arithmetic. vLLM registers its own ops the same way (direct_register_custom_op).
_LIB = torch.library.Library("tunewire", "FRAGMENT")


def _op(name: str, mutates: tuple[str, ...], kernel: bool = True):
    def register(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates))
        if kernel:
            _LIB.impl(name, fn, "CPU")
        torch.library.register_fake(f"tunewire::{name}", lambda *a, **k: None, lib=_LIB)  # in place on y
        return fn
    return register


@_op("lora_linear", mutates=("y",), kernel=False)  # kernel: load_kernels()
def lora_linear_op(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor],
                   scale: float, slices: list[int], indices: torch.Tensor) -> None:
    x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    kernels.lora_linear(y2, x2, a, b, scale, slices, _groups_now(indices, x2.shape[0]))


_SOURCE = Path(__file__).with_name("cpu_lora_ops.cpp")
_STALE_LOCK_S = 600  # a build takes well under a minute here
KERNEL = {"lora_linear": ""}  # which kernel tunewire::lora_linear runs: "c++" or "python"


def build_kernels() -> None:
    """Compile (or find already built, rebuilt when the source changes) and load cpu_lora_ops.cpp
    under $TORCH_EXTENSIONS_DIR, else torch's default (~/.cache/torch_extensions): 20-40 s the
    first time on this machine; `./dev setup` runs it ahead."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build = Path(root) / f"tunewire_cpu_lora-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    # torch waits forever on the lock file of a build that was killed (a pod stopped mid-start
    # keeps its emptyDir cache): a lock older than any real build is taken to be such a one.
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        log.warning("removing a stale C++ build lock %s", lock)
        lock.unlink(missing_ok=True)
    # -O3: vectorizes the row loops (mixed batches); no fast-math, so results stay bit-exact
    cpp_extension.load(name="tunewire_cpu_lora", sources=[str(_SOURCE)], extra_cflags=["-O3"],
                       build_directory=str(build), is_python_module=False, verbose=False)


def load_kernels() -> str:
    """Give tunewire::lora_linear its CPU kernel, once per process: the C++ one, or the Python
    twin (same arithmetic, ~10 us a call slower) when no compiler or extension is available -
    say so in the log, serving goes on."""
    if KERNEL["lora_linear"]:
        return KERNEL["lora_linear"]
    try:
        if os.environ.get("TUNEWIRE_CPU_LORA_KERNEL") == "python":  # benchmarks: the twin
            raise RuntimeError("TUNEWIRE_CPU_LORA_KERNEL=python")
        build_kernels()
        KERNEL["lora_linear"] = "c++"
        log.info("tunewire CPU LoRA: compiled mode, C++ kernel (%s)", _SOURCE.name)
    except Exception as exc:  # a missing compiler or headers must not stop serving
        log.warning("tunewire CPU LoRA: C++ kernel unavailable (%s: %s); using the Python kernel",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        _LIB.impl("lora_linear", lora_linear_op, "CPU")
        KERNEL["lora_linear"] = "python"
    return KERNEL["lora_linear"]


def forget() -> None:
    """Drop what every kernel learnt about slot weights (vLLM wrote a slot)."""
    kernels.forget()
    if KERNEL["lora_linear"] == "c++":
        torch.ops.tunewire_cpp.forget()


@_op("lora_shrink", mutates=("y",))
def lora_shrink_op(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], scale: float,
                   indices: torch.Tensor) -> None:
    x2 = x.view(-1, x.shape[-1])
    outs = [y[i].view(-1, y.shape[-1]) for i in range(len(a))]  # y: [slices, tokens, r]
    kernels.lora_shrink(outs, x2, a, scale, _groups_now(indices, x2.shape[0]))


@_op("lora_expand", mutates=("y",))
def lora_expand_op(y: torch.Tensor, x: torch.Tensor, b: list[torch.Tensor], slices: list[int],
                   offset: int, indices: torch.Tensor) -> None:
    y2 = y.view(-1, y.shape[-1])
    ins = [x[i] for i in range(len(b))] if x.dim() == 3 else [x]  # buffers, or one [tokens, r]
    kernels.lora_expand(y2, [h.reshape(-1, h.shape[-1]) for h in ins], b, slices, offset,
                         _groups_now(indices, y2.shape[0]))


def methods(upstream_update) -> dict:
    """PunicaWrapperCPU methods that call the ops (`upstream_update`: the upstream update_metadata)."""

    @functools.wraps(upstream_update)
    def update_metadata(self, *args, **kwargs):
        upstream_update(self, *args, **kwargs)
        _STEP["n"] += 1
        _STEP["valid"] = self.indices_len[0]
        if KERNEL["lora_linear"] == "c++":
            torch.ops.tunewire_cpp.set_step(_STEP["valid"])

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                        buffer=None, **kwargs):
        torch.ops.tunewire.lora_linear(y, x, list(lora_a_stacked), list(lora_b_stacked), scale,
                                       list(output_slices), self._token_lora_indices)

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        if not isinstance(y, torch.Tensor):
            y = torch.stack(list(y))  # never on the paths vLLM 0.32 takes on CPU
        torch.ops.tunewire.lora_shrink(y, x, list(lora_a_stacked), scale, self._token_lora_indices)

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True,
                   **kwargs):
        if not add_inputs:  # every vLLM 0.32 caller adds; a constant under tracing
            raise NotImplementedError("tunewire compiled CPU LoRA: add_expand(add_inputs=False)")
        x = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
        torch.ops.tunewire.lora_expand(y, x, list(lora_b_stacked), list(output_slices),
                                       offset_start, self._token_lora_indices)

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        torch.ops.tunewire.lora_expand(y, x, [lora_b_stacked], [lora_b_stacked.shape[-2]], 0,
                                       self._token_lora_indices)

    return {"update_metadata": update_metadata, "add_lora_linear": add_lora_linear,
            "add_shrink": add_shrink, "add_expand": add_expand,
            "add_lora_embedding": add_lora_embedding}


def keep_compile(upstream_check):
    """CpuPlatform.check_and_update_config as if LoRA were off, so the compile settings stay."""

    def check_and_update_config(cls, vllm_config) -> None:
        lora = vllm_config.lora_config
        vllm_config.lora_config = None
        try:
            upstream_check(vllm_config)
        finally:
            vllm_config.lora_config = lora

    return classmethod(check_and_update_config)
