"""Which GPUs the trainer's jobs may use, and how many each job gets: the trainer process's view.

    gpus = gpu_settings(cfg)          # from TrainerConfig: device, gpus, gpus_per_job, launcher
    gpus.accounting                   # True: the scheduler hands out GPU ids (local launcher)
    gpus.job_gpus(num_processes)      # GPUs one job takes: max(num_processes, gpus_per_job)
    gpus.unavailable()                # "" when jobs get a CUDA GPU, else why not (for refusals)

`visible_gpus` is the ONE place that finds the GPUs (tests fake it, and nothing else): the
trainer process imports no torch, so it reads `CUDA_VISIBLE_DEVICES` when set, else asks
`nvidia-smi -L`, else counts /proc/driver/nvidia/gpus. The ids it returns are what a worker's
`CUDA_VISIBLE_DEVICES` is set to. With the Kubernetes launcher the cluster places GPUs (each pod
requests them), so the scheduler does no accounting and `pod_gpus` says what a pod gets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tunewire.devices import DEVICES

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def visible_gpus(device: str = "auto") -> list[str]:
    """The GPU ids this process may hand to workers ("0", "1", ... or UUIDs); [] with the
    device setting "cpu" or when there is no NVIDIA GPU."""
    if device == "cpu":
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        out = []
        for g in (x.strip() for x in env.split(",")):
            if not g or g.startswith("-"):  # CUDA ignores everything from an invalid entry on
                break
            out.append(g)
        return out
    if smi := shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        ids = re.findall(r"^GPU (\d+):", listed, flags=re.M)
        if ids:
            return ids
    try:
        return [str(i) for i in range(len(list(NVIDIA_PROC.iterdir())))]
    except OSError:
        return []


@dataclass(frozen=True)
class GpuSettings:
    device: str = "auto"              # the trainer's `device` setting (tunewire.devices.DEVICES)
    pool: tuple[str, ...] = ()        # local launcher: GPU ids the scheduler hands out (() = none)
    per_job: int = 1                  # `gpus_per_job`: GPUs a job gets at least
    pod_gpus: int | None = None       # Kubernetes launcher: GPUs per pod setting; None = local

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}")
        if self.per_job < 1:
            raise ValueError("gpus_per_job must be >= 1")
        if len(set(self.pool)) != len(self.pool):
            raise ValueError(f"GPU ids repeat: {self.pool}")

    @property
    def accounting(self) -> bool:
        """The scheduler hands out GPU ids: local jobs on GPUs."""
        return self.pod_gpus is None and self.device != "cpu" and bool(self.pool)

    def job_gpus(self, num_processes: int) -> int:
        """GPUs one job (or one pod, on Kubernetes) takes: one rank per GPU, at least per_job."""
        return max(num_processes, self.per_job)

    def unavailable(self) -> str:
        """"" when the jobs train on a CUDA GPU; else why they cannot, and how to change it."""
        if self.device == "cpu":
            return 'the trainer\'s device setting is "cpu" (set device = "auto" or "cuda" on a GPU machine)'
        if self.pod_gpus is not None:
            return "" if self.pod_gpus else ("the Kubernetes launcher gives job pods no GPU "
                                             "(set k8s_gpus_per_pod >= 1, on a cluster with GPU nodes)")
        return "" if self.pool else ("the trainer sees no CUDA GPU (no nvidia-smi / CUDA_VISIBLE_DEVICES "
                                     "GPUs): run it on a GPU node")


def parse_ids(text: str) -> list[str]:
    """The `gpus` setting: "" (all visible) or "0,1,3"."""
    return [g.strip() for g in text.split(",") if g.strip()]


def gpu_settings(cfg) -> GpuSettings:
    """GpuSettings from a TrainerConfig; the configured `gpus` must be visible ones."""
    if cfg.launcher == "kubernetes":
        return GpuSettings(cfg.device, (), cfg.gpus_per_job, cfg.k8s_gpus_per_pod)
    visible = visible_gpus(cfg.device)
    chosen = parse_ids(cfg.gpus)
    if chosen and cfg.device != "cpu":
        missing = [g for g in chosen if g not in visible]
        if missing:
            raise ValueError(f"gpus = {cfg.gpus!r}: {','.join(missing)} not visible "
                             f"(visible: {','.join(visible) or 'none'})")
        visible = chosen
    return GpuSettings(cfg.device, tuple(visible), cfg.gpus_per_job)
