"""The adapter registry: which LoRA adapters this replica serves, under which engine ids.

Nothing reaches the engine unvalidated (vLLM on CPU dies on a request naming a bad adapter
path): `load` checks the store confinement, the manifest's checksums, the base-model
fingerprint, the rank limit and the target modules, then registers the adapter with the engine,
and only then makes the name resolvable. Loading a new version of a name registers it under a
fresh LoRA id and flips the name to it; the old version is removed once its in-flight requests
finish (vLLM can reuse stale cache entries when a name is reloaded in place).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import Gauge

from tunewire.adapters import NAME_RE, Manifest, read_manifest, resolve_in_store
from tunewire.errors import FailedPrecondition, NotFound, invalid

log = logging.getLogger("tunewire.serving.adapters")

# LoRA targets vLLM can apply to Llama-style models (q/k/v and gate/up are packed in vLLM).
SUPPORTED_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LOADED = Gauge("tunewire_serving_adapters_loaded", "Adapters loaded and routable in this replica.")


class LoraEngine(Protocol):
    async def add_lora(self, name: str, lora_id: int, path: str) -> None: ...
    async def remove_lora(self, lora_id: int) -> None: ...


@dataclass
class LoadedAdapter:
    name: str
    version: str
    path: Path
    lora_id: int
    manifest: Manifest
    load_time: float
    load_ms: float
    state: str = "READY"
    requests: int = 0
    inflight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def engine_name(self) -> str:
        return f"{self.name}@{self.version}"


class AdapterRegistry:
    def __init__(self, engine: LoraEngine, *, store_root: str | Path, base_fingerprint: str,
                 max_lora_rank: int):
        self.engine = engine
        self.store_root = Path(store_root)
        self.base_fingerprint = base_fingerprint
        self.max_lora_rank = max_lora_rank
        self._by_name: dict[str, LoadedAdapter] = {}
        self._next_id = 1
        self._lock = asyncio.Lock()  # loads and unloads one at a time; lookups never wait

    def validate(self, path: Path, *, version: str, manifest_sha256: str) -> Manifest:
        m = read_manifest(path)  # checksums of every file
        if manifest_sha256 and manifest_sha256 != m.sha256:
            raise FailedPrecondition("ADAPTER_MANIFEST_SHA256_MISMATCH",
                                     f"manifest sha256 is {m.sha256}, not {manifest_sha256}")
        if version and version != m.version:
            raise FailedPrecondition("ADAPTER_VERSION_MISMATCH",
                                     f"{path} holds version {m.version}, not {version}")
        if m.kind != "lora":
            raise FailedPrecondition("ADAPTER_KIND_UNSUPPORTED",
                                     f"{path} holds a {m.kind}, not a LoRA adapter")
        if m.base_model_fingerprint != self.base_fingerprint:
            raise FailedPrecondition("BASE_MODEL_MISMATCH",
                                     "the adapter was trained on a different base model than the one served",
                                     metadata={"adapter_base": m.base_model_fingerprint[:16],
                                               "served_base": self.base_fingerprint[:16]})
        if json.loads((path / "adapter_config.json").read_text()).get("use_dora"):
            raise FailedPrecondition("ADAPTER_DORA_UNSUPPORTED", "vLLM cannot serve DoRA adapters")
        if m.rank > self.max_lora_rank:
            raise FailedPrecondition("ADAPTER_RANK_TOO_LARGE",
                                     f"adapter rank {m.rank} exceeds max_lora_rank {self.max_lora_rank}")
        unsupported = set(m.target_modules) - SUPPORTED_TARGETS
        if unsupported:
            raise FailedPrecondition("ADAPTER_TARGET_UNSUPPORTED",
                                     f"target modules {sorted(unsupported)} are not supported by the engine")
        return m

    async def load(self, name: str, *, uri: str, version: str = "", manifest_sha256: str = "") -> LoadedAdapter:
        if not NAME_RE.match(name):
            raise invalid("name", "must match [a-z0-9][a-z0-9_-]{0,62}")
        if not uri:
            raise invalid("uri", "is required")
        async with self._lock:
            started = time.perf_counter()
            path = resolve_in_store(self.store_root, uri)
            m = await asyncio.to_thread(self.validate, path, version=version,
                                        manifest_sha256=manifest_sha256)
            current = self._by_name.get(name)
            if current and current.manifest.sha256 == m.sha256:
                return current  # idempotent: the same version is already serving
            lora_id = self._next_id
            self._next_id += 1
            try:
                await self.engine.add_lora(f"{name}@{m.version}", lora_id, str(path))
            except Exception as e:  # noqa: BLE001 - the engine's reason goes to the caller
                raise FailedPrecondition("ENGINE_REJECTED_ADAPTER", f"the engine refused the adapter: {e}") from e
            new = LoadedAdapter(name=name, version=m.version, path=path, lora_id=lora_id, manifest=m,
                                load_time=time.time(), load_ms=1000 * (time.perf_counter() - started))
            self._by_name[name] = new  # the flip: new requests resolve to the new version
            LOADED.set(len(self._by_name))
            log.info("adapter loaded", extra={"adapter": new.engine_name, "lora_id": lora_id,
                                              "load_ms": round(new.load_ms, 1)})
            if current:
                self._retire(current)
            return new

    async def unload(self, name: str) -> None:
        async with self._lock:
            current = self._by_name.pop(name, None)
            if current is None:
                raise NotFound("ADAPTER_NOT_FOUND", f"adapter {name!r} is not loaded", metadata={"adapter": name})
            LOADED.set(len(self._by_name))
            self._retire(current)

    def _retire(self, old: LoadedAdapter) -> None:
        old.state = "UNLOADING"

        async def remove_when_drained():
            if old.inflight:
                await old.drained.wait()
            await self.engine.remove_lora(old.lora_id)
            log.info("adapter removed", extra={"adapter": old.engine_name, "lora_id": old.lora_id})

        task = asyncio.create_task(remove_when_drained())
        task.add_done_callback(lambda t: t.exception() and log.error("remove_lora failed: %s", t.exception()))

    def resolve(self, name: str) -> LoadedAdapter:
        a = self._by_name.get(name)
        if a is None:
            raise NotFound("ADAPTER_NOT_FOUND", f"adapter {name!r} is not loaded", metadata={"adapter": name})
        return a

    @contextlib.contextmanager
    def use(self, adapter: LoadedAdapter):
        """Counts a request in flight on `adapter`, so a retired version outlives it."""
        adapter.inflight += 1
        adapter.requests += 1
        adapter.drained.clear()
        try:
            yield adapter
        finally:
            adapter.inflight -= 1
            if adapter.inflight == 0:
                adapter.drained.set()

    def list(self) -> list[LoadedAdapter]:
        return sorted(self._by_name.values(), key=lambda a: a.name)
