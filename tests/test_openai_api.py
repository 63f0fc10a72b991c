"""Serving's OpenAI-compatible HTTP API, end to end, with the official `openai` client: one serving
subprocess (tiny random Llama, vLLM CPU, `harness.Serving` with `--http-port`) for the module,
with a published LoRA adapter. The gRPC API of the same process is the independent reference:
greedy answers over HTTP equal gRPC Generate's for the same request. Also streaming (deltas, the
finishing chunk, the usage chunk, `data: [DONE]`), /v1/completions, strict json_schema output
checked with `jsonschema`, /v1/models and 404s, refused fields, dropped connections aborting
the engine request, and the `frontend="http"` metrics.
(The token, /health during start-up and 429 need services of their own:
tests/test_openai_api_guards.py.)

    flock /tmp/tunewire-slow.lock .venv/bin/python -m pytest tests/test_openai_api.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from harness import Serving, free_port, series
from test_serving import LONG_TOKENS
from tunewire.serving.v1 import serving_pb2 as spb

# 600 s: the first test also pays for starting the service (~30-90 s on 2 shared cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ADAPTER = "oa-lora"
MESSAGES = [{"role": "system", "content": "You extract facts."},
            {"role": "user", "content": "alice is 21 years old"}]
FINISH = {spb.FINISH_REASON_STOP: "stop", spb.FINISH_REASON_LENGTH: "length"}
# every value a random model can pick is short: the grammar ends the object well before 64 tokens
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "enum": ["alice", "bob"]},
                                           "adult": {"type": "boolean"}},
          "required": ["name", "adult"], "additionalProperties": False}
# uniqueItems: a keyword constrained decoding cannot enforce (strict mode refuses it)
UNENFORCEABLE = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                           "uniqueItems": True}}, "required": ["tags"]}


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    yield from Serving.for_module(tmp_path_factory, tiny_model_dir, "openai-api", "--http-port", str(free_port()))


@pytest.fixture(scope="module")
def adapter(api) -> str:
    api.publish(ADAPTER, seed=17)
    return ADAPTER


def client_for(svc, api_key: str = "x") -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{svc.http_port}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(api) -> OpenAI:
    with client_for(api.svc) as c:
        yield c


def base_name(api) -> str:
    return api.model.name  # served_model_name's default: the model directory's name


def error_of(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


def grpc_chat(api, adapter: str, max_tokens: int) -> spb.GenerateResponse:
    return api.stub.Generate(spb.GenerateRequest(
        adapter=adapter, messages=[spb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES],
        sampling=spb.SamplingParams(max_tokens=max_tokens)), timeout=120)


def grpc_prompt(api, prompt: str, max_tokens: int) -> spb.GenerateResponse:
    return api.stub.Generate(spb.GenerateRequest(
        prompt=prompt, sampling=spb.SamplingParams(max_tokens=max_tokens)), timeout=120)


def wait_metric(api, key: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while api.metrics().get(key, 0) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.metrics().get(key, 0) == value, (key, api.metrics().get(key))


# --------------------------------------------------------------------------------------------
def test_chat_on_an_adapter_equals_grpc(api, client, adapter):
    ref = grpc_chat(api, adapter, 16)
    assert ref.adapter_version == "v1" and ref.completion_tokens > 0
    r = client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == f"{adapter}@v1" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == FINISH[ref.finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (ref.prompt_tokens, ref.completion_tokens, ref.prompt_tokens + ref.completion_tokens)
    ext = r.to_dict()["tunewire"]
    assert (ext["adapter"], ext["adapter_version"]) == (adapter, "v1") and ext["timings"]["total_ms"] > 0
    # the pinned name and max_completion_tokens: the same answer
    pinned = client.chat.completions.create(model=f"{adapter}@v1", messages=MESSAGES, max_completion_tokens=16,
                                            temperature=0)
    assert pinned.choices[0].message.content == ref.text and pinned.model == f"{adapter}@v1"
    # the adapter changes the answer: the base model's differs (the tiny adapter is random, not zero)
    base = client.chat.completions.create(model=base_name(api), messages=MESSAGES, max_tokens=16, temperature=0)
    assert base.model == base_name(api) and base.choices[0].message.content == grpc_chat(api, "", 16).text


def test_streaming_deltas_add_up_to_the_unary_answer(api, client, adapter):
    unary = client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content, usage = [c for c in chunks if c.choices], [c for c in chunks if not c.choices]
    assert all(c.object == "chat.completion.chunk" and c.model == f"{adapter}@v1" for c in chunks)
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content[:-1]] == [None] * (len(content) - 1)
    assert content[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    assert all(c.usage is None for c in content)
    assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0].usage == unary.usage
    # on the wire: server-sent events, each `data: <json>`, the last one `data: [DONE]`
    body = {"model": adapter, "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{api.svc.http_port}/v1/chat/completions", json=body,
                      timeout=120) as raw:
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
        text = raw.read().decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = text.split("\n\n")[:-2]
    assert all(e.startswith("data: ") for e in events)
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == unary.choices[0].message.content


def test_completions_with_raw_prompts_equal_grpc(api, client):
    prompts = ["alice is 21 years old", "bob lives in"]
    refs = [grpc_prompt(api, p, 12) for p in prompts]
    r = client.completions.create(model=base_name(api), prompt=prompts[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == base_name(api)
    assert r.choices[0].text == refs[0].text and r.choices[0].finish_reason == FINISH[refs[0].finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (refs[0].prompt_tokens, refs[0].completion_tokens)
    both = client.completions.create(model=str(api.model), prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in both.choices] == [x.text for x in refs] and [c.index for c in both.choices] == [0, 1]
    assert both.usage.prompt_tokens == sum(x.prompt_tokens for x in refs)
    streamed = client.completions.create(model=base_name(api), prompt=prompts[1], max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == refs[1].text


def test_strict_json_schema_output_validates(api, client, adapter):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for stream in (False, True):
        r = client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=64, temperature=0,
                                           response_format=fmt, stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            ext = chunks[-1].to_dict()["choices"][0]["tunewire"]
        else:
            text, ext = r.choices[0].message.content, r.to_dict()["choices"][0]["tunewire"]
        jsonschema.validate(json.loads(text), SCHEMA)  # the independent check
        assert ext == {"structured_output_valid": True, "structured_output_error": ""}, (text, ext)
    bad = {"type": "json_schema", "json_schema": {"name": "tags", "schema": UNENFORCEABLE, "strict": True}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=8, response_format=bad)
    assert e.value.status_code == 400 and error_of(e.value)["code"] == "SCHEMA_UNSUPPORTED"
    assert "uniqueItems" in error_of(e.value)["message"]
    # not strict: served, with a warning, and validity still checked against the whole schema
    lenient = {"type": "json_schema", "json_schema": {"name": "tags", "schema": UNENFORCEABLE}}
    r = client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=64, response_format=lenient)
    assert any("uniqueItems" in w for w in r.to_dict()["tunewire"]["warnings"])
    try:
        jsonschema.validate(json.loads(r.choices[0].message.content), UNENFORCEABLE)
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    assert r.to_dict()["choices"][0]["tunewire"]["structured_output_valid"] == valid


def test_models_list_and_unknown_models(api, client, adapter):
    cards = {m.id: m for m in client.models.list().data}
    ids = list(cards)
    assert ids[0] == base_name(api) and cards[ids[0]].to_dict()["parent"] is None
    assert {adapter, f"{adapter}@v1"} <= set(ids)
    for name in (adapter, f"{adapter}@v1"):
        card = cards[name].to_dict()
        assert (card["object"], card["owned_by"], card["parent"], card["max_model_len"]) == \
            ("model", "tunewire", base_name(api), 512)
    assert client.models.retrieve(f"{adapter}@v1").id == f"{adapter}@v1"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert error_of(e.value)["code"] == "MODEL_NOT_FOUND"
    for model, reason in (("no-such-adapter", "ADAPTER_NOT_FOUND"), (f"{adapter}@v9", "ADAPTER_NOT_FOUND"),
                          ("not a model/name", "MODEL_NOT_FOUND")):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        assert e.value.status_code == 404 and error_of(e.value)["code"] == reason, (model, error_of(e.value))
        assert error_of(e.value)["type"] == "not_found_error"


def test_dropped_connections_abort_the_engine_request(api, client):
    key = series("tunewire_serving_requests_total", adapter="base", outcome="cancelled", frontend="http")
    before = api.metrics().get(key, 0)
    stream = client.chat.completions.create(model=base_name(api), messages=MESSAGES, max_tokens=LONG_TOKENS,
                                            stream=True, extra_body={"min_tokens": LONG_TOKENS})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None and api.unfinished() == 1
    stream.close()  # closes the connection mid-stream
    api.wait_engine_idle()
    wait_metric(api, key, before + 1)
    # not streaming: the client goes away while the answer is being generated
    body = json.dumps({"model": base_name(api), "messages": MESSAGES, "max_tokens": LONG_TOKENS,
                       "min_tokens": LONG_TOKENS}).encode()
    with socket.create_connection(("127.0.0.1", api.svc.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while api.unfinished() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.unfinished() == 1
    api.wait_engine_idle()
    wait_metric(api, key, before + 2)


@pytest.mark.parametrize("field, value", [("logprobs", True), ("presence_penalty", 0.5),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("frobnicate", 1)])
def test_unsupported_fields_are_refused(api, client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=base_name(api), messages=MESSAGES, max_tokens=4,
                                       extra_body={field: value})
    err = error_of(e.value)
    assert (err["code"], err["param"], err["type"]) == ("FIELD_UNSUPPORTED", field, "invalid_request_error"), err
    # their neutral values are accepted (SDKs send them)
    r = client.chat.completions.create(model=base_name(api), messages=MESSAGES, max_tokens=4, temperature=0,
                                       presence_penalty=0, logprobs=False, tools=[], n=1)
    assert r.choices[0].message.content == grpc_chat(api, "", 4).text


def test_bad_json_bodies(api):
    url = f"http://127.0.0.1:{api.svc.http_port}/v1/chat/completions"
    for content in (b'{"model": "x", "messages": [', b"\xff\xfe", b'["a list"]'):
        r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "REQUEST_UNDECODABLE", (content, r.text)


def test_metrics_count_http_requests(api, client, adapter):
    before = api.metrics()
    five = {"max_tokens": 5, "extra_body": {"min_tokens": 5}}  # exactly 5 tokens each
    client.chat.completions.create(model=base_name(api), messages=MESSAGES, **five)
    list(client.chat.completions.create(model=base_name(api), messages=MESSAGES, stream=True, **five))
    client.completions.create(model=base_name(api), prompt="carol", **five)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES, max_tokens=5)
    after = api.metrics()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta(series("tunewire_serving_requests_total", adapter="base", outcome="ok", frontend="http")) == 3
    assert delta(series("tunewire_serving_tokens_total", adapter="base", kind="completion", frontend="http")) == 15
    assert delta(series("tunewire_serving_ttft_seconds_count", adapter="base", frontend="http")) == 3
    assert sum(delta(k) for k in after if k.startswith("tunewire_serving_requests_total")
               and 'outcome="not_found"' in k and 'frontend="http"' in k) == 1
    assert not any(delta(k) for k in after if 'frontend="grpc"' in k)  # gRPC's are its own
    http = "tunewire_http_requests_total"
    assert delta(series(http, route="chat", method="POST", status="200")) == 2
    assert delta(series(http, route="chat", method="POST", status="404")) == 1
    assert delta(series(http, route="completions", method="POST", status="200")) == 1
    assert delta(series("tunewire_http_request_seconds_count", route="chat")) == 3
