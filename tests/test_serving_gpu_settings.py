"""Serving's GPU settings without a GPU: `dtype` auto resolution, the checks, the vLLM engine
arguments built from the settings, the serve flags, GetModelInfo's fields and the example config.

Where a GPU matters, only torch.cuda.is_available / is_bf16_supported are faked: the device is
the only thing that changes. vLLM itself is not imported (5 s); its engine-argument names are read
from its source, an independent reference for the keywords we pass. The real engine starting
with these arguments on the CPU is tests/test_serving.py.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import torch

from serving_service.config import ServingConfig
from serving_service.engine import EngineConfig, engine_args, engine_device, serving_dtype
from serving_service.server import model_info
from tunewire.cli import build_parser
from tunewire.cli.serve import overrides
from tunewire.config import load_config
from tunewire.serving.v1 import serving_pb2 as spb

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
GPU_SETTINGS = {"dtype": "auto", "gpu_memory_utilization": 0.9, "tensor_parallel_size": 1,
                "enable_prefix_caching": True, "max_num_batched_tokens": 0}


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as torch would report it; `bf16` says whether it has bfloat16."""
    def fake(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return fake


# -- dtype ------------------------------------------------------------------------------------
def test_auto_is_float32_on_this_cpu():
    assert not torch.cuda.is_available()  # this machine (and CI) has no GPU
    assert engine_device() == "cpu"
    assert serving_dtype("auto", "cpu") == "float32"


def test_auto_is_bfloat16_on_a_gpu_with_bf16_else_float32(fake_gpu):
    fake_gpu(bf16=True)
    assert serving_dtype("auto", "cuda") == "bfloat16"
    fake_gpu(bf16=False)  # e.g. a T4 or V100
    assert serving_dtype("auto", "cuda") == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_served_as_set(dtype):
    assert serving_dtype(dtype, "cpu") == dtype


# -- checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, value", [
    ("dtype", "fp32"), ("dtype", "bf16"), ("dtype", ""),
    ("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.01),
    ("gpu_memory_utilization", -0.5),
    ("tensor_parallel_size", 0),
    ("max_num_batched_tokens", -1), ("max_num_batched_tokens", 31),  # < max_num_seqs (32)
])
def test_bad_values_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        EngineConfig(model="/m", **{setting: value})
    with pytest.raises(ValueError, match=setting):  # the service's settings are the engine's
        ServingConfig(model="/m", **{setting: value})


def test_edge_values_are_accepted():
    c = EngineConfig(model="/m", gpu_memory_utilization=1.0, tensor_parallel_size=8,
                     max_num_batched_tokens=32, enable_prefix_caching=False, dtype="float16")
    assert (c.gpu_memory_utilization, c.tensor_parallel_size, c.max_num_batched_tokens) == (1.0, 8, 32)


def test_defaults():
    c = EngineConfig(model="/m")
    assert {k: getattr(c, k) for k in GPU_SETTINGS} == GPU_SETTINGS


# -- engine arguments -------------------------------------------------------------------------
def _vllm_engine_arg_names() -> set[str]:
    """The fields of vLLM's EngineArgs, read from its source (importing vLLM takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    source = (Path(spec.origin).parent / "engine" / "arg_utils.py").read_text()
    body = source[source.index("class EngineArgs"):source.index("class AsyncEngineArgs")]
    return set(re.findall(r"^    (\w+): ", body, re.M))


def test_cpu_engine_args_carry_the_settings_but_not_gpu_memory():
    c = EngineConfig(model="/m", tensor_parallel_size=2, enable_prefix_caching=False,
                     max_num_batched_tokens=4096, gpu_memory_utilization=0.5)
    args = engine_args(c, "cpu")
    assert args["dtype"] == "float32"  # what the CPU engine always served
    assert (args["tensor_parallel_size"], args["enable_prefix_caching"],
            args["max_num_batched_tokens"]) == (2, False, 4096)
    # the CPU backend would read it as a share of host memory: kv_cache_gib sizes the cache
    assert "gpu_memory_utilization" not in args
    assert set(args) <= _vllm_engine_arg_names()


def test_gpu_engine_args(fake_gpu):
    fake_gpu(bf16=True)
    args = engine_args(EngineConfig(model="/m", gpu_memory_utilization=0.75), "cuda")
    assert args["dtype"] == "bfloat16" and args["gpu_memory_utilization"] == 0.75
    assert args["tensor_parallel_size"] == 1 and args["enable_prefix_caching"] is True
    assert args["max_num_batched_tokens"] is None  # 0: vLLM picks its default for the device
    assert args["enable_lora"] is True and args["model"] == "/m"
    assert set(args) <= _vllm_engine_arg_names()
    args = engine_args(EngineConfig(model="/m", dtype="float32"), "cuda")
    assert args["dtype"] == "float32"


# -- flags, config, GetModelInfo --------------------------------------------------------------
def test_serve_flags_set_the_gpu_settings():
    args = build_parser().parse_args([
        "serve", "serving", "--model", "/m", "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.8", "--tensor-parallel-size", "2",
        "--no-enable-prefix-caching", "--max-num-batched-tokens", "8192"])
    cfg = load_config(ServingConfig, None, overrides(args))
    assert (cfg.dtype, cfg.gpu_memory_utilization, cfg.tensor_parallel_size,
            cfg.enable_prefix_caching, cfg.max_num_batched_tokens) == ("bfloat16", 0.8, 2, False, 8192)
    assert cfg.engine_config().dtype == "bfloat16"  # the engine gets them


def test_the_example_config_sets_every_gpu_setting_to_its_default():
    example = tomllib.loads((ROOT / "configs" / "serving.example.toml").read_text())
    assert {k: example[k] for k in GPU_SETTINGS} == GPU_SETTINGS
    cfg = load_config(ServingConfig, str(ROOT / "configs" / "serving.example.toml"))
    assert cfg.dtype == "auto"


def test_model_info_reports_the_device_settings():
    cfg = ServingConfig(model="/m", gpu_memory_utilization=0.85, tensor_parallel_size=2,
                        enable_prefix_caching=False, max_num_batched_tokens=2048)
    info = spb.GetModelInfoResponse(**model_info(cfg, "fp", [], "cuda", "bfloat16"))
    assert (info.device, info.dtype, info.gpu_memory_utilization, info.tensor_parallel_size,
            info.enable_prefix_caching, info.max_num_batched_tokens) == \
        ("cuda", "bfloat16", 0.85, 2, False, 2048)
    assert info.model == "/m" and info.base_model_fingerprint == "fp" and info.max_loras == 4
