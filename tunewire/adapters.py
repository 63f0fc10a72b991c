"""The adapter store and its manifests, shared by the trainer (writes) and serving (verifies).

Layout: `<store>/<adapter>/<version>/{adapter_model.safetensors, adapter_config.json, training.json,
manifest.json}`. The manifest records the sha256 of every file, the fingerprint of the base model
the adapter was trained on, its rank and target modules, the job that made it, and how it was
trained (`training`: the recipe's training.json, e.g. {"precision": "bf16", "device": "cuda",
"quantization": "none"}; {} for artifacts written before it existed). Serving checks all of that
against its own base model and limits before the engine ever sees the adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunewire import reasons as R
from tunewire.errors import TunewireError

MANIFEST = "manifest.json"
CLASSIFIER = "classifier.json"  # marks a feature-extraction head (see recipe_classifier)
TRAINING_INFO = "training.json"  # how the artifact was trained (precision, device, ...): the recipes write it
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
VERSION_RE = re.compile(r"^v[0-9]{1,9}$")
# Config keys that change with the tool that saved the model, not with the model itself.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the model's config (minus volatile keys) and its tokenizer files."""
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    canon = {k: v for k, v in config.items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(canon, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (d / name).is_file():
            h.update(name.encode())
            h.update(sha256_file(d / name).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    name: str                          # adapter name
    version: str                       # "v1", "v2", ...
    base_model_fingerprint: str        # see base_model_fingerprint()
    rank: int                          # LoRA r
    target_modules: tuple[str, ...]    # module names the adapter touches
    files: dict                        # file name -> sha256
    source_job: str                    # "trainingJobs/{id}" or ""
    created_unix: float                # when it was published
    sha256: str                        # sha256 of manifest.json itself
    kind: str = "lora"                 # "lora" adapter or feature-extraction "classifier" head
    training: dict = field(default_factory=dict)  # TRAINING_INFO's content; {} when absent


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise TunewireError(R.ADAPTER_CONFIG_MISSING, f"{path} does not exist")
    return json.loads(path.read_text())


def write_manifest(adapter_dir: str | Path, *, name: str, version: str, base_model_dir: str | Path,
                   source_job: str = "") -> Manifest:
    """Hashes the adapter's files and writes manifest.json beside them. A directory with a
    classifier.json is a feature-extraction head (kind "classifier", rank 0), else a LoRA adapter."""
    d = Path(adapter_dir)
    if (d / CLASSIFIER).is_file():
        kind, rank, targets = "classifier", 0, []
    else:
        cfg = _adapter_config(d)
        kind, rank = "lora", int(cfg["r"])
        targets = cfg.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        # peft writes "all-linear" resolved to full paths (model.layers.0.self_attn.q_proj):
        # the module kind is what an engine supports or not.
        targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    training = json.loads((d / TRAINING_INFO).read_text()) if (d / TRAINING_INFO).is_file() else {}
    if not isinstance(training, dict):
        raise TunewireError(R.ADAPTER_MANIFEST_INVALID, f"{d / TRAINING_INFO} is not a JSON object")
    body = {
        "name": name, "version": version,
        "base_model_fingerprint": base_model_fingerprint(base_model_dir),
        "kind": kind, "rank": rank, "target_modules": targets, "files": files,
        "source_job": source_job, "created_unix": time.time(), "training": training,
    }
    text = json.dumps(body, indent=2, sort_keys=True)
    (d / MANIFEST).write_text(text)
    return read_manifest(d, verify_files=False)


def read_manifest(adapter_dir: str | Path, *, verify_files: bool = True) -> Manifest:
    """Reads manifest.json; with verify_files, every listed file must hash as recorded."""
    d = Path(adapter_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise TunewireError(R.ADAPTER_MANIFEST_MISSING, f"{path} does not exist")
    raw = path.read_bytes()
    try:
        body = json.loads(raw)
        m = Manifest(name=body["name"], version=body["version"],
                     base_model_fingerprint=body["base_model_fingerprint"], rank=int(body["rank"]),
                     target_modules=tuple(body["target_modules"]), files=dict(body["files"]),
                     source_job=body.get("source_job", ""),
                     created_unix=float(body.get("created_unix", 0)),
                     sha256=hashlib.sha256(raw).hexdigest(), kind=body.get("kind", "lora"),
                     training=dict(body.get("training", {})))
    except (ValueError, KeyError, TypeError) as e:
        raise TunewireError(R.ADAPTER_MANIFEST_INVALID, f"{path}: {e}") from e
    if verify_files:
        needed = CLASSIFIER if m.kind == "classifier" else "adapter_config.json"
        if needed not in m.files:
            raise TunewireError(R.ADAPTER_MANIFEST_INVALID, f"manifest lists no {needed}")
        for fname, digest in m.files.items():
            f = d / fname
            if "/" in fname or not f.is_file():
                raise TunewireError(R.ADAPTER_FILE_MISSING, f"{fname} listed but missing")
            if sha256_file(f) != digest:
                raise TunewireError(R.ADAPTER_CHECKSUM_MISMATCH, f"{fname} does not match its sha256")
    return m


def resolve_in_store(store_root: str | Path, uri: str) -> Path:
    """Maps a client-given adapter URI to a directory inside the store; nothing outside it."""
    root = Path(store_root).resolve()
    p = Path(uri.removeprefix("file://"))
    p = (p if p.is_absolute() else root / p).resolve()
    if p != root and root not in p.parents:
        raise TunewireError(R.ADAPTER_URI_OUTSIDE_STORE, f"{uri} is outside the adapter store",
                            field_violations={"uri": "must lie inside the adapter store"})
    if not p.is_dir():
        raise TunewireError(R.ADAPTER_NOT_IN_STORE, f"no adapter directory at {uri}")
    return p


def next_version(store_root: str | Path, name: str) -> str:
    d = Path(store_root) / name
    nums = [int(p.name[1:]) for p in d.glob("v*") if VERSION_RE.match(p.name)] if d.is_dir() else []
    return f"v{max(nums, default=0) + 1}"


def publish(src_dir: str | Path, store_root: str | Path, name: str, *, base_model_dir: str | Path,
            source_job: str = "") -> tuple[Path, Manifest]:
    """Copies an adapter into the store as the next version of `name`, with its manifest.

    The copy lands in a temporary directory first and is renamed into place, so a reader never
    sees a half-written version.
    """
    if not NAME_RE.match(name):
        raise TunewireError(R.ADAPTER_NAME_INVALID, f"bad adapter name {name!r}")
    root = Path(store_root)
    (root / name).mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # another publisher may take the same version number: retry with the next
        version = next_version(root, name)
        tmp = root / name / f".tmp-{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src_dir, tmp)
        write_manifest(tmp, name=name, version=version, base_model_dir=base_model_dir,
                       source_job=source_job)
        try:
            os.rename(tmp, root / name / version)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        dest = root / name / version
        return dest, read_manifest(dest)
    raise TunewireError(R.ADAPTER_PUBLISH_CONFLICT, f"could not allocate a version of {name}")
