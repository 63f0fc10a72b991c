"""Which device and numeric precision a process computes on, and what it can tell about them.

One home for the choices every part makes the same way: the trainer's workers (model, batches,
evaluation), feature extraction, serving's Classify heads and serving's vLLM `dtype`.

    dev = resolve_device("auto")            # cuda:<LOCAL_RANK> when a GPU is visible, else cpu
    dtype = resolve_precision("auto", dev)  # bf16 on a GPU that has it, else fp32
    synchronize(dev); peak_memory_bytes(dev); peak_flops(dev, dtype)

torch is imported inside the functions: importing this module is cheap (servicers may name the
settings without loading torch). Nothing here raises for a CPU: on a CPU the GPU-only readings
(peak memory, peak FLOPs, total memory) are 0.
"""

from __future__ import annotations

import os

from tunewire import reasons as R
from tunewire.errors import TunewireError

DEVICES = ("auto", "cpu", "cuda")                 # the trainer's `device` setting
PRECISIONS = ("auto", "fp32", "bf16", "fp16")     # a job's `precision` (trainer_service/spec.py)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # precision -> torch/vLLM

# Dense tensor-core peak (bf16/fp16, fp32) in FLOP/s, by a substring of the device name, for MFU.
# From the vendors' data sheets (dense, no sparsity); TUNEWIRE_PEAK_TFLOPS overrides (e.g. a GPU
# not listed, or a power-capped one).
PEAK_FLOPS = (
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
)


def resolve_device(setting: str = "auto"):
    """The torch.device to compute on. "auto": the GPU of this rank (LOCAL_RANK under torchrun,
    else 0) when CUDA sees one, else the CPU; "cuda" without a GPU is refused (DEVICE_UNAVAILABLE).
    Selecting the GPU also makes it the current one (torch.cuda.set_device), which NCCL needs."""
    import torch

    if setting not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {setting!r}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TunewireError(R.DEVICE_UNAVAILABLE, "device = cuda, but this worker sees no CUDA GPU "
                            "(check CUDA_VISIBLE_DEVICES and the pod's nvidia.com/gpu)")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def resolve_precision(precision: str, device):
    """The torch dtype of a job's `precision` on `device`. auto: bf16 on a GPU that supports it,
    else fp32. bf16 runs on any CPU (autocast; slower than fp32 there); fp16 needs a GPU (loss
    scaling, no CPU kernels worth having); bf16 on a GPU without it is refused."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if precision == "fp16" and not cuda:
        raise TunewireError(R.DEVICE_UNAVAILABLE, "precision fp16 needs a CUDA GPU; on a CPU use "
                            "fp32 (or bf16)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TunewireError(R.DEVICE_UNAVAILABLE, f"{torch.cuda.get_device_name(device)} has no "
                            "bf16; use fp16 or fp32")
    return getattr(torch, DTYPE_NAMES[precision])


def precision_name(dtype) -> str:
    """"fp32" / "bf16" / "fp16" of a torch dtype (what manifests and events record)."""
    names = {v: k for k, v in DTYPE_NAMES.items()}
    return names[str(dtype).removeprefix("torch.")]


def synchronize(device) -> None:
    """Waits for the device's queued work, so a wall-clock time covers it (a no-op on a CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def peak_memory_bytes(device) -> int:
    """Peak memory allocated by tensors on the GPU since the last reset_peak (0 on a CPU)."""
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def reset_peak(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def total_memory_bytes(device) -> int:
    """The GPU's memory (0 on a CPU: no GPU budget to check against)."""
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.get_device_properties(device).total_memory)


def peak_flops(device, dtype) -> float:
    """The device's dense peak FLOP/s at `dtype` (0 when unknown or on a CPU: MFU is then 0)."""
    if device.type != "cuda":
        return 0.0
    if os.environ.get("TUNEWIRE_PEAK_TFLOPS"):
        return float(os.environ["TUNEWIRE_PEAK_TFLOPS"]) * 1e12
    import torch

    name = torch.cuda.get_device_name(device)
    for key, half, single in PEAK_FLOPS:
        if key in name:
            return single if dtype == torch.float32 else half
    return 0.0
