"""A fleet, not a replica: serving replicas sharing one adapter store follow one deployment record.

Real serving subprocesses (tiny random Llama, vLLM CPU) on one store: replicas A and B serve the
whole module; a third (C) starts later, and a refusing replica (R: a smaller max_lora_rank) joins
the handoff test. Every check goes through real gRPC: deployments made on one replica reach the
other within the lag bound (the measured lags are printed: docs/serving.md quotes them), a
rollback sticks across a restart and reaches a replica started later, and a trainer handoff
(the real ServingHandoff) that one replica refuses records nothing, so the old version keeps
serving everywhere. Each test deploys an adapter name of its own, so they pass in any order.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import grpc
import pytest

from harness import start_service
from test_serving import Serving
from trainer_service.server import ServingHandoff
from tunewire import deployments
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LAG_BOUND_S = 2.0  # the bound on loopback; the default poll is 0.25 s


class Replica:
    def __init__(self, fleet: Fleet, replica_id: str, *flags: str):
        self.replica_id = replica_id
        self.svc = start_service(
            "serving", fleet.tmp, "--model", str(fleet.model), "--adapter-store", str(fleet.store),
            "--max-model-len", "512", "--enforce-eager", "--max-loras", "2", "--max-cpu-loras", "4",
            "--drain-seconds", "0.5", "--replica-id", replica_id, *flags)
        self.channel = grpc.insecure_channel(self.svc.address)
        self.stub = serving_pb2_grpc.ServingServiceStub(self.channel)

    def ready(self, timeout: float = 300) -> Replica:
        self.svc.wait_serving(timeout)
        return self

    def stop(self) -> None:
        self.channel.close()
        assert self.svc.stop() == 0, self.svc.log()[-3000:]

    def generation(self) -> int:
        return self.stub.GetModelInfo(spb.GetModelInfoRequest(), timeout=10).deployment_generation

    def serves(self, name: str) -> str:
        """The version a request for the bare name gets."""
        return self.stub.Generate(spb.GenerateRequest(
            adapter=name, prompt="alice is", sampling=spb.SamplingParams(max_tokens=2)),
            timeout=120).adapter_version

    def deploy(self, name: str, version: str) -> int:
        r = self.stub.LoadAdapter(spb.LoadAdapterRequest(name=name, version=version), timeout=120)
        assert r.adapter.version == version and r.adapter.active and r.deployment_generation > 0
        assert r.adapter.deployment_generation == r.deployment_generation
        return r.deployment_generation

    def wait_generation(self, generation: int, timeout: float = 10) -> float:
        """Seconds until this replica reports `generation` applied (polled every 10 ms)."""
        start = time.monotonic()
        while (seen := self.generation()) < generation:
            assert time.monotonic() - start < timeout, f"{self.replica_id} at {seen}, not {generation}"
            time.sleep(0.01)
        return time.monotonic() - start


class Fleet:
    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model, self.store = tmp, model, tmp / "adapters"
        self.store.mkdir()
        self._n = 0
        # both start at once: their engines' start-up overlaps
        a, b = Replica(self, "a"), Replica(self, "b")
        self.a, self.b = a.ready(), b.ready()

    publish = Serving.publish  # a random peft adapter as the next version in the store


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    f = Fleet(tmp_path_factory.mktemp("fleet"), Path(tiny_model_dir))
    yield f
    for r in (f.a, f.b):
        r.stop()


# --------------------------------------------------------------------------------------------
def test_a_deployment_on_one_replica_reaches_the_other_within_the_bound(fleet):
    for seed in range(3):
        fleet.publish("lag", seed=100 + seed)
    lags = []
    for i, version in enumerate(["v1", "v2", "v3", "v1", "v3", "v2", "v1", "v2"]):
        src, dst = (fleet.a, fleet.b) if i % 2 == 0 else (fleet.b, fleet.a)
        fleet.b.serves("lag")  # the name's version is resident on both: the flip is warm
        generation = src.deploy("lag", version)
        lags.append(dst.wait_generation(generation, timeout=LAG_BOUND_S + 5))
        assert dst.serves("lag") == version and src.serves("lag") == version
        listed = {f"{x.name}@{x.version}": x for x in dst.stub.ListAdapters(spb.ListAdaptersRequest()).adapters}
        assert listed[f"lag@{version}"].active and listed[f"lag@{version}"].deployment_generation == generation
    # the trainer's way: the record written straight into the store; both replicas follow it
    followed = []
    for version in ["v3", "v1", "v2", "v3", "v1", "v2"]:
        written = time.monotonic()
        generation = deployments.record(fleet.store, "lag", version, source="test").generation
        for r in (fleet.a, fleet.b):
            r.wait_generation(generation, timeout=LAG_BOUND_S + 5)
            followed.append(time.monotonic() - written)
        assert fleet.a.serves("lag") == fleet.b.serves("lag") == version
    for what, xs in (("LoadAdapter on the other replica", lags), ("record written to the store", followed)):
        print(f"\nFLEET LAG after {what} (s, n={len(xs)}, poll 0.25 s): min {min(xs):.3f} median "
              f"{statistics.median(xs):.3f} max {max(xs):.3f}: {[round(x, 3) for x in xs]}")
    assert max(lags + followed) <= LAG_BOUND_S, (lags, followed)
    fleet.a.wait_generation(fleet.b.deploy("lag", "v1"))
    record = deployments.read(fleet.store)
    assert record.adapters["lag"].version == "v1" and record.adapters["lag"].source == "LoadAdapter on b"
    assert fleet.a.generation() == fleet.b.generation() == record.generation


def test_a_rollback_sticks_across_a_restart_and_reaches_a_replica_started_later(fleet):
    fleet.publish("roll", seed=1)
    fleet.publish("roll", seed=2)
    fleet.b.wait_generation(fleet.a.deploy("roll", "v2"))
    assert fleet.a.serves("roll") == fleet.b.serves("roll") == "v2"
    rollback = fleet.b.deploy("roll", "v1")  # through the other replica
    fleet.a.wait_generation(rollback)
    assert fleet.a.serves("roll") == fleet.b.serves("roll") == "v1"
    # restart A: the newest in the store is v2, the deployment says v1
    fleet.a.stop()
    fleet.a = Replica(fleet, "a").ready()
    assert fleet.a.generation() >= rollback  # applied before health said SERVING
    assert fleet.a.serves("roll") == "v1"
    # a replica started later: v1 from its first request
    c = Replica(fleet, "c").ready()
    try:
        assert c.generation() == deployments.read(fleet.store).generation
        assert c.stub.GetModelInfo(spb.GetModelInfoRequest()).replica_id == "c"
        assert c.serves("roll") == "v1"
    finally:
        c.stop()
    assert fleet.b.serves("roll") == "v1"
    # staging loads a version on one replica only: nothing flips, nothing is recorded
    before = deployments.read(fleet.store).generation
    staged = fleet.a.stub.LoadAdapter(spb.LoadAdapterRequest(name="roll", version="v2", stage=True))
    assert staged.deployment_generation == 0 and not staged.adapter.active
    assert staged.adapter.state == spb.Adapter.STATE_READY
    assert deployments.read(fleet.store).generation == before and fleet.a.serves("roll") == "v1"


def test_a_handoff_one_replica_refuses_leaves_the_previous_deployment_everywhere(fleet):
    fleet.publish("hand", r=8, seed=3)
    r = Replica(fleet, "r", "--max-lora-rank", "8")  # starts while v1 is deployed
    v1 = fleet.a.deploy("hand", "v1")
    r.ready()
    replicas = [fleet.a, fleet.b, r]
    try:
        for x in replicas:
            x.wait_generation(v1)
        assert [x.serves("hand") for x in replicas] == ["v1"] * 3
        big = fleet.publish("hand", r=16, seed=4)  # v2: over R's max_lora_rank
        handoff = ServingHandoff(",".join(x.svc.address for x in replicas), 60)

        def hand(version: str, path: Path):
            return asyncio.run(handoff.load_adapter(name="hand", version=version, uri=str(path),
                                                    manifest_sha256="", adapter_store=fleet.store,
                                                    source="trainingJobs/t1"))

        before = deployments.read(fleet.store)
        out = hand("v2", big)
        assert out.refused and out.deployment_generation == 0, out
        assert deployments.read(fleet.store) == before  # nothing recorded
        by_id = {o.replica_id: o for o in out.replicas}
        assert set(by_id) == {"a", "b", "r"}
        assert by_id["r"].address == r.svc.address and not by_id["r"].loaded
        assert by_id["r"].reason == "ADAPTER_RANK_TOO_LARGE" and f"{r.svc.address} (r)" in out.message
        assert by_id["a"].loaded and by_id["b"].loaded and not any(o.serving for o in out.replicas)
        # every replica has applied the whole record, and nothing new was recorded: none can flip
        assert [x.generation() for x in replicas] == [before.generation] * 3
        assert [x.serves("hand") for x in replicas] == ["v1"] * 3
        # recorded anyway (by hand, skipping the staging): R keeps serving v1, shows v2 FAILED, and
        # does not claim the generation; A and B follow
        forced = deployments.record(fleet.store, "hand", "v2", source="test").generation
        for x in (fleet.a, fleet.b):
            x.wait_generation(forced)
        assert fleet.a.serves("hand") == fleet.b.serves("hand") == "v2"
        deadline = time.monotonic() + LAG_BOUND_S + 5
        while (failed := {f"{x.name}@{x.version}": x for x in r.stub.ListAdapters(
                spb.ListAdaptersRequest()).adapters}).get("hand@v2") is None or \
                failed["hand@v2"].state != spb.Adapter.STATE_FAILED:
            assert time.monotonic() < deadline, failed.get("hand@v2")
            time.sleep(0.05)
        assert r.serves("hand") == "v1" and r.generation() == forced - 1
        assert failed["hand@v2"].state == spb.Adapter.STATE_FAILED and not failed["hand@v2"].active
        assert failed["hand@v2"].failure_reason == "ADAPTER_RANK_TOO_LARGE"
        assert failed["hand@v1"].active and failed["hand@v1"].deployment_generation == v1
        # a version every replica accepts is deployed everywhere, each replica's outcome listed
        ok = hand("v3", fleet.publish("hand", r=8, seed=5))
        assert not ok.refused and ok.deployment_generation > before.generation, ok
        assert all(o.loaded and o.serving for o in ok.replicas) and len(ok.replicas) == 3, ok
        assert deployments.read(fleet.store).adapters["hand"].source == "trainingJobs/t1"
        assert [x.serves("hand") for x in replicas] == ["v3"] * 3
    finally:
        r.stop()
