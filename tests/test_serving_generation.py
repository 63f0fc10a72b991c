"""Production serving on the real engine, generation: min_tokens, deadlines and cancellation
reaching the engine, admission backpressure, structured formats (strict mode, compile timeout,
regex, choice), BatchGenerate, and a load test within and past capacity.

A serving subprocess of its own, with the same small limits as tests/test_serving.py (whose
`Serving` starts it): 4 requests running and 4 queued. Every test leaves the engine idle, so the
tests pass in any order.
"""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest

from harness import expect_error, series
from test_serving import LONG, LONG_TOKENS, Serving, gen, wait_state
from tunewire.serving.v1 import serving_pb2 as spb

# 600 s: the first test also pays for starting the service (~30-90 s on 2 shared cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    yield from Serving.for_module(tmp_path_factory, tiny_model_dir, "serving-generation")


def test_min_tokens_holds_off_stop_strings_and_eos(srv):
    """sampling.min_tokens (TGIS min_new_tokens, vLLM min_tokens): a stop string the greedy output
    reaches at once ends it early, unless min_tokens asks for more; out of [0, max_tokens] it is
    INVALID_ARGUMENT on the field."""
    def run(**sampling):
        return srv.stub.Generate(spb.GenerateRequest(
            prompt="alice is 21 years old", sampling=spb.SamplingParams(max_tokens=12, **sampling),
            response_format=spb.ResponseFormat(text=spb.TextFormat())), timeout=120)

    free = run()
    assert len(free.text) >= 2
    stopped = run(stop=[free.text[:2]])
    assert stopped.finish_reason == spb.FINISH_REASON_STOP and stopped.completion_tokens < 12
    held = run(stop=[free.text[:2]], min_tokens=12)
    assert held.finish_reason == spb.FINISH_REASON_LENGTH and held.completion_tokens == 12
    for bad in (13, -1):
        _, fields = expect_error(lambda: run(min_tokens=bad), grpc.StatusCode.INVALID_ARGUMENT)
        assert "sampling.min_tokens" in fields

def test_time_limit_aborts_in_the_engine(srv):
    t0 = time.monotonic()
    reason, _ = expect_error(lambda: gen(srv.stub, max_tokens=LONG_TOKENS, fmt=LONG, time_limit_ms=300),
                             grpc.StatusCode.DEADLINE_EXCEEDED)
    assert reason == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 5
    srv.wait_engine_idle()


def test_grpc_deadline_reaches_the_engine(srv):
    with pytest.raises(grpc.RpcError) as e:
        gen(srv.stub, max_tokens=LONG_TOKENS, fmt=LONG, timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    srv.wait_engine_idle()


def test_client_cancel_aborts_the_engine_request(srv):
    key = series("tunewire_serving_requests_total", adapter="base", frontend="grpc", outcome="cancelled")
    before = srv.metrics().get(key, 0)
    call = srv.stub.StreamGenerate(spb.StreamGenerateRequest(
        prompt="carol", sampling=spb.SamplingParams(max_tokens=LONG_TOKENS), response_format=LONG), timeout=60)
    next(call)
    next(call)
    assert srv.unfinished() == 1
    call.cancel()
    srv.wait_engine_idle()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and srv.metrics().get(key, 0) == before:
        time.sleep(0.05)
    assert srv.metrics()[key] == before + 1


def test_resource_exhausted_only_past_the_queue(srv):
    """4 running + 4 queued are accepted; the rest are refused at once with a retry hint."""
    streams = [srv.stub.StreamGenerate(spb.StreamGenerateRequest(
        prompt=f"dave {i}", sampling=spb.SamplingParams(max_tokens=LONG_TOKENS), response_format=LONG), timeout=120)
        for i in range(8)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and srv.metrics()["tunewire_serving_admission_queue_depth"] < 4:
        time.sleep(0.05)
    m = srv.metrics()
    assert m["tunewire_serving_requests_running"] == 4 and m["tunewire_serving_admission_queue_depth"] == 4
    with pytest.raises(grpc.RpcError) as e:
        gen(srv.stub)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    from google.rpc import error_details_pb2, status_pb2

    st = status_pb2.Status.FromString(dict(e.value.trailing_metadata())["grpc-status-details-bin"])
    retry = [d for d in st.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "RESOURCE_EXHAUSTED carries a RetryInfo hint"
    for s in streams:
        s.cancel()
    srv.wait_engine_idle()
    # every accepted request was served or cancelled by us; none was refused
    assert srv.metrics()["tunewire_serving_admission_queue_depth"] == 0


def test_deadline_in_the_admission_queue(srv):
    streams = [srv.stub.StreamGenerate(spb.StreamGenerateRequest(
        prompt=f"erin {i}", sampling=spb.SamplingParams(max_tokens=LONG_TOKENS), response_format=LONG), timeout=120)
        for i in range(4)]
    for s in streams:
        next(s)  # all 4 running
    expect_error(lambda: gen(srv.stub, time_limit_ms=300), grpc.StatusCode.DEADLINE_EXCEEDED,
                 "DEADLINE_EXCEEDED_IN_QUEUE")
    for s in streams:
        s.cancel()
    srv.wait_engine_idle()


def test_structured_formats(srv):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                        "maxItems": 3, "uniqueItems": True}},
              "required": ["tags"]}
    strict = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json.dumps(schema), strict=True))
    reason, fields = expect_error(lambda: gen(srv.stub, fmt=strict), grpc.StatusCode.INVALID_ARGUMENT,
                                  "SCHEMA_UNSUPPORTED")
    assert "uniqueItems" in json.dumps(fields)
    lenient = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json.dumps(schema)))
    r = gen(srv.stub, fmt=lenient, max_tokens=64)
    assert any("uniqueItems" in w for w in r.warnings)
    valid = _valid(r.text, schema)
    assert r.structured_output_valid == valid, (r.text, r.structured_output_error)
    r = gen(srv.stub, fmt=spb.ResponseFormat(regex=spb.RegexFormat(pattern="[0-9]{3}-[a-z]{2}")), max_tokens=16)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.text) and r.structured_output_valid
    r = gen(srv.stub, fmt=spb.ResponseFormat(choice=spb.ChoiceFormat(choices=["yes", "no", "maybe"])))
    assert r.text in ("yes", "no", "maybe") and r.structured_output_valid
    r = gen(srv.stub, fmt=spb.ResponseFormat(json_object=spb.JsonObjectFormat()), max_tokens=3)
    assert not r.structured_output_valid and r.structured_output_error == "truncated at max_tokens"
    expect_error(lambda: gen(srv.stub, fmt=spb.ResponseFormat(regex=spb.RegexFormat(pattern="(")),),
                 grpc.StatusCode.INVALID_ARGUMENT, "REGEX_INVALID")


def _valid(text, schema) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_schema_compile_timeout(srv):
    from test_structured import SLOW_SCHEMA  # ~3 s to compile here; the service allows 0.5 s

    fmt = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json.dumps(SLOW_SCHEMA)))
    t0 = time.monotonic()
    expect_error(lambda: gen(srv.stub, fmt=fmt), grpc.StatusCode.INVALID_ARGUMENT, "SCHEMA_COMPILE_TIMEOUT")
    assert time.monotonic() - t0 < 5
    assert gen(srv.stub).completion_tokens > 0  # the engine never saw it


def test_batch_generate_mixes_adapters_and_errors(srv):
    srv.publish("batch-a", seed=40)
    reqs = [spb.GenerateRequest(prompt="frank is", sampling=spb.SamplingParams(max_tokens=6)),
            spb.GenerateRequest(adapter="batch-a", prompt="frank is", sampling=spb.SamplingParams(max_tokens=6)),
            spb.GenerateRequest(adapter="missing", prompt="frank is"),
            spb.GenerateRequest(prompt="")]
    out = srv.stub.BatchGenerate(spb.BatchGenerateRequest(requests=reqs), timeout=120).results
    assert [o.WhichOneof("result") for o in out] == ["response", "response", "error", "error"]
    assert out[1].response.adapter == "batch-a" and out[0].response.adapter == ""
    assert out[0].response.text == gen(srv.stub, "frank is", max_tokens=6).text
    assert out[1].response.text == gen(srv.stub, "frank is", adapter="batch-a", max_tokens=6).text
    assert (out[2].error.code, out[2].error.reason) == (grpc.StatusCode.NOT_FOUND.value[0], "ADAPTER_NOT_FOUND")
    assert out[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    expect_error(lambda: srv.stub.BatchGenerate(spb.BatchGenerateRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name="batch-a"))
    wait_state(srv, "batch-a@v1", spb.Adapter.STATE_UNLOADED)

def test_loadtest_smoke_within_and_past_capacity(srv):
    """`run_load` on loopback: a base/adapter/JSON mix within capacity (6 <= 4 running + 4 queued)
    has no error; a burst of 16 long generations is refused only with QUEUE_FULL."""
    import asyncio

    from tunewire.loadtest import DEFAULT_SCHEMA, run_load

    srv.publish("load-a", seed=60)
    assert gen(srv.stub, adapter="load-a", max_tokens=2).adapter == "load-a"  # loaded before the clock starts
    schema = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=DEFAULT_SCHEMA))
    for _ in range(3):  # compile (and cache) the schema; the service allows only 0.5 s per compile
        try:
            gen(srv.stub, fmt=schema, max_tokens=2)
            break
        except grpc.RpcError:
            time.sleep(0.5)
    within = asyncio.run(run_load(srv.svc.address, concurrency=6, duration=5, max_tokens=8,
                                  mix={"base": 2, "adapter": 1, "json": 1}, adapters=["load-a"]))
    assert within.count > 0 and within.ok == within.count, within.text()
    assert within.status == {"OK": within.count} and not within.errors
    assert set(within.kinds) == {"base", "adapter", "json"} and within.tokens > 0
    assert within.latency_ms["min"] <= within.latency_ms["p50"] <= within.latency_ms["p99"] <= within.latency_ms["max"]

    burst = asyncio.run(run_load(srv.svc.address, concurrency=16, duration=3, max_tokens=96,
                                 response_format=LONG, timeout=120))
    print(within.text(), burst.text())  # the reports, with -s
    refused = burst.status.get("RESOURCE_EXHAUSTED", 0)
    assert refused > 0 and burst.ok >= 8, burst.text()
    assert set(burst.status) == {"OK", "RESOURCE_EXHAUSTED"}, burst.text()
    assert [(e["code"], e["reason"]) for e in burst.errors] == [("RESOURCE_EXHAUSTED", "QUEUE_FULL")]
    srv.wait_engine_idle()
    assert srv.metrics()["tunewire_serving_admission_queue_depth"] == 0
