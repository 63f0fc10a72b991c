"""Publishing a finished job's artifact, and the handoff to serving.

LoRA adapters and classifier heads are copied into the adapter store as the next version of
their name, with a checksummed manifest (`tunewire.adapters.publish`); a LoRA adapter is then
handed to serving (`Handoff.load_adapter`: staged on every replica, recorded as the name's
deployment only when all of them accepted it, then awaited until every replica serves it; the
result lists each replica's outcome), and when the job declares a JSON schema and a
validation file, serving also answers the validation prompts with and without the adapter
(JSON parse rate, schema-valid rate, field accuracy). A full fine-tuned model stays in the job
directory: serving is started on it rather than hot-loading it.

`publish` returns the job's final (state, result, error); the job service records them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from trainer_service.data_rows import load_examples
from trainer_service.spec import JobSpec
from tunewire import adapters, evals
from tunewire import reasons as R
from tunewire.errors import TunewireError

log = logging.getLogger("tunewire.trainer.publisher")


class HandoffError(Exception):
    """Serving refused or could not be reached; the message says why."""


@dataclass(frozen=True)
class ReplicaOutcome:
    """One serving replica's part in a handoff (JobResult.replicas)."""
    address: str
    replica_id: str = ""
    loaded: bool = False      # staged: validated and resident on it
    serving: bool = False     # it serves the recorded deployment (its generation reached it)
    reason: str = ""          # its refusal's ErrorInfo reason, or why it is not serving
    message: str = ""


@dataclass(frozen=True)
class HandoffOutcome:
    replicas: tuple[ReplicaOutcome, ...]
    deployment_generation: int = 0   # the record's generation; 0 = nothing recorded (refused)
    message: str = ""

    @property
    def refused(self) -> bool:
        return not self.deployment_generation


class Handoff(Protocol):
    async def load_adapter(self, *, name: str, version: str, uri: str, manifest_sha256: str,
                           adapter_store: Path, source: str) -> HandoffOutcome: ...
    async def generate(self, *, adapter: str, prompt: str, messages: list[dict], max_tokens: int) -> str: ...


async def publish(spec: JobSpec, job_id: str, artifact: Path, metrics: dict[str, float], *,
                  adapter_store: Path, handoff: Handoff | None, emit: Callable,
                  cancelled: Callable[[], bool]) -> tuple[str, dict | None, TunewireError | None]:
    if spec.method == "full":
        emit("ADAPTER_PUBLISHED", f"full model ready at {artifact}", {"uri": str(artifact)})
        return "SUCCEEDED", {"adapter": spec.adapter_name, "version": "", "uri": str(artifact),
                             "metrics": metrics, "serving_loaded": False,
                             "serving_message": f"full model: start serving with --model {artifact}"}, None
    try:
        dest, manifest = await asyncio.to_thread(
            adapters.publish, artifact, adapter_store, spec.adapter_name,
            base_model_dir=spec.base_model, source_job=f"trainingJobs/{job_id}")
    except Exception as e:  # noqa: BLE001 - any failure here fails the job, with the reason
        log.exception("publish failed", extra={"job": job_id})
        return "FAILED", None, TunewireError(R.PUBLISH_FAILED, f"{type(e).__name__}: {e}")
    result = {"adapter": spec.adapter_name, "version": manifest.version, "uri": str(dest),
              "manifest_sha256": manifest.sha256, "metrics": metrics,
              "serving_loaded": False,
              "serving_message": "publish_only: stored, not handed to serving" if spec.publish_only
              else "no serving endpoint configured"}
    emit("ADAPTER_PUBLISHED", f"published {spec.adapter_name}@{manifest.version}",
         {"uri": str(dest), "version": manifest.version, "manifest_sha256": manifest.sha256})
    if cancelled():  # cancelled while publishing: no handoff
        return "CANCELLED", result, None
    if spec.method == "feature_extraction":
        result["serving_message"] = "classifier heads are published to the store only"
        return "SUCCEEDED", result, None
    if handoff is None or spec.publish_only:  # publish_only: the store only, serving never asked
        return "SUCCEEDED", result, None
    try:
        outcome = await handoff.load_adapter(name=spec.adapter_name, version=manifest.version,
                                             uri=str(dest), manifest_sha256=manifest.sha256,
                                             adapter_store=adapter_store, source=f"trainingJobs/{job_id}")
    except HandoffError as e:
        outcome = HandoffOutcome(replicas=(), message=str(e))
    result.update(serving_message=outcome.message, deployment_generation=outcome.deployment_generation,
                  replicas=[asdict(r) for r in outcome.replicas])
    if outcome.refused:  # nothing recorded: every replica keeps serving the previous deployment
        emit("SERVING_LOAD_FAILED", outcome.message)
        return "FAILED", result, TunewireError(R.HANDOFF_FAILED, f"serving did not load the adapter "
                                               f"(it stays in the store at {dest}): {outcome.message}")
    result.update(serving_loaded=True)
    emit("SERVING_LOADED", outcome.message, {"deployment_generation": str(outcome.deployment_generation)})
    if spec.json_schema and spec.validation_data:
        result["metrics"] = {**metrics, **await json_eval(spec, handoff, emit)}
    return "SUCCEEDED", result, None


def json_cases(path: str, limit: int) -> list[tuple[str, list[dict], object]]:
    """(prompt, chat messages before the answer, reference JSON) for the first `limit` rows."""
    cases = []
    for r in load_examples(path, source="validation")[:limit]:
        ref = r["completion"] if "prompt" in r else r["messages"][-1]["content"]
        cases.append((r.get("prompt", ""), r.get("messages", [])[:-1], json.loads(ref)))
    return cases


def score_cases(tuned: list[str], base: list[str], cases, schema) -> dict[str, float]:
    refs = [c[2] for c in cases]
    t, b = evals.score_json(tuned, refs, schema), evals.score_json(base, refs, schema)
    return {**{f"json_{k}": v for k, v in t.items()}, **{f"base_json_{k}": v for k, v in b.items()}}


def describe(metrics: dict[str, float], n: int, how: str) -> str:
    return (f"JSON eval on {n} held-out examples ({how}): valid JSON {metrics['json_valid_json_rate']:.0%} "
            f"(base {metrics['base_json_valid_json_rate']:.0%}), field accuracy "
            f"{metrics['json_field_accuracy']:.0%} (base {metrics['base_json_field_accuracy']:.0%})")


async def json_eval(spec: JobSpec, handoff: Handoff, emit: Callable, limit: int = 50) -> dict[str, float]:
    """Base model vs the new adapter on the validation set, through serving (greedy, free text):
    JSON parse rate, schema-valid rate, field accuracy, exact match."""
    try:
        cases = await asyncio.to_thread(json_cases, spec.validation_data, limit)
        schema = json.loads(spec.json_schema)

        # Room for twice the longest reference (a token is at least a character, mostly more):
        # enough to see a right answer end, without running into a small serving context.
        max_tokens = min(256, 2 * max((len(json.dumps(c[2])) for c in cases), default=64) + 16)

        async def answers(adapter: str) -> list[str]:
            return await asyncio.gather(*(handoff.generate(adapter=adapter, prompt=p, messages=m,
                                                           max_tokens=max_tokens) for p, m, _ in cases))

        metrics = score_cases(await answers(spec.adapter_name), await answers(""), cases, schema)
    except (HandoffError, ValueError, KeyError, TunewireError) as e:
        emit("EVAL_COMPLETED", f"JSON eval skipped: {e}")
        return {}
    emit("EVAL_COMPLETED", describe(metrics, len(cases), "through serving"), {}, metrics)
    return metrics
