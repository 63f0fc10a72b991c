"""Production serving on the real engine, adapters: versions and the alias flip under load, lazy
loading, LRU eviction and pinning, validation failures, WatchAdapters, Classify and the metrics
of a scripted workload. (Generation: tests/test_serving_generation.py, on a service of its own.)

One serving subprocess (tiny random Llama, vLLM CPU) with small limits serves the whole module
(`harness.Serving`, which test_serving_generation.py uses too): 3 resident adapters, 4 requests
running and 4 queued, 3 adapters with their own metric label. Each test publishes adapters of
its own and leaves none pinned or running, so the tests pass in any order.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from harness import Serving, expect_error, series
from tunewire import adapters
from tunewire.serving.v1 import serving_pb2 as spb

# 600 s: the first test also pays for starting the service (~30-90 s on 2 shared cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    yield from Serving.for_module(tmp_path_factory, tiny_model_dir, "serving")


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
    served = {"v1": threading.Event(), "v2": threading.Event()}  # 3 answers from that version

    def hammer():
        while not stop.is_set():
            try:
                r = gen(srv.stub, prompt, adapter="flip", max_tokens=4)
            except grpc.RpcError as e:  # noqa: PERF203
                errors.append(e)
                continue
            results.append(r)
            if sum(x.adapter_version == r.adapter_version for x in results) >= 3:
                served[r.adapter_version].set()

    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            pool.submit(hammer)
        assert served["v1"].wait(120), (results, errors)
        loaded = srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="flip", uri=str(v2_dir))).adapter
        assert loaded.version == "v2" and loaded.active
        assert served["v2"].wait(120), (results, errors)
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


def test_watch_adapters_streams_state_changes(srv):
    srv.publish("watched", seed=30)
    events = []
    call = srv.stub.WatchAdapters(spb.WatchAdaptersRequest(name="watched"), timeout=60)

    def read():
        for ev in call:
            events.append((spb.Adapter.State.Name(ev.adapter.state), ev.adapter.version, ev.initial))
            if ev.adapter.state == spb.Adapter.STATE_UNLOADED:
                return

    t = threading.Thread(target=read)
    t.start()
    call.initial_metadata()  # the server sends its headers once the watch is subscribed
    srv.stub.LoadAdapter(spb.LoadAdapterRequest(name="watched"))
    srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name="watched"))
    t.join(30)
    call.cancel()
    states = [s for s, _, _ in events]
    assert states[:2] == ["STATE_LOADING", "STATE_READY"] and states[-1] == "STATE_UNLOADED", events
    assert "STATE_UNLOADING" in states and all(v == "v1" for _, v, _ in events)


def test_metrics_after_a_scripted_workload(srv):
    # 3 adapter names get their own label; whichever test came first, these three leave none
    for name in ("label-1", "label-2", "label-3"):
        srv.publish(name, seed=51)
        gen(srv.stub, adapter=name, max_tokens=2)
    for name in ("m-1", "m-2", "m-3", "m-4"):
        srv.publish(name, seed=50)
    before = srv.metrics()
    # 2 requests on each of 4 new adapters, all labelled "other"; one constrained base request
    for name in ("m-1", "m-2", "m-3", "m-4"):
        for _ in range(2):
            gen(srv.stub, adapter=name, max_tokens=5)
    gen(srv.stub, fmt=spb.ResponseFormat(regex=spb.RegexFormat(pattern="[0-9]{3}")), max_tokens=8)
    after = srv.metrics()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta(series("tunewire_serving_requests_total", adapter="other", frontend="grpc", outcome="ok")) == 8
    assert not any(k.startswith("tunewire_serving_requests_total") and 'adapter="m-' in k for k in after)
    assert delta(series("tunewire_serving_tokens_total", adapter="other", frontend="grpc", kind="completion")) == 40
    assert delta(series("tunewire_serving_ttft_seconds_count", adapter="other", frontend="grpc")) == 8
    assert delta('tunewire_serving_adapter_cache_total{result="miss"}') == 4
    assert delta('tunewire_serving_adapter_cache_total{result="hit"}') == 4
    assert delta("tunewire_serving_adapter_evictions_total") >= 1  # 4 adapters, 3 slots
    assert delta('tunewire_serving_adapter_load_seconds_count{trigger="lazy"}') == 4
    for phase in ("validate", "room", "engine"):  # each of the 4 loads timed in every phase
        assert delta(f'tunewire_serving_adapter_load_phase_seconds_count{{phase="{phase}"}}') == 4
    assert after["tunewire_serving_adapters_resident"] == 3
    assert delta('tunewire_serving_structured_output_total{format="regex",valid="true"}') == 1
    assert delta(series("tunewire_serving_requests_total", adapter="base", frontend="grpc", outcome="ok")) == 1
    for key in ("tunewire_serving_schema_compile_seconds_count", "tunewire_serving_admission_queue_depth",
                "vllm:"):
        assert any(k.startswith(key) for k in after), key
    for name in ("m-1", "m-2", "m-3", "m-4", "label-1", "label-2", "label-3"):
        try:
            srv.stub.UnloadAdapter(spb.UnloadAdapterRequest(name=name))
        except grpc.RpcError:
            pass  # evicted: nothing loaded to unload


def test_classify_with_a_published_head(srv):
    from test_classify import TEXTS, by_hand, train_head

    head = train_head(srv.model, srv.tmp)
    adapters.publish(head, srv.store, "region", base_model_dir=srv.model)
    r = srv.stub.Classify(spb.ClassifyRequest(head="region", texts=TEXTS), timeout=120)
    assert (r.head, r.head_version) == ("region", "v1")
    expected = by_hand(head, srv.model, TEXTS)
    assert [c.label for c in r.results] == [label for label, _ in expected]
    for c, (_, probs) in zip(r.results, expected):
        assert [s.probability for s in c.scores] == pytest.approx(probs, abs=1e-5)
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


def test_model_info_reports_the_engine_device_and_settings(srv):
    import torch

    info = srv.stub.GetModelInfo(spb.GetModelInfoRequest(), timeout=10)
    assert not torch.cuda.is_available()  # this machine: the CPU backend, in float32 (dtype auto)
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.gpu_memory_utilization == pytest.approx(0.9)  # the defaults, reported as set
    assert (info.tensor_parallel_size, info.enable_prefix_caching, info.max_num_batched_tokens) == \
        (1, True, 0)
    assert info.model == str(srv.model) and (info.max_model_len, info.max_loras, info.max_cpu_loras) == \
        (512, 2, 3)
