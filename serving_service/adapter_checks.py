"""What an adapter version must pass before the engine sees it, and how requests name one.

Nothing reaches vLLM unvalidated: on CPU a request naming an adapter path vLLM cannot load kills
the whole engine, so the registry (registry.py) runs `AdapterChecks.validate` before every
`add_lora` and marks only that version FAILED when it does not pass:

  * the manifest and the sha256 of every file it lists (tunewire/adapters.py), and of the
    manifest itself when the caller names one (LoadAdapter's manifest_sha256);
  * the version the directory holds, its kind (a LoRA adapter, not a classifier head);
  * the base-model fingerprint (also checked for heads, see classify.py);
  * no DoRA, no trained biases, rank <= max_lora_rank, target modules vLLM supports and this
    server wraps (`lora_target_modules`, see engine.wrapped_targets).

What a LoRA adapter must satisfy here is also what GetModelInfo reports (`lora_*` fields), so a
trainer refuses a job serving could not load at create (trainer_service/serving_check.py).

    checks = AdapterChecks(store_root, base_fingerprint, max_lora_rank=16, deployed_targets=())
    manifest = checks.validate(Path("var/adapters/extract/v2"), version="v2")
    name, version = parse_ref("extract@v2")

Errors are TunewireErrors with their reasons (tunewire/reasons.toml); no grpc here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from serving_service.engine import LORA_TARGETS, wrapped_targets
from tunewire import reasons as R
from tunewire.adapters import NAME_RE, VERSION_RE, Manifest, read_manifest
from tunewire.errors import TunewireError, invalid

# vLLM (0.32) refuses both at add_lora ("vLLM does not yet support DoRA", "Adapter bias is not
# supported") rather than serving other weights than were trained; refused here first, with a
# reason, and reported by GetModelInfo (lora_dora_supported, lora_bias_supported).
DORA_SUPPORTED = False
BIAS_SUPPORTED = False   # peft bias = "all" / "lora_only" (trained base biases), or lora_bias


def parse_ref(ref: str, field_name: str = "adapter") -> tuple[str, str]:
    """'name' → (name, ''); 'name@v3' → (name, 'v3'); anything else INVALID_ARGUMENT."""
    name, _, version = ref.partition("@")
    if not NAME_RE.match(name) or ("@" in ref and not VERSION_RE.match(version)):
        raise invalid(field_name, "must be name or name@version (name: [a-z0-9][a-z0-9_-]{0,62}, "
                      "version: v<N>)", R.ADAPTER_NAME_INVALID)
    return name, version


def latest_version(store_root: Path, name: str, field_name: str = "adapter") -> str:
    """The newest `v<N>` directory of `name` in the store; ADAPTER_NOT_FOUND when there is none
    (metadata names the request field the name came from)."""
    d = store_root / name
    nums = [int(p.name[1:]) for p in d.glob("v*") if VERSION_RE.match(p.name) and p.is_dir()] \
        if d.is_dir() else []
    if not nums:
        raise TunewireError(R.ADAPTER_NOT_FOUND, f"no adapter {name!r} is loaded or in the store",
                            metadata={field_name: name})
    return f"v{max(nums)}"


def check_base(m: Manifest, base_fingerprint: str) -> None:
    """BASE_MODEL_MISMATCH unless the version was trained on the served base model."""
    if m.base_model_fingerprint != base_fingerprint:
        raise TunewireError(R.BASE_MODEL_MISMATCH,
                            "the adapter was trained on a different base model than the one served",
                            metadata={"adapter_base": m.base_model_fingerprint[:16],
                                      "served_base": base_fingerprint[:16]})


@dataclass(frozen=True)
class AdapterChecks:
    store_root: Path
    base_fingerprint: str
    max_lora_rank: int
    deployed_targets: tuple[str, ...] = ()   # serving's lora_target_modules (() = every one)
    allowed_targets: frozenset[str] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "store_root", Path(self.store_root))
        object.__setattr__(self, "allowed_targets", wrapped_targets(self.deployed_targets))

    def validate(self, path: Path, *, version: str = "", manifest_sha256: str = "") -> Manifest:
        """The manifest of the LoRA version at `path`, every check passed (blocking: checksums)."""
        m = read_manifest(path)  # checksums of every file
        if manifest_sha256 and manifest_sha256 != m.sha256:
            raise TunewireError(R.ADAPTER_MANIFEST_SHA256_MISMATCH,
                                f"manifest sha256 is {m.sha256}, not {manifest_sha256}")
        if version and version != m.version:
            raise TunewireError(R.ADAPTER_VERSION_MISMATCH,
                                f"{path} holds version {m.version}, not {version}")
        if m.kind != "lora":
            raise TunewireError(R.ADAPTER_KIND_UNSUPPORTED,
                                f"{path} holds a {m.kind}, not a LoRA adapter (use Classify)")
        check_base(m, self.base_fingerprint)
        config = json.loads((path / "adapter_config.json").read_text())
        if config.get("use_dora") and not DORA_SUPPORTED:
            raise TunewireError(R.ADAPTER_DORA_UNSUPPORTED, "vLLM cannot serve DoRA adapters")
        bias = config.get("bias") or "none"
        if (bias != "none" or config.get("lora_bias")) and not BIAS_SUPPORTED:
            raise TunewireError(R.ADAPTER_BIAS_UNSUPPORTED,
                                f"vLLM cannot serve adapters with trained biases (bias={bias!r}"
                                f"{', lora_bias' if config.get('lora_bias') else ''}); train with "
                                "bias none", metadata={"bias": bias})
        if m.rank > self.max_lora_rank:
            raise TunewireError(R.ADAPTER_RANK_TOO_LARGE,
                                f"adapter rank {m.rank} exceeds max_lora_rank {self.max_lora_rank}")
        unsupported = set(m.target_modules) - set(LORA_TARGETS)
        if unsupported:
            raise TunewireError(R.ADAPTER_TARGET_UNSUPPORTED,
                                f"target modules {sorted(unsupported)} are not supported by the engine")
        undeployed = set(m.target_modules) - self.allowed_targets
        if undeployed:
            raise TunewireError(R.ADAPTER_TARGET_NOT_DEPLOYED,
                                f"target modules {sorted(undeployed)} are not among this server's "
                                f"lora_target_modules {sorted(self.allowed_targets)}")
        return m
