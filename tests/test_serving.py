"""Production serving on the real engine: versioned adapters and the alias flip under load, lazy
loading, LRU eviction and pinning, validation failures, WatchAdapters, deadlines and cancellation
reaching the engine, admission backpressure, structured formats (strict mode, compile timeout,
regex, choice), BatchGenerate, Classify and the metrics of a scripted workload.

One serving subprocess (tiny random Llama, vLLM CPU) with small limits serves the whole module:
3 resident adapters, 4 requests running and 4 queued, 3 adapters with their own metric label.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from harness import expect_error, start_service
from tunewire import adapters
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc

pytestmark = pytest.mark.slow


class Serving:
    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model, self.store = tmp, model, tmp / "adapters"
        self.store.mkdir()
        self.svc = start_service(
            "serving", tmp, "--model", str(model), "--adapter-store", str(self.store),
            "--max-model-len", "512", "--enforce-eager", "--max-loras", "2", "--max-cpu-loras", "3",
            "--max-concurrent-requests", "4", "--max-queued-requests", "4",
            "--schema-compile-timeout-s", "0.5", "--metrics-top-adapters", "3", "--drain-seconds", "1")
        self.svc.wait_serving(300)
        self.channel = grpc.insecure_channel(self.svc.address)
        self.stub = serving_pb2_grpc.ServingServiceStub(self.channel)
        self._n = 0

    def publish(self, name: str, *, r: int = 8, targets=("q_proj", "v_proj"), seed: int = 0, **lora) -> Path:
        """A random (non-zero) peft LoRA adapter published as the next version of `name`."""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self._n += 1
        src = self.tmp / f"src-{name}-{self._n}"
        torch.manual_seed(seed)
        get_peft_model(AutoModelForCausalLM.from_pretrained(self.model),
                       LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                  init_lora_weights=False, **lora)).save_pretrained(src)
        dest, _ = adapters.publish(src, self.store, name, base_model_dir=self.model)
        return dest

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.svc.metrics_port}/metrics", timeout=10).read()
        out = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def unfinished(self) -> float:
        return self.metrics()["tunewire_serving_engine_unfinished_requests"]

    def wait_engine_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.unfinished() == 0, "the engine kept a request after abort/deadline"

    def adapters(self, **kw) -> dict[str, spb.Adapter]:
        return {f"{a.name}@{a.version}": a for a in self.stub.ListAdapters(
            spb.ListAdaptersRequest(**kw)).adapters}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    s = Serving(tmp_path_factory.mktemp("serving"), Path(tiny_model_dir))
    yield s
    s.channel.close()
    s.svc.stop()


def gen(stub, prompt="alice is 21 years old", adapter="", max_tokens=8, fmt=None, timeout=120, **kw):
    return stub.Generate(spb.GenerateRequest(
        adapter=adapter, prompt=prompt, sampling=spb.SamplingParams(max_tokens=max_tokens),
        response_format=fmt or spb.ResponseFormat(text=spb.TextFormat()), **kw), timeout=timeout)


# Long generations: the tiny random model rarely emits EOS, and a regex forces the length.
LONG = spb.ResponseFormat(regex=spb.RegexFormat(pattern="[a-z ]{4000}"))
LONG_TOKENS = 450


def wait_state(srv, key: str, state: int, timeout: float = 10) -> spb.Adapter:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = srv.adapters().get(key)
        if a is not None and a.state == state:
            return a
        time.sleep(0.05)
    raise AssertionError(f"{key} not in state {spb.Adapter.State.Name(state)}: {srv.adapters().get(key)}")


# --------------------------------------------------------------------------------------------
def test_alias_flip_under_load_fails_no_request(srv):
    srv.publish("flip", seed=1)
    assert srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="flip")).adapter.version == "v1"
    v2_dir = srv.publish("flip", seed=2)
    prompt = "bob is"
    # a long request started on v1 finishes on v1 even though the alias flips meanwhile
    long_call = srv.stub.StreamGenerate(spb.StreamGenerateRequest(
        adapter="flip", prompt=prompt, sampling=spb.SamplingParams(max_tokens=LONG_TOKENS), response_format=LONG),
        timeout=120)
    first = next(long_call)
    assert first.adapter_version == "v1"
    results, errors, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                results.append(gen(srv.stub, prompt, adapter="flip", max_tokens=4))
            except grpc.RpcError as e:  # noqa: PERF203
                errors.append(e)

    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            pool.submit(hammer)
        time.sleep(1.0)
        loaded = srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="flip", uri=str(v2_dir))).adapter
        assert loaded.version == "v2" and loaded.active
        time.sleep(1.0)
        stop.set()
    rest = list(long_call)
    assert not errors, [e.details() for e in errors]
    versions = [r.adapter_version for r in results]
    assert versions[0] == "v1" and versions[-1] == "v2", versions
    # once flipped, never back: new requests resolve to v2
    assert versions == sorted(versions), versions
    assert {r.adapter_version for r in rest} == {"v1"} and rest[-1].finish_reason == spb.FINISH_REASON_LENGTH
    v1 = wait_state(srv, "flip@v1", spb.Adapter.STATE_UNLOADED)  # drained, then removed
    assert not v1.active and v1.tier == spb.Adapter.TIER_STORE
    # the pinned-version form still reaches v1 (loaded again, lazily), the name stays on v2
    r = gen(srv.stub, prompt, adapter="flip@v1", max_tokens=4)
    assert r.adapter_version == "v1" and r.timings.adapter_load_ms > 0
    assert gen(srv.stub, prompt, adapter="flip", max_tokens=4).adapter_version == "v2"
    srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name="flip"))


def test_lazy_load_from_the_store(srv):
    srv.publish("lazy", seed=3)
    assert "lazy@v1" not in srv.adapters()
    assert srv.adapters(include_store=True)["lazy@v1"].tier == spb.Adapter.TIER_STORE
    first = gen(srv.stub, adapter="lazy")
    assert first.adapter == "lazy" and first.adapter_version == "v1"
    assert first.timings.adapter_load_ms > 0
    second = gen(srv.stub, adapter="lazy")
    assert second.timings.adapter_load_ms == 0 and second.text == first.text
    a = srv.adapters()["lazy@v1"]
    assert a.state == spb.Adapter.STATE_READY and a.active and a.request_count == 2
    assert a.size_bytes > 0 and a.last_used_time.seconds > 0 and a.rank == 8
    expect_error(lambda: gen(srv.stub, adapter="not-in-store"), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    expect_error(lambda: gen(srv.stub, adapter="lazy@v9"), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    expect_error(lambda: gen(srv.stub, adapter="../etc"), grpc.StatusCode.INVALID_ARGUMENT,
                 "ADAPTER_NAME_INVALID")
    # size limits: characters before tokenizing (200k default), bytes per gRPC message (4 MiB)
    expect_error(lambda: gen(srv.stub, "x" * 200_001), grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_LONG")
    with pytest.raises(grpc.RpcError) as e:
        gen(srv.stub, "x" * (5 << 20))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name="lazy"))
    wait_state(srv, "lazy@v1", spb.Adapter.STATE_UNLOADED)


def test_lru_eviction_and_pinning(srv):
    for i, name in enumerate(["lru-a", "lru-b", "lru-c", "lru-d", "lru-e"]):
        srv.publish(name, seed=10 + i)
    srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="lru-a"))
    srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="lru-b", pin=True))
    srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="lru-c"))
    gen(srv.stub, adapter="lru-a")  # a is now more recently used than c
    evictions = srv.metrics().get("tunewire_serving_adapter_evictions_total", 0)
    gen(srv.stub, adapter="lru-d")  # full (3 resident): evicts the LRU unpinned one, c
    ads = srv.adapters()
    assert ads["lru-c@v1"].state == spb.Adapter.STATE_EVICTED and ads["lru-c@v1"].tier == spb.Adapter.TIER_STORE
    assert ads["lru-b@v1"].state == spb.Adapter.STATE_READY and ads["lru-b@v1"].pinned
    assert {k for k, a in ads.items() if a.tier == spb.Adapter.TIER_ENGINE} == {"lru-a@v1", "lru-b@v1", "lru-d@v1"}
    assert srv.metrics()["tunewire_serving_adapter_evictions_total"] == evictions + 1
    # an evicted adapter comes back on demand (evicting the LRU one, a)
    assert gen(srv.stub, adapter="lru-c").timings.adapter_load_ms > 0
    assert srv.adapters()["lru-a@v1"].state == spb.Adapter.STATE_EVICTED
    # everything resident pinned: no room, RESOURCE_EXHAUSTED with a reason; nothing evicted
    for name in ("lru-c", "lru-d"):
        assert srv.stub.PinAdapter(spb.PinAdapterRequest(name=name, pinned=True)).adapter.pinned
    expect_error(lambda: gen(srv.stub, adapter="lru-e"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "ADAPTER_CAPACITY_EXHAUSTED")
    assert gen(srv.stub, adapter="lru-b").adapter == "lru-b"  # the pinned ones keep serving
    assert srv.metrics()["tunewire_serving_adapters_pinned"] == 3
    srv.stub.PinAdapter(spb.PinAdapterRequest(name="lru-d", pinned=False))
    assert gen(srv.stub, adapter="lru-e").adapter == "lru-e"
    for name in ("lru-a", "lru-b", "lru-c", "lru-e"):
        try:
            srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name=name))
        except grpc.RpcError:
            pass  # lru-a was evicted: nothing loaded to unload
    wait_state(srv, "lru-e@v1", spb.Adapter.STATE_UNLOADED)


def test_each_validation_failure_is_failed_precondition_and_others_keep_serving(srv):
    srv.publish("good", seed=20)
    good = gen(srv.stub, adapter="good")
    cases = {}
    cases["ADAPTER_RANK_TOO_LARGE"] = srv.publish("bad-rank", r=32)
    cases["ADAPTER_TARGET_UNSUPPORTED"] = srv.publish("bad-target", targets=("lm_head",))
    cases["ADAPTER_DORA_UNSUPPORTED"] = srv.publish("bad-dora", use_dora=True)
    d = srv.publish("bad-checksum")
    (d / "adapter_model.safetensors").write_bytes(b"tampered")
    cases["ADAPTER_CHECKSUM_MISMATCH"] = d
    d = srv.publish("bad-base")
    m = json.loads((d / "manifest.json").read_text())
    m["base_model_fingerprint"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    cases["BASE_MODEL_MISMATCH"] = d
    for reason, path in cases.items():
        name = path.parent.name
        expect_error(lambda: srv.stub.LoadAdapter(spb.LoadAdapterRequest(name=name, uri=str(path))),
                     grpc.StatusCode.FAILED_PRECONDITION, reason)
        expect_error(lambda: gen(srv.stub, adapter=name), grpc.StatusCode.FAILED_PRECONDITION, reason)
        a = srv.adapters()[f"{name}@v1"]
        assert a.state == spb.Adapter.STATE_FAILED and a.failure_reason == reason and a.failure_message
    expect_error(lambda: srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="good", manifest_sha256="f" * 64)),
                 grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_MANIFEST_SHA256_MISMATCH")
    for uri in ("../../etc", "/etc", "good/../../x"):
        expect_error(lambda: srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="evil", uri=uri)),
                     grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_URI_OUTSIDE_STORE")
    expect_error(lambda: srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="Bad/Name")),
                 grpc.StatusCode.INVALID_ARGUMENT)
    assert srv.metrics()['tunewire_serving_adapter_load_failures_total{reason="BASE_MODEL_MISMATCH"}'] >= 1
    again = gen(srv.stub, adapter="good")  # every other adapter keeps serving, same answer
    assert again.text == good.text and gen(srv.stub).completion_tokens > 0
    srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name="good"))
    wait_state(srv, "good@v1", spb.Adapter.STATE_UNLOADED)


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


def test_watch_adapters_streams_state_changes(srv):
    srv.publish("watched", seed=30)
    events, started = [], threading.Event()
    call = srv.stub.WatchAdapters(spb.WatchAdaptersRequest(name="watched"), timeout=60)

    def read():
        started.set()
        for ev in call:
            events.append((spb.Adapter.State.Name(ev.adapter.state), ev.adapter.version, ev.initial))
            if ev.adapter.state == spb.Adapter.STATE_UNLOADED:
                return

    t = threading.Thread(target=read)
    t.start()
    started.wait()
    time.sleep(0.3)
    srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="watched"))
    srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name="watched"))
    t.join(30)
    call.cancel()
    states = [s for s, _, _ in events]
    assert states[:2] == ["STATE_LOADING", "STATE_READY"] and states[-1] == "STATE_UNLOADED", events
    assert "STATE_UNLOADING" in states and all(v == "v1" for _, v, _ in events)


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
    before = srv.metrics().get('tunewire_serving_requests_total{adapter="base",outcome="cancelled"}', 0)
    call = srv.stub.StreamGenerate(spb.StreamGenerateRequest(
        prompt="carol", sampling=spb.SamplingParams(max_tokens=LONG_TOKENS), response_format=LONG), timeout=60)
    next(call)
    next(call)
    assert srv.unfinished() == 1
    call.cancel()
    srv.wait_engine_idle()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and srv.metrics().get(
            'tunewire_serving_requests_total{adapter="base",outcome="cancelled"}', 0) == before:
        time.sleep(0.05)
    assert srv.metrics()['tunewire_serving_requests_total{adapter="base",outcome="cancelled"}'] == before + 1


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


def test_metrics_after_a_scripted_workload(srv):
    before = srv.metrics()
    for name in ("m-1", "m-2", "m-3", "m-4"):
        srv.publish(name, seed=50)
    # 2 requests on each of 4 new adapters; 3 labels are allowed and earlier tests took them
    for name in ("m-1", "m-2", "m-3", "m-4"):
        for _ in range(2):
            gen(srv.stub, adapter=name, max_tokens=5)
    after = srv.metrics()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta('tunewire_serving_requests_total{adapter="other",outcome="ok"}') == 8
    assert not any(k.startswith("tunewire_serving_requests_total") and 'adapter="m-' in k for k in after)
    assert delta('tunewire_serving_tokens_total{adapter="other",kind="completion"}') == 40
    assert delta('tunewire_serving_ttft_seconds_count{adapter="other"}') == 8
    assert delta('tunewire_serving_adapter_cache_total{result="miss"}') == 4
    assert delta('tunewire_serving_adapter_cache_total{result="hit"}') == 4
    assert delta("tunewire_serving_adapter_evictions_total") >= 1  # 4 adapters, 3 slots
    assert delta('tunewire_serving_adapter_load_seconds_count{trigger="lazy"}') == 4
    for phase in ("validate", "room", "engine"):  # each of the 4 loads timed in every phase
        assert delta(f'tunewire_serving_adapter_load_phase_seconds_count{{phase="{phase}"}}') == 4
    assert after["tunewire_serving_adapters_resident"] == 3
    for key in ("tunewire_serving_schema_compile_seconds_count", "tunewire_serving_admission_queue_depth",
                'tunewire_serving_structured_output_total{format="regex",valid="true"}', "vllm:"):
        assert any(k.startswith(key) for k in after), key


def test_classify_with_a_published_head(srv):
    from test_classify import TEXTS, train_head
    from trainer_service.recipe_classifier import predict

    head = train_head(srv.model, srv.tmp)
    adapters.publish(head, srv.store, "region", base_model_dir=srv.model)
    r = srv.stub.Classify(spb.ClassifyRequest(head="region", texts=TEXTS), timeout=120)
    assert (r.head, r.head_version) == ("region", "v1")
    expected = predict(head, srv.model, TEXTS)
    assert [c.label for c in r.results] == [label for label, _ in expected]
    for c, (_, probs) in zip(r.results, expected):
        assert [s.probability for s in c.scores] == pytest.approx(probs, abs=1e-6)
    assert [s.label for s in r.results[0].scores] == ["north", "south", "west"]
    assert srv.stub.Classify(spb.ClassifyRequest(head="region@v1", texts=TEXTS[:1])).results[0].label == \
        expected[0][0]
    expect_error(lambda: srv.stub.Classify(spb.ClassifyRequest(head="nope", texts=["x"])),
                 grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: srv.stub.Classify(spb.ClassifyRequest(head="region", texts=[])),
                 grpc.StatusCode.INVALID_ARGUMENT)
    srv.publish("not-a-head")
    expect_error(lambda: srv.stub.Classify(spb.ClassifyRequest(head="not-a-head", texts=["x"])),
                 grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_KIND_UNSUPPORTED")
    # a head is not a LoRA adapter: generation refuses it without touching the engine
    expect_error(lambda: gen(srv.stub, adapter="region"), grpc.StatusCode.FAILED_PRECONDITION,
                 "ADAPTER_KIND_UNSUPPORTED")


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
