"""The deployment record (tunewire/deployments.py): atomic, locked writes in the shared store;
and a handoff's outcome (each replica's part, the generation) in the job's JobResult.

Several processes writing at once never lose a write and never reuse a generation; a torn or
garbage record is an error, never "nothing deployed" (that would roll every name back).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tunewire import deployments
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(60)


def test_missing_record_is_generation_zero(tmp_path):
    d = deployments.read(tmp_path)
    assert d.generation == 0 and d.adapters == {}
    assert deployments.stamp(tmp_path) is None


def test_record_round_trips_and_keeps_other_names(tmp_path):
    a = deployments.record(tmp_path, "extract", "v2", source="trainingJobs/j1")
    b = deployments.record(tmp_path, "other", "v1", pinned=True)
    assert (a.generation, b.generation) == (1, 2)
    d = deployments.read(tmp_path)
    assert d.generation == 2
    assert d.adapters["extract"].version == "v2" and d.adapters["extract"].generation == 1
    assert d.adapters["extract"].source == "trainingJobs/j1" and not d.adapters["extract"].pinned
    assert d.adapters["other"].pinned and d.adapters["other"].generation == 2
    # the pin stays with the version (None = keep), and goes when the version changes
    assert deployments.record(tmp_path, "other", "v1").adapters["other"].pinned
    assert not deployments.record(tmp_path, "other", "v2").adapters["other"].pinned
    # the store's listings skip it: a dot name is no adapter name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([deployments.LOCK, deployments.RECORD])


def test_each_write_changes_the_stamp(tmp_path):
    deployments.record(tmp_path, "a", "v1")
    s1 = deployments.stamp(tmp_path)
    deployments.record(tmp_path, "a", "v1")  # the same content length: the inode still changes
    assert deployments.stamp(tmp_path) != s1


@pytest.mark.parametrize("content", [b"", b"{\"generation\": 3, \"adap", b"\x00\xff garbage",
                                     b"[]", b'{"generation": -1, "adapters": {}}',
                                     b'{"generation": 1, "adapters": {"x": {"version": "latest"}}}',
                                     b'{"generation": 1, "adapters": {"../x": {"version": "v1"}}}'])
def test_a_torn_or_garbage_record_is_an_error(tmp_path, content):
    (tmp_path / deployments.RECORD).write_bytes(content)
    with pytest.raises(TunewireError, match="unreadable"):
        deployments.read(tmp_path)
    with pytest.raises(TunewireError):  # and nobody writes over it as if it were empty
        deployments.record(tmp_path, "a", "v1")
    assert (tmp_path / deployments.RECORD).read_bytes() == content


def test_bad_names_and_versions_are_refused(tmp_path):
    with pytest.raises(TunewireError):
        deployments.record(tmp_path, "Bad/Name", "v1")
    with pytest.raises(TunewireError):
        deployments.record(tmp_path, "a", "latest")
    assert deployments.read(tmp_path).generation == 0


def _writer(store: str, worker: int, n: int, out) -> None:
    gens = [deployments.record(store, f"w{worker}", f"v{i + 1}").generation for i in range(n)]
    out.put((worker, gens))


def test_concurrent_writers_in_several_processes_never_lose_a_write(tmp_path):
    workers, n = 4, 25
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=50) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    # every write got its own generation, and each writer's generations strictly increase
    every = sorted(g for gens in results.values() for g in gens)
    assert every == list(range(1, workers * n + 1))
    for gens in results.values():
        assert gens == sorted(gens) and len(set(gens)) == n
    d = deployments.read(tmp_path)
    assert d.generation == workers * n
    # no write was lost: each name holds its writer's last version, at that write's generation
    for w, gens in results.items():
        assert d.adapters[f"w{w}"].version == f"v{n}" and d.adapters[f"w{w}"].generation == gens[-1]
    assert not list(tmp_path.glob(".deployments.tmp-*"))


def _publish_with(tmp_path, outcome):
    """publisher.publish of a minimal LoRA artifact with a handoff answering `outcome`; the job's
    (state, JobResult proto, error)."""
    import asyncio
    import json

    from trainer_service import publisher
    from trainer_service.spec import JobSpec
    from tunewire.trainer.v1 import trainer_pb2 as tpb

    base, art = tmp_path / "base", tmp_path / "artifact"
    base.mkdir()
    art.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (art / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    (art / "adapter_model.safetensors").write_bytes(b"weights")

    class Handoff:
        async def load_adapter(self, **kw):
            assert kw["source"] == "trainingJobs/j1" and kw["adapter_store"] == tmp_path / "store"
            return outcome

    spec = JobSpec(base_model=str(base), training_data="x.jsonl", adapter_name="ext")
    events = []
    state, result, error = asyncio.run(publisher.publish(
        spec, "j1", art, {"loss": 1.0}, adapter_store=tmp_path / "store", handoff=Handoff(),
        emit=lambda *a: events.append(a), cancelled=lambda: False))
    return state, tpb.JobResult(**result), error, events


def test_the_handoff_outcome_reaches_the_job_result(tmp_path):
    from trainer_service.publisher import HandoffOutcome, ReplicaOutcome

    ok = HandoffOutcome(replicas=(ReplicaOutcome("10.0.0.1:50052", "serving-0", True, True),
                                  ReplicaOutcome("10.0.0.2:50052", "serving-1", True, False, "", "late")),
                        deployment_generation=4, message="deployed")
    state, result, error, events = _publish_with(tmp_path, ok)
    assert state == "SUCCEEDED" and error is None and result.serving_loaded
    assert result.deployment_generation == 4 and result.serving_message == "deployed"
    assert [(r.replica_id, r.loaded, r.serving, r.message) for r in result.replicas] == [
        ("serving-0", True, True, ""), ("serving-1", True, False, "late")]
    assert events[-1][0] == "SERVING_LOADED"


def test_a_refused_handoff_fails_the_job_with_each_replicas_outcome(tmp_path):
    from trainer_service.publisher import HandoffOutcome, ReplicaOutcome

    refused = HandoffOutcome(replicas=(ReplicaOutcome("10.0.0.1:50052", "serving-0", True),
                                       ReplicaOutcome("10.0.0.2:50052", "serving-1", False, False,
                                                      "ADAPTER_RANK_TOO_LARGE", "rank 64 > 16")),
                             message="1 of 2 serving replicas refused ext@v1")
    state, result, error, events = _publish_with(tmp_path, refused)
    assert state == "FAILED" and error.reason == "HANDOFF_FAILED" and "refused" in error.message
    assert not result.serving_loaded and result.deployment_generation == 0
    assert result.replicas[1].reason == "ADAPTER_RANK_TOO_LARGE" and not result.replicas[1].loaded
    assert events[-1][0] == "SERVING_LOAD_FAILED"
