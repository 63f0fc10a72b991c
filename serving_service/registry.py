"""The adapter registry: which LoRA adapter versions this replica serves, under which engine ids.

Names: `name@version` is one immutable version from the adapter store
(`<store>/<name>/<version>/`); the bare `name` is an alias to the *active* version. Loading a new
version registers it under a fresh LoRA id and then flips the alias (one dict assignment, so no
request ever sees a half-flipped state); the old version finishes its in-flight requests and is
removed once drained. Versions are never reloaded in place: vLLM can reuse stale cache entries
when a name is reloaded, so every (re)load takes a new LoRA id.

Nothing reaches the engine unvalidated (vLLM on CPU dies on a request naming a bad adapter
path): store confinement, the manifest's checksums, the base-model fingerprint, the rank limit
and the target modules are checked first; a failure marks only that version FAILED.

Lazy resolution: `using("name")` on a version that is in the store but not resident loads it.
Each version loads under its own lock, so requests for other adapters never wait. Concurrent
requests for the same version share one load.

Capacity: at most `max_cpu_loras` versions are registered with the engine (so vLLM never evicts
on its own); making room evicts the least recently used version that is neither pinned nor busy,
else RESOURCE_EXHAUSTED. vLLM itself bounds how many of them share one batch (`max_loras`).

Every state change is published to `watch()` subscribers (the WatchAdapters stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from serving_service.config import LORA_TARGETS
from tunewire.adapters import NAME_RE, VERSION_RE, Manifest, read_manifest, resolve_in_store
from tunewire import reasons as R
from tunewire.errors import TunewireError, invalid

log = logging.getLogger("tunewire.serving.adapters")

# LoRA targets vLLM can apply to Llama-style models (q/k/v and gate/up are packed in vLLM).
SUPPORTED_TARGETS = set(LORA_TARGETS)
# vLLM packs q/k/v and gate/up into one layer each: deploying one member wraps the whole layer.
_PACKED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _wrapped(deployed: tuple[str, ...]) -> set[str]:
    """The projections an adapter may target when the engine wraps only `deployed` (() = all)."""
    if not deployed:
        return set(SUPPORTED_TARGETS)
    out = set(deployed)
    for group in _PACKED:
        if out & group:
            out |= group
    return out


RESIDENT_STATES = ("LOADING", "READY", "UNLOADING")  # hold (or are taking) an engine slot

RESIDENT = Gauge("tunewire_serving_adapters_resident", "Adapter versions registered with the engine.")
PINNED = Gauge("tunewire_serving_adapters_pinned", "Adapter versions pinned resident.")
LOAD_SECONDS = Histogram("tunewire_serving_adapter_load_seconds",
                         "Validation plus engine registration time of an adapter version.", ["trigger"],
                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
# Where a load's time goes: validation (manifest checksums, config), waiting for a free slot
# (evicting), and the engine's add_lora (which waits for the engine core's current step).
LOAD_PHASE_SECONDS = Histogram("tunewire_serving_adapter_load_phase_seconds",
                               "Adapter load time by phase: validate, room, engine.", ["phase"],
                               buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
CACHE = Counter("tunewire_serving_adapter_cache_total",
                "Adapter lookups by requests: hit (resident) or miss (loaded for the request).", ["result"])
EVICTIONS = Counter("tunewire_serving_adapter_evictions_total", "Adapter versions evicted by LRU.")
LOAD_FAILURES = Counter("tunewire_serving_adapter_load_failures_total",
                        "Adapter versions that failed validation or engine registration.", ["reason"])


class LoraEngine(Protocol):
    async def add_lora(self, name: str, lora_id: int, path: str) -> None: ...
    async def remove_lora(self, lora_id: int) -> None: ...


@dataclass
class AdapterVersion:
    name: str
    version: str
    path: Path
    manifest: Manifest | None = None
    state: str = "UNLOADED"          # LOADING | READY | UNLOADING | FAILED | EVICTED | UNLOADED
    lora_id: int = 0                 # engine id while resident; a fresh one on every load
    pinned: bool = False
    load_time: float = 0.0           # unix time of the last successful load
    load_ms: float = 0.0
    last_used: float = 0.0           # unix time of the last request (LRU order)
    requests: int = 0
    inflight: int = 0
    failure: TunewireError | None = None
    size_bytes: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    loading: asyncio.Future | None = None   # shared by concurrent requests for a loading version

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AdapterInfo:
    """A snapshot of one version for listings and the watch stream."""
    name: str
    version: str
    path: str
    state: str
    tier: str                        # ENGINE (registered) | STORE (on disk only)
    active: bool
    pinned: bool
    rank: int
    target_modules: tuple[str, ...]
    base_model_fingerprint: str
    source_job: str
    manifest_sha256: str
    size_bytes: int
    load_time: float
    load_ms: float
    last_used: float
    requests: int
    inflight: int
    failure_reason: str = ""
    failure_message: str = ""


def _phase_timer(start: float):
    """phase(name) observes the time since the previous phase (or `start`) under `name`."""
    last = [start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        LOAD_PHASE_SECONDS.labels(name).observe(now - last[0])
        last[0] = now
    return phase


def parse_ref(ref: str, field_name: str = "adapter") -> tuple[str, str]:
    """'name' → (name, ''); 'name@v3' → (name, 'v3'); anything else INVALID_ARGUMENT."""
    name, _, version = ref.partition("@")
    if not NAME_RE.match(name) or ("@" in ref and not VERSION_RE.match(version)):
        raise invalid(field_name, "must be name or name@version (name: [a-z0-9][a-z0-9_-]{0,62}, "
                      "version: v<N>)", R.ADAPTER_NAME_INVALID)
    return name, version


class AdapterRegistry:
    def __init__(self, engine: LoraEngine, *, store_root: str | Path, base_fingerprint: str,
                 max_lora_rank: int, max_resident: int, lazy_load: bool = True,
                 deployed_targets: tuple[str, ...] = ()):
        self.engine = engine
        self.store_root = Path(store_root)
        self.base_fingerprint = base_fingerprint
        self.max_lora_rank = max_lora_rank
        self.max_resident = max_resident
        self.lazy_load = lazy_load
        self.allowed_targets = _wrapped(deployed_targets)
        self._versions: dict[str, AdapterVersion] = {}   # "name@version" -> version
        self._active: dict[str, str] = {}                # name -> active version label
        self._next_id = 1
        self._locks: dict[str, asyncio.Lock] = {}        # one per version: loads of others proceed
        self._room = asyncio.Lock()                      # picking victims + reserving a slot
        self._watchers: set[asyncio.Queue] = set()

    # ---- validation -----------------------------------------------------------------------
    def validate(self, path: Path, *, version: str = "", manifest_sha256: str = "") -> Manifest:
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
        self._check_base(m)
        if json.loads((path / "adapter_config.json").read_text()).get("use_dora"):
            raise TunewireError(R.ADAPTER_DORA_UNSUPPORTED, "vLLM cannot serve DoRA adapters")
        if m.rank > self.max_lora_rank:
            raise TunewireError(R.ADAPTER_RANK_TOO_LARGE,
                                f"adapter rank {m.rank} exceeds max_lora_rank {self.max_lora_rank}")
        unsupported = set(m.target_modules) - SUPPORTED_TARGETS
        if unsupported:
            raise TunewireError(R.ADAPTER_TARGET_UNSUPPORTED,
                                f"target modules {sorted(unsupported)} are not supported by the engine")
        undeployed = set(m.target_modules) - self.allowed_targets
        if undeployed:
            raise TunewireError(R.ADAPTER_TARGET_NOT_DEPLOYED,
                                f"target modules {sorted(undeployed)} are not among this server's "
                                f"lora_target_modules {sorted(self.allowed_targets)}")
        return m

    def _check_base(self, m: Manifest) -> None:
        if m.base_model_fingerprint != self.base_fingerprint:
            raise TunewireError(R.BASE_MODEL_MISMATCH,
                                "the adapter was trained on a different base model than the one served",
                                metadata={"adapter_base": m.base_model_fingerprint[:16],
                                          "served_base": self.base_fingerprint[:16]})

    def resolve_head(self, ref: str) -> tuple[Path, Manifest]:
        """A feature-extraction head from the store ('name' = its latest version), verified."""
        name, version = parse_ref(ref, "head")
        path = self.store_root / name / (version or self._latest_in_store(name, "head"))
        if not path.is_dir():
            raise TunewireError(R.HEAD_NOT_FOUND, f"no head {ref!r} in the store", metadata={"head": ref})
        m = read_manifest(path)
        if m.kind != "classifier":
            raise TunewireError(R.ADAPTER_KIND_UNSUPPORTED, f"{ref} is a {m.kind}, not a classifier head")
        self._check_base(m)
        return path, m

    # ---- explicit operations (LoadAdapter / UnloadAdapter / PinAdapter) -------------------
    async def load(self, name: str, *, uri: str = "", version: str = "", manifest_sha256: str = "",
                   pin: bool = False) -> AdapterVersion:
        """Loads a version (from `uri`, or name+version, or the newest in the store) and makes it
        the active version of `name`; the previously active version drains and is removed."""
        if not NAME_RE.match(name):
            raise invalid("name", "must match [a-z0-9][a-z0-9_-]{0,62}")
        if version and not VERSION_RE.match(version):
            raise invalid("version", "must look like v<N>")
        if uri:
            path = resolve_in_store(self.store_root, uri)
            m = await asyncio.to_thread(read_manifest, path, verify_files=False)
            version = version or m.version
        else:
            version = version or self._latest_in_store(name, "name")
            path = resolve_in_store(self.store_root, f"{name}/{version}")
        entry = await self._ensure(name, version, path, trigger="explicit", manifest_sha256=manifest_sha256)
        if pin and not entry.pinned:
            entry.pinned = True
            self._changed(entry)
        previous = self._active.get(name)
        self._active[name] = entry.version  # the flip: new requests resolve to this version
        if previous and previous != entry.version:
            old = self._versions.get(f"{name}@{previous}")
            if old and old.state == "READY":
                self._retire(old)
            elif old:
                self._changed(old)  # no longer active
        self._changed(entry)
        return entry

    async def unload(self, ref: str) -> None:
        name, version = parse_ref(ref, "name")
        targets = [v for v in self._versions.values()
                   if v.name == name and (not version or v.version == version)
                   and v.state == "READY"]
        if not targets and not (not version and name in self._active):
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"adapter {ref!r} is not loaded", metadata={"adapter": ref})
        if not version or self._active.get(name) == version:
            self._active.pop(name, None)
        for v in targets:
            v.pinned = False
            self._retire(v)

    async def pin(self, ref: str, pinned: bool) -> AdapterVersion:
        entry = await self._resolve_and_load(ref, trigger="explicit")
        entry.pinned = pinned
        self._changed(entry)
        return entry

    # ---- the request path -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def using(self, ref: str) -> AsyncIterator[tuple[AdapterVersion, float]]:
        """(version, ms spent loading it for this request) with the request counted in flight,
        so neither eviction nor a retirement removes it underneath."""
        started = time.perf_counter()
        entry = self._resident(ref)
        if entry is None:
            CACHE.labels("miss").inc()
            entry = await self._resolve_and_load(ref, trigger="lazy")
            load_ms = 1000 * (time.perf_counter() - started)
        else:
            CACHE.labels("hit").inc()
            load_ms = 0.0
        # No await between the READY check and this increment: eviction cannot slip in.
        entry.inflight += 1
        entry.requests += 1
        entry.last_used = time.time()
        entry.drained.clear()
        try:
            yield entry, load_ms
        finally:
            entry.inflight -= 1
            entry.last_used = time.time()
            if entry.inflight == 0:
                entry.drained.set()

    def _resident(self, ref: str) -> AdapterVersion | None:
        name, version = ref.partition("@")[::2]
        version = version or self._active.get(name, "")
        entry = self._versions.get(f"{name}@{version}") if version else None
        return entry if entry is not None and entry.state == "READY" else None

    async def _resolve_and_load(self, ref: str, *, trigger: str) -> AdapterVersion:
        name, version = parse_ref(ref)
        entry = self._resident(ref)
        if entry is not None:
            return entry
        if not version:
            version = self._active.get(name) or ""
        known = self._versions.get(f"{name}@{version}") if version else None
        if not self.lazy_load and trigger == "lazy":
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"adapter {ref!r} is not loaded", metadata={"adapter": ref})
        if known is not None and known.state == "FAILED" and trigger == "lazy":
            raise known.failure  # a request does not retry a failed load; LoadAdapter does
        version = version or self._latest_in_store(name, "adapter")
        path = self.store_root / name / version
        if not path.is_dir():
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"adapter {name}@{version} is not in the store",
                                metadata={"adapter": ref})
        entry = await self._ensure(name, version, path, trigger=trigger)
        if name not in self._active and "@" not in ref:
            self._active[name] = version  # first load of a bare name makes it the active one
            self._changed(entry)
        return entry

    def _latest_in_store(self, name: str, field_name: str) -> str:
        d = self.store_root / name
        nums = [int(p.name[1:]) for p in d.glob("v*") if VERSION_RE.match(p.name) and p.is_dir()] \
            if d.is_dir() else []
        if not nums:
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"no adapter {name!r} is loaded or in the store",
                                metadata={field_name: name})
        return f"v{max(nums)}"

    async def _ensure(self, name: str, version: str, path: Path, *, trigger: str,
                      manifest_sha256: str = "") -> AdapterVersion:
        """The version READY in the engine: validated, room made, registered. One load per version
        at a time; concurrent callers wait for the same load."""
        key = f"{name}@{version}"
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._versions.get(key)
            if entry is not None and entry.state == "READY" and entry.path == path:
                if manifest_sha256 and entry.manifest and entry.manifest.sha256 != manifest_sha256:
                    raise TunewireError(R.ADAPTER_MANIFEST_SHA256_MISMATCH,
                                        f"manifest sha256 is {entry.manifest.sha256}, not {manifest_sha256}")
                return entry
            while entry is not None and entry.state == "UNLOADING" and entry.lora_id:
                await asyncio.sleep(0.01)  # it leaves the engine first (after draining); then a fresh id
            if entry is None:
                entry = self._versions[key] = AdapterVersion(name=name, version=version, path=path)
            entry.path, entry.state, entry.failure = path, "LOADING", None
            self._changed(entry)
            started = time.perf_counter()
            try:
                entry.manifest = await asyncio.to_thread(self.validate, path, version=version,
                                                         manifest_sha256=manifest_sha256)
                entry.size_bytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
                phase = _phase_timer(started)
                phase("validate")
                async with self._room:
                    try:
                        await self._make_room()
                    except TunewireError:  # ADAPTER_CAPACITY_EXHAUSTED: not the adapter's fault
                        entry.state = "EVICTED" if entry.load_time else "UNLOADED"
                        self._changed(entry)
                        raise
                    entry.lora_id, self._next_id = self._next_id, self._next_id + 1
                phase("room")
                try:
                    await self.engine.add_lora(key, entry.lora_id, str(path))
                    phase("engine")
                except Exception as e:  # noqa: BLE001 - the engine's reason goes to the caller
                    entry.lora_id = 0
                    raise TunewireError(R.ENGINE_REJECTED_ADAPTER,
                                        f"the engine refused the adapter: {e}") from e
            except TunewireError as e:
                if e.reason == R.ADAPTER_CAPACITY_EXHAUSTED:
                    raise
                entry.state, entry.failure = "FAILED", e
                LOAD_FAILURES.labels(e.reason).inc()
                self._changed(entry)
                log.warning("adapter load failed", extra={"adapter": key, "reason": e.reason})
                raise
            entry.load_ms = 1000 * (time.perf_counter() - started)
            entry.load_time = entry.last_used = time.time()
            entry.state = "READY"
            LOAD_SECONDS.labels(trigger).observe(entry.load_ms / 1000)
            self._changed(entry)
            log.info("adapter loaded", extra={"adapter": key, "lora_id": entry.lora_id,
                                              "load_ms": round(entry.load_ms, 1), "trigger": trigger})
            return entry

    async def _make_room(self) -> None:
        """Evicts LRU versions until one more fits; RESOURCE_EXHAUSTED if all are pinned or busy."""
        while sum(v.lora_id > 0 for v in self._versions.values()) >= self.max_resident:
            idle = [v for v in self._versions.values()
                    if v.state == "READY" and not v.pinned and v.inflight == 0]
            if not idle:
                draining = any(v.state == "UNLOADING" for v in self._versions.values())
                if draining:  # a retired version leaves as soon as its requests finish
                    await asyncio.sleep(0.01)
                    continue
                raise TunewireError(R.ADAPTER_CAPACITY_EXHAUSTED,
                                    f"all {self.max_resident} adapter slots hold pinned or busy adapters",
                                    retry_after_s=1.0)
            victim = min(idle, key=lambda v: v.last_used)
            victim.state = "EVICTED"  # synchronously: requests now reload it instead of using it
            lora_id = victim.lora_id
            try:
                await self.engine.remove_lora(lora_id)
            finally:
                victim.lora_id = 0
            EVICTIONS.inc()
            self._changed(victim)
            log.info("adapter evicted", extra={"adapter": victim.key, "lora_id": lora_id})

    def _retire(self, old: AdapterVersion) -> None:
        old.state = "UNLOADING"
        self._changed(old)

        async def remove_when_drained():
            if old.inflight:
                await old.drained.wait()
            if old.lora_id:
                try:
                    await self.engine.remove_lora(old.lora_id)
                finally:
                    old.lora_id = 0
            if old.state == "UNLOADING":
                old.state = "UNLOADED"
                old.pinned = False
            self._changed(old)
            log.info("adapter removed", extra={"adapter": old.key})

        task = asyncio.create_task(remove_when_drained())
        task.add_done_callback(lambda t: t.exception() and log.error("remove_lora failed: %s", t.exception()))

    # ---- views ------------------------------------------------------------------------------
    def info(self, v: AdapterVersion) -> AdapterInfo:
        m = v.manifest
        return AdapterInfo(
            name=v.name, version=v.version, path=str(v.path), state=v.state,
            tier="ENGINE" if v.lora_id else "STORE", active=self._active.get(v.name) == v.version,
            pinned=v.pinned, rank=m.rank if m else 0, target_modules=m.target_modules if m else (),
            base_model_fingerprint=m.base_model_fingerprint if m else "",
            source_job=m.source_job if m else "", manifest_sha256=m.sha256 if m else "",
            size_bytes=v.size_bytes, load_time=v.load_time, load_ms=v.load_ms, last_used=v.last_used,
            requests=v.requests, inflight=v.inflight,
            failure_reason=v.failure.reason if v.failure else "",
            failure_message=v.failure.message if v.failure else "")

    def list(self, *, include_store: bool = False) -> list[AdapterInfo]:
        infos = {v.key: self.info(v) for v in self._versions.values()}
        if include_store and self.store_root.is_dir():
            for d in sorted(self.store_root.glob("*/v*")):
                key = f"{d.parent.name}@{d.name}"
                if key in infos or not VERSION_RE.match(d.name) or not NAME_RE.match(d.parent.name):
                    continue
                try:
                    m = read_manifest(d, verify_files=False)
                except TunewireError:
                    continue
                if m.kind == "lora":
                    infos[key] = self.info(AdapterVersion(name=d.parent.name, version=d.name, path=d,
                                                          manifest=m))
        return sorted(infos.values(), key=lambda i: (i.name, int(i.version[1:])))

    def check_known(self, ref: str) -> None:
        """NOT_FOUND unless `ref` is loaded here or in the store."""
        if self._resident(ref) is not None:
            return
        name, version = parse_ref(ref)
        version = version or self._active.get(name) or self._latest_in_store(name, "adapter")
        if f"{name}@{version}" not in self._versions and not (self.store_root / name / version).is_dir():
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"no adapter {ref!r} is loaded or in the store",
                                metadata={"adapter": ref})

    def get(self, ref: str) -> AdapterVersion:
        name, version = parse_ref(ref)
        version = version or self._active.get(name, "")
        entry = self._versions.get(f"{name}@{version}")
        if entry is None:
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"adapter {ref!r} is not loaded", metadata={"adapter": ref})
        return entry

    async def watch(self, name: str = "") -> AsyncIterator[tuple[AdapterInfo, bool]]:
        """(snapshot, initial) for every current version of `name` (or all), then each change."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        self._watchers.add(queue)
        try:
            for v in list(self._versions.values()):
                if not name or v.name == name:
                    yield self.info(v), True
            while True:
                info = await queue.get()
                if info is None:
                    return  # overflowed: the client reconnects and gets a fresh snapshot
                if not name or info.name == name:
                    yield info, False
        finally:
            self._watchers.discard(queue)

    def close_watchers(self) -> None:
        """Ends every WatchAdapters stream (on drain, so shutdown does not wait for them)."""
        for q in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    def _changed(self, v: AdapterVersion) -> None:
        RESIDENT.set(sum(x.lora_id > 0 for x in self._versions.values()))
        PINNED.set(sum(x.pinned for x in self._versions.values()))
        info = self.info(v)
        for q in list(self._watchers):
            try:
                q.put_nowait(info)
            except asyncio.QueueFull:
                self._watchers.discard(q)
                q.get_nowait()
                q.put_nowait(None)
