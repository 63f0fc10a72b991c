"""Serving's OpenAI-compatible HTTP API, the cases that need a service of their own, with the
official `openai` client: a service with `--auth-token-file` (401 without or with a wrong key,
the right key works, /health needs none; /health is 503 while the engine starts, then 200), and
one with room for a single request (429 with Retry-After past the queue, served again once the
stream that held the slot is dropped). The shared-service cases: tests/test_openai_api.py.

    flock /tmp/tunewire-slow.lock .venv/bin/python -m pytest tests/test_openai_api_guards.py -q -p no:cacheprovider
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from harness import free_port, scrape_metrics, start_service, wait_http_serving
from test_openai_api import MESSAGES, client_for, error_of
from test_serving import LONG_TOKENS

# 600 s: each module fixture starts a service (~30-90 s on 2 shared cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "openai-api-test-token"


def start(tmp, model, *flags):
    (tmp / "adapters").mkdir()
    return start_service("serving", tmp, "--model", str(model), "--adapter-store", str(tmp / "adapters"),
                         "--max-model-len", "512", "--enforce-eager", "--drain-seconds", "0.5",
                         "--http-port", str(free_port()), *flags)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_model_dir):
    """A service with a bearer token, and what it answered while it started: each /health
    status, and a chat request sent at the first 503 with the /health status that followed it."""
    tmp = tmp_path_factory.mktemp("openai-token")
    (tmp / "token").write_text(TOKEN + "\n")
    svc = start(tmp, tiny_model_dir, "--auth-token-file", str(tmp / "token"))
    early = []

    def at_first_503(status):
        if status == 503 and not early:
            r = httpx.post(f"http://127.0.0.1:{svc.http_port}/v1/chat/completions", timeout=30,
                           headers={"authorization": f"Bearer {TOKEN}"},
                           json={"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 2})
            early.append((r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None,
                          httpx.get(f"http://127.0.0.1:{svc.http_port}/health", timeout=5).status_code))

    try:
        seen = wait_http_serving(svc, 300, at_first_503)
        yield svc, seen, early
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, tiny_model_dir):
    """A service that runs one request at a time and queues none."""
    svc = start(tmp_path_factory.mktemp("openai-429"), tiny_model_dir,
                "--max-concurrent-requests", "1", "--max-queued-requests", "0")
    try:
        wait_http_serving(svc, 300)
        yield svc
    finally:
        svc.stop()


def test_health_is_503_until_the_engine_is_ready(secured, tiny_model_dir):
    svc, seen, early = secured
    assert seen[0] == 503 and seen[-1] == 200 and set(seen) == {503, 200}, seen
    assert seen == sorted(seen, reverse=True), seen  # never back to 503 once 200
    r = httpx.get(f"http://127.0.0.1:{svc.http_port}/health", timeout=5)  # no token needed
    assert (r.status_code, r.json()) == (200, {"status": "SERVING"})
    # a request while the engine starts: 503 ENGINE_NOT_READY (unless the engine was ready by then)
    status, code, health_after = early[0]
    if health_after == 503:
        assert (status, code) == (503, "ENGINE_NOT_READY"), early


def test_bearer_token(secured, tiny_model_dir):
    svc, _, _ = secured
    url = f"http://127.0.0.1:{svc.http_port}/v1"
    r = httpx.post(f"{url}/chat/completions", timeout=30,
                   json={"model": tiny_model_dir.name, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "TOKEN_MISSING", r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/models", timeout=30).status_code == 401
    with client_for(svc, api_key="wrong-token") as wrong:
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 401 and error_of(e.value)["code"] == "TOKEN_INVALID"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    with client_for(svc, api_key=TOKEN) as right:
        assert right.models.list().data[0].id == tiny_model_dir.name
        r = right.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, max_tokens=2)
        assert r.usage.completion_tokens > 0


def test_past_the_queue_is_429_with_retry_after(narrow, tiny_model_dir):
    with client_for(narrow) as client:
        long = client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES,
                                              max_tokens=LONG_TOKENS, stream=True,
                                              extra_body={"min_tokens": LONG_TOKENS})
        assert next(iter(long)).choices  # running: the one slot is taken
        for stream in (False, True):  # a stream is refused before its 200
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES, max_tokens=2,
                                               stream=stream)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
            assert error_of(e.value)["code"] == "QUEUE_FULL" and error_of(e.value)["type"] == "rate_limit_error"
        long.close()  # dropped: its engine request is aborted and the slot is free again
        deadline = time.monotonic() + 10
        key = "tunewire_serving_engine_unfinished_requests"
        while scrape_metrics(narrow.metrics_port)[key] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scrape_metrics(narrow.metrics_port)[key] == 0
        assert client.chat.completions.create(model=tiny_model_dir.name, messages=MESSAGES,
                                              max_tokens=2).usage.completion_tokens > 0
