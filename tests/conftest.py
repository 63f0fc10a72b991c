"""Shared test set-up: a tiny random Llama built once per test session (no downloads), and the
time limits.

Every test has a timeout (pytest-timeout): `timeout` in pyproject.toml for the fast tier; a test
marked `slow` (real engines, real training, subprocess services) that sets no limit of its own
gets SLOW_TIMEOUT, since its module's services start inside its fixtures' time.

`pytest --reverse` runs the collected tests in reverse order (files and the tests in them), to
show that no test depends on another having run first.
"""

from __future__ import annotations

import os

import pytest

# vLLM on CPU refuses to start without a KV-cache size; 1 GiB is plenty for the tiny model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SLOW_TIMEOUT = 900  # seconds


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true", help="run the tests in reverse order")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tunewire.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
