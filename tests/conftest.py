"""Shared fixtures: a tiny random Llama built once per test session (no downloads)."""

from __future__ import annotations

import os

import pytest

# vLLM on CPU refuses to start without a KV-cache size; 1 GiB is plenty for the tiny model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tunewire.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
