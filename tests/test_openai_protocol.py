"""The OpenAI ⇄ tunewire translation (serving_service/openai_protocol.py) and the HTTP app's edge
(auth, body limits, bad JSON, engine not ready, /health), fast: no engine runs. The response
shapes are checked with the official `openai` package's own types, the independent reference for
what its clients parse. End to end with real vLLM: tests/test_openai_api.py.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.testclient import TestClient

from serving_service import openai_protocol as oa
from serving_service.adapter_checks import AdapterChecks
from serving_service.admission import Admission
from serving_service.engine import EngineConfig, VllmEngine
from serving_service.generation import Chunk, Generator
from serving_service.openai_http import HttpFrontend, OpenAIApp
from serving_service.registry import AdapterRegistry
from serving_service.structured import StructuredOutputs
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.security import ServerSecurity

pytestmark = pytest.mark.timeout(60)
BASE = frozenset({"tiny", "/models/tiny"})
USER = [{"role": "user", "content": "Hi"}]


def chat(**body):
    return oa.parse_chat({"model": "tiny", "messages": USER, **body}, base_names=BASE, request_id="r")


def refused(fn, reason, param=None):
    with pytest.raises(TunewireError) as e:
        fn()
    assert e.value.reason == reason, e.value.message
    if param is not None:
        assert oa.error_body(e.value)[1]["error"]["param"] == param
    return e.value


def test_chat_fields_become_one_request_per_choice_with_openai_defaults():
    call = chat()
    (r,) = call.requests
    # OpenAI's defaults, not gRPC's: temperature 1 (gRPC's 0 is greedy)
    assert (r.temperature, r.top_p, r.max_tokens, r.adapter, r.frontend) == (1.0, 1.0, 0, "", "http")
    assert r.messages == (("user", "Hi"),) and r.request_id == "r" and not call.stream
    call = chat(model="my-adapter@v2", n=3, seed=7, stop="END", max_completion_tokens=9, temperature=0,
                top_k=5, min_tokens=2, time_limit_ms=500, user="u1", stream=True,
                stream_options={"include_usage": True})
    assert [r.seed for r in call.requests] == [7, 8, 9]  # distinct, reproducible samples
    assert [r.request_id for r in call.requests] == ["r-0", "r-1", "r-2"]  # engine ids unique
    r = call.requests[0]
    assert (r.adapter, r.stop, r.max_tokens, r.temperature, r.top_k, r.min_tokens, r.time_limit_ms) == (
        "my-adapter@v2", ("END",), 9, 0.0, 5, 2, 500)
    assert call.stream and call.include_usage and call.n == 3
    assert chat(model="/models/tiny").requests[0].adapter == ""  # the path names the base too


def test_content_parts_join_and_other_parts_or_message_fields_are_refused():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert chat(messages=parts).requests[0].messages == (("user", "a\nb"),)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    refused(lambda: chat(messages=image), R.FIELD_UNSUPPORTED, "messages[0].content[0].type")
    refused(lambda: chat(messages=[{"role": "user", "content": "x", "name": "bob"}]),
            R.FIELD_UNSUPPORTED, "messages[0].name")
    assert chat(messages=[{"role": "assistant", "content": "x", "tool_calls": []}]).requests
    refused(lambda: chat(messages=[{"role": "robot", "content": "x"}]), R.INVALID_FIELD, "messages[0].role")
    refused(lambda: chat(messages=[]), R.INVALID_FIELD, "messages")


@pytest.mark.parametrize("field,value", [("presence_penalty", 0), ("frequency_penalty", 0.0),
                                         ("logprobs", False), ("tools", []), ("tool_choice", "none"),
                                         ("logit_bias", {}), ("n", 1), ("store", False),
                                         ("parallel_tool_calls", True), ("seed", None)])
def test_neutral_values_are_accepted(field, value):
    assert chat(**{field: value}).requests


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("presence_penalty", False),
                                         ("logprobs", True), ("top_logprobs", 3),
                                         ("tools", [{"type": "function"}]), ("logit_bias", {"1": 5}),
                                         ("functions", [{"name": "f"}]), ("audio", {"voice": "x"}),
                                         ("prediction", {"type": "content"}), ("echo", False)])
def test_other_values_and_unknown_fields_are_refused_never_ignored(field, value):
    e = refused(lambda: chat(**{field: value}), R.FIELD_UNSUPPORTED, field)
    assert oa.error_body(e)[0] == 400


def test_types_and_ranges_are_checked():
    refused(lambda: chat(max_tokens="5"), R.INVALID_FIELD, "max_tokens")
    refused(lambda: chat(temperature=True), R.INVALID_FIELD, "temperature")
    refused(lambda: chat(n=0), R.INVALID_FIELD, "n")
    refused(lambda: chat(n=oa.MAX_N + 1), R.INVALID_FIELD, "n")
    refused(lambda: chat(max_tokens=5, max_completion_tokens=6), R.INVALID_FIELD, "max_completion_tokens")
    refused(lambda: chat(stop=["a", 1]), R.INVALID_FIELD, "stop")
    refused(lambda: chat(stream_options={"include_usage": True}), R.INVALID_FIELD, "stream_options")
    refused(lambda: chat(stream=True, stream_options={"continuous_usage_stats": True}),
            R.FIELD_UNSUPPORTED, "stream_options.continuous_usage_stats")


def test_response_formats():
    assert chat(response_format={"type": "text"}).constrained is False
    r = chat(response_format={"type": "json_object"})
    assert r.constrained and r.requests[0].response_format == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                     "strict": True}}).requests[0]
    assert (r.response_format, json.loads(r.json_schema), r.strict) == ("json_schema", schema, True)
    refused(lambda: chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            R.JSON_SCHEMA_INVALID, "response_format.json_schema.schema")
    refused(lambda: chat(response_format={"type": "grammar"}), R.FIELD_UNSUPPORTED, "response_format.type")


def test_models_resolve_like_grpc_adapters_and_the_rest_is_not_found():
    assert oa.resolve_model("tiny", BASE) == "" and oa.resolve_model("a-1@v3", BASE) == "a-1@v3"
    for bad in ("meta-llama/Llama-3", "A B", "x@latest"):
        e = refused(lambda: oa.resolve_model(bad, BASE), R.MODEL_NOT_FOUND)
        assert oa.error_body(e)[0] == 404
    refused(lambda: oa.resolve_model("", BASE), R.INVALID_FIELD, "model")


def test_completion_prompts():
    call = oa.parse_completion({"model": "tiny", "prompt": ["a", "b"], "n": 2}, base_names=BASE, request_id="q")
    assert [r.prompt for r in call.requests] == ["a", "a", "b", "b"]
    assert [r.request_id for r in call.requests] == ["q-0", "q-1", "q-2", "q-3"]
    refused(lambda: oa.parse_completion({"model": "tiny", "prompt": [1, 2]}, base_names=BASE, request_id="q"),
            R.FIELD_UNSUPPORTED, "prompt")
    refused(lambda: oa.parse_completion({"model": "tiny", "prompt": ["x"] * 33, "n": 2}, base_names=BASE,
                                        request_id="q"), R.INVALID_FIELD, "n")
    refused(lambda: oa.parse_completion({"model": "tiny", "prompt": "x", "echo": True}, base_names=BASE,
                                        request_id="q"), R.FIELD_UNSUPPORTED, "echo")


def _final(text, prompt=4, completion=3, adapter="", version="", valid=False, why=""):
    return Chunk(text=text, prompt_tokens=prompt, completion_tokens=completion, adapter=adapter,
                 adapter_version=version, request_id="r", finish_reason="stop",
                 timings={"ttft_ms": 1.0, "total_ms": 2.0, "queue_ms": 0.0, "adapter_load_ms": 0.0},
                 structured_output_valid=valid, structured_output_error=why)


def test_bodies_parse_as_the_openai_client_types():
    call = chat(model="ad@v1", n=2, response_format={"type": "json_object"})
    body = oa.completion_body(call, [_final("{}", adapter="ad", version="v1", valid=True),
                                     _final("{", completion=5, adapter="ad", version="v1", why="bad")], "r")
    parsed = ChatCompletion.model_validate(body)
    assert parsed.model == "ad@v1" and [c.message.content for c in parsed.choices] == ["{}", "{"]
    # the prompt counts once, however many choices it has
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (4, 8, 12)
    assert parsed.choices[1].model_extra["tunewire"] == {"structured_output_valid": False,
                                                         "structured_output_error": "bad"}
    comp = oa.parse_completion({"model": "tiny", "prompt": ["a", "b"]}, base_names=BASE, request_id="r")
    parsed = Completion.model_validate(oa.completion_body(comp, [_final("x"), _final("y", prompt=6)], "r"))
    assert [c.text for c in parsed.choices] == ["x", "y"] and parsed.usage.prompt_tokens == 10
    assert "tunewire" not in parsed.choices[0].model_extra  # text: no validity to report


def test_stream_chunks_parse_and_add_up():
    call = chat(stream=True, stream_options={"include_usage": True})
    parts = [Chunk(text="a", prompt_tokens=4, completion_tokens=1),
             Chunk(text="b", prompt_tokens=4, completion_tokens=2), _final("c")]
    events = [ChatCompletionChunk.model_validate(oa.stream_chunk(call, 0, c, i == 0, "r"))
              for i, c in enumerate(parts)]
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content for e in events) == "abc"
    assert [e.choices[0].finish_reason for e in events] == [None, None, "stop"]
    last = ChatCompletionChunk.model_validate(oa.usage_chunk(call, [parts[-1]], "r"))
    assert last.choices == [] and last.usage.total_tokens == 7


@pytest.mark.parametrize("reason,status", [(R.INVALID_FIELD, 400), (R.TOKEN_MISSING, 401),
                                           (R.ADAPTER_NOT_FOUND, 404), (R.QUEUE_FULL, 429),
                                           (R.ENGINE_NOT_READY, 503), (R.DEADLINE_EXCEEDED, 504),
                                           (R.ADAPTER_MANIFEST_MISSING, 400), (R.INTERNAL, 500),
                                           (R.MESSAGE_TOO_LARGE, 413)])
def test_error_status_follows_googles_grpc_to_http_mapping(reason, status):
    got, body, headers = oa.error_body(TunewireError(reason, "m", retry_after_s=1.2 if status == 429 else None))
    assert got == status and body["error"]["code"] == reason and body["error"]["message"] == "m"
    assert headers == ({"retry-after": "2"} if status == 429 else {})


# -- the app's edge, no engine running ---------------------------------------------------------
@pytest.fixture
def app(tmp_path):
    engine = VllmEngine(EngineConfig(model=str(tmp_path / "tiny")))  # never started: not ready
    registry = AdapterRegistry(engine, AdapterChecks(tmp_path / "store", "fp", 16), max_resident=2)
    admission = Admission(max_running=1, max_queued=0)
    generator = Generator(engine, registry, StructuredOutputs(lambda: None), admission,
                          default_max_tokens=8, max_model_len=64)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    state = {"serving": False}
    api = OpenAIApp(generator, registry, base_name="tiny", model_path=str(tmp_path / "tiny"),
                    max_model_len=64, max_body_bytes=1000,
                    bearer=ServerSecurity(token_file=str(token)).bearer(), serving=lambda: state["serving"])
    return TestClient(api.app), state


def test_token_body_limit_bad_json_and_engine_not_ready(app):
    client, _ = app
    auth = {"authorization": "Bearer s3cret"}
    body = {"model": "tiny", "messages": USER}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "TOKEN_MISSING"
    r = client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "TOKEN_INVALID"
    r = client.post("/v1/chat/completions", content=b"{" + b" " * 2000 + b"}", headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "MESSAGE_TOO_LARGE"
    r = client.post("/v1/chat/completions", content=b"{nope", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "REQUEST_UNDECODABLE"
    r = client.post("/v1/completions", content=b"[1]", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "REQUEST_UNDECODABLE"
    r = client.post("/v1/chat/completions", json=body, headers={**auth, "x-request-id": "abc"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "ENGINE_NOT_READY"
    assert r.headers["x-request-id"] == "abc"
    r = client.get("/v1/models", headers=auth)
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]
    assert client.get("/v1/models/nope", headers=auth).status_code == 404


def test_health_follows_the_serving_state_without_a_token(app):
    client, state = app
    r = client.get("/health")
    assert (r.status_code, r.json()) == (503, {"status": "NOT_SERVING"})
    state["serving"] = True
    assert client.get("/health").status_code == 200


def test_a_taken_port_fails_bind():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        frontend = HttpFrontend(lambda serving: None, host="127.0.0.1", port=taken.getsockname()[1],
                                security=ServerSecurity())
        with pytest.raises(OSError):
            frontend.bind()


def test_frontend_starts_serves_and_stops_on_a_free_port():
    async def run():
        frontend = HttpFrontend(lambda serving: OpenAIApp(
            None, None, base_name="tiny", model_path="/m", max_model_len=8, max_body_bytes=10,
            bearer=None, serving=serving), host="127.0.0.1", port=0, security=ServerSecurity())
        frontend.bind()
        await frontend.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{frontend.port}") as h:
            assert (await h.get("/health")).status_code == 503
            frontend.set_serving(True)
            assert (await h.get("/health")).json() == {"status": "SERVING"}
            # the kept-alive connection is served with Nagle off: small SSE events leave at once
            conns = frontend._server.server_state.connections
            assert conns and all(c.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in conns)
        await frontend.stop(1.0)
        with pytest.raises(OSError):  # closed
            socket.create_connection(("127.0.0.1", frontend.port), timeout=1).close()

    asyncio.run(run())
