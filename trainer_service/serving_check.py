"""Could serving load the adapter this LoRA job will make? Checked at create, not after training.

Serving refuses a LoRA adapter whose rank is over its max_lora_rank, that targets a projection it
does not wrap, that uses DoRA or trained biases, or that was trained on another base model
(serving_service/adapter_checks.py), and says so in GetModelInfo (`max_lora_rank`,
`lora_deployable_target_modules`, `lora_dora_supported`, `lora_bias_supported`,
`base_model_fingerprint`). The trainer asks every serving replica (ServingHandoff.capabilities in
server.py), keeps what all of them accept (`ServingCapabilities.common`), and `check_job` refuses a
job none could load with FAILED_PRECONDITION INCOMPATIBLE_WITH_SERVING, one BadRequest field
violation per field at fault. A `publish_only` job (store only, no handoff) is not checked.

    caps = await handoff.capabilities()          # SERVING_UNAVAILABLE when a replica is unreachable
    await asyncio.to_thread(check_job, spec, caps)  # reads config.json, safetensors headers, tokenizer

`job_targets` says which module names peft will target, without loading weights (the trainer
process imports no torch), exactly as the manifest will list them (the last dotted part):
explicit names as given; none = peft's default for config.json's `model_type` (peft's own table,
read from its source, not imported); "all-linear" = every 2-D weight in the checkpoint's
safetensors headers but embeddings and the output head (peft: every Linear/Conv1D but the output
layer). Where it cannot tell (no safetensors files, a default that is a regex), it returns None
and the targets are left to serving's check at the handoff.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

from trainer_service.spec import JobSpec
from tunewire import reasons as R
from tunewire.adapters import base_model_fingerprint
from tunewire.errors import TunewireError

FIELD = "training_job."
# How long a create waits for each replica's GetModelInfo (answered from memory): a create is
# interactive, and an unreachable serving is SERVING_UNAVAILABLE, not a hung request.
CAPABILITIES_TIMEOUT_S = 5.0
# Leaf names of 2-D weights that are embeddings or the output head, not Linear layers (peft's
# all-linear skips them: embeddings are not Linear, the output layer is excluded by name).
NOT_LINEAR = ("embed", "wte", "wpe", "lm_head")


@dataclass(frozen=True)
class ServingCapabilities:
    """What serving loads, from GetModelInfo; `common` combines replicas."""
    base_model_fingerprints: frozenset[str]    # one per base model served (one in a sound fleet)
    max_lora_rank: int                         # largest rank accepted
    deployable_target_modules: frozenset[str] | None  # projections it wraps; None = not reported
    dora_supported: bool                       # loads DoRA adapters
    bias_supported: bool                       # loads adapters with trained biases
    replicas: tuple[str, ...] = ()             # the addresses asked, for messages

    @classmethod
    def common(cls, each: Sequence[ServingCapabilities]) -> ServingCapabilities:
        """What every one of `each` accepts (a job must be loadable by all replicas)."""
        reported = [c.deployable_target_modules for c in each if c.deployable_target_modules is not None]
        return cls(base_model_fingerprints=frozenset().union(*(c.base_model_fingerprints for c in each)),
                   max_lora_rank=min(c.max_lora_rank for c in each),
                   deployable_target_modules=frozenset.intersection(*reported) if reported else None,
                   dora_supported=all(c.dora_supported for c in each),
                   bias_supported=all(c.bias_supported for c in each),
                   replicas=tuple(r for c in each for r in c.replicas))


class CapabilitySource(Protocol):
    """Serving as the trainer's create sees it (ServingHandoff in server.py)."""
    async def capabilities(self) -> ServingCapabilities: ...


def check_job(spec: JobSpec, caps: ServingCapabilities) -> None:
    """Raises INCOMPATIBLE_WITH_SERVING naming every field serving could not load (blocking:
    hashes the base model's tokenizer, reads its config and safetensors headers)."""
    lora, bad = spec.lora, {}
    fingerprint = base_model_fingerprint(spec.base_model)
    if caps.base_model_fingerprints != {fingerprint}:
        served = ", ".join(sorted(f[:12] for f in caps.base_model_fingerprints))
        bad[FIELD + "base_model"] = (f"fingerprint {fingerprint[:12]} differs from the base model "
                                     f"serving serves ({served})")
    if lora.r > caps.max_lora_rank:
        bad[FIELD + "lora.r"] = f"rank {lora.r} exceeds serving's max_lora_rank {caps.max_lora_rank}"
    targets = job_targets(spec.base_model, lora.target_modules)
    if targets is not None and caps.deployable_target_modules is not None:
        outside = sorted(targets - caps.deployable_target_modules)
        if outside:
            how = ("all-linear resolves to " if lora.target_modules == ("all-linear",) else
                   "peft's default for this model is " if not lora.target_modules else "targets ")
            bad[FIELD + "lora.target_modules"] = (
                f"{how}{sorted(targets)}; serving cannot load {outside} (it deploys "
                f"{sorted(caps.deployable_target_modules)})")
    if lora.use_dora and not caps.dora_supported:
        bad[FIELD + "lora.use_dora"] = "serving cannot load DoRA adapters (vLLM)"
    if lora.bias != "none" and not caps.bias_supported:
        bad[FIELD + "lora.bias"] = (f"bias {lora.bias}: serving cannot load adapters with trained "
                                    "biases (vLLM); use none")
    if bad:
        raise TunewireError(
            R.INCOMPATIBLE_WITH_SERVING, "serving could not load this job's adapter: "
            + "; ".join(f"{k}: {v}" for k, v in bad.items())
            + " (publish_only trains for the adapter store only)", field_violations=bad,
            metadata={"serving_replicas": ",".join(caps.replicas)} if caps.replicas else None)


def job_targets(model_dir: str | Path, target_modules: Sequence[str]) -> frozenset[str] | None:
    """The module names (last dotted part) peft will put LoRA on; None = cannot tell."""
    if tuple(target_modules) == ("all-linear",):
        return linear_modules(model_dir)
    if target_modules:
        return frozenset(t.rsplit(".", 1)[-1] for t in target_modules)
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", "")
    default = peft_default_targets().get(model_type)
    return frozenset(default) if isinstance(default, (list, tuple, set)) else None


@cache
def peft_default_targets() -> dict[str, object]:
    """peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (model_type → names, or a regex
    string), read from the installed peft's source: importing peft would import torch."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return {}
    source = Path(spec.submodule_search_locations[0], "utils", "constants.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TRANSFORMERS_MODELS_TO_LORA_"
                                                "TARGET_MODULES_MAPPING" for t in node.targets):
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                return {}
    return {}


def linear_modules(model_dir: str | Path) -> frozenset[str] | None:
    """Leaf names of the checkpoint's Linear layers from its safetensors headers (no weights read)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    names = set()
    for f in files:
        for key, meta in _safetensors_header(f).items():
            if key.endswith(".weight") and len(meta.get("shape", ())) == 2:
                leaf = key[: -len(".weight")].rsplit(".", 1)[-1]
                if not any(n in leaf for n in NOT_LINEAR):
                    names.add(leaf)
    return frozenset(names)


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's header: tensor name → {dtype, shape, data_offsets} (and __metadata__)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header
