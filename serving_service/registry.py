"""The adapter registry: which LoRA adapter versions this replica serves, under which engine ids.

Names: `name@version` is one immutable version from the adapter store
(`<store>/<name>/<version>/`); the bare `name` is an alias to the *active* version. Loading a new
version registers it under a fresh LoRA id and then flips the alias (one dict assignment, so no
request ever sees a half-flipped state); the old version finishes its in-flight requests and is
removed once drained. Versions are never reloaded in place: vLLM can reuse stale cache entries
when a name is reloaded, so every (re)load takes a new LoRA id.

The active version of a deployed name is what the fleet's deployment record says, as applied
here (deployment_sync.py calls `apply`; `deployed` and `deployment_generation` are what it
applied); `load(flip=False)` stages a version without touching the alias. Undeployed names keep
the local rule: the first request for a bare name makes its newest version active.

Nothing reaches the engine unvalidated (adapter_checks.py); a failure marks only that version
FAILED, and a request does not retry it (LoadAdapter does).

Lazy resolution: `using("name")` on a version that is in the store but not resident loads it.
Each version loads under its own lock, so requests for other adapters never wait. Concurrent
requests for the same version share one load.

Capacity: at most `max_resident` (serving's `max_cpu_loras`) versions are registered with the
engine, so vLLM never evicts on its own; making room evicts the least recently used version that
is neither pinned nor busy, else RESOURCE_EXHAUSTED. vLLM itself bounds how many of them share
one batch (`max_loras`).

Every state change is published to `watch()` subscribers (the WatchAdapters stream).

    checks = AdapterChecks(Path("var/adapters"), fp, max_lora_rank=16)   # adapter_checks.py
    registry = AdapterRegistry(engine, checks, max_resident=8)
    await registry.load("extract")                     # LoadAdapter: newest version, now active
    async with registry.using("extract") as (version, load_ms): ...   # the request path
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from serving_service.adapter_checks import AdapterChecks, latest_version, parse_ref
from serving_service.adapter_versions import AdapterInfo, AdapterVersion, Watchers
from tunewire import reasons as R
from tunewire.adapters import NAME_RE, VERSION_RE, read_manifest, resolve_in_store
from tunewire.errors import TunewireError, invalid

log = logging.getLogger("tunewire.serving.adapters")

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


def _phase_timer(start: float):
    """phase(name) observes the time since the previous phase (or `start`) under `name`."""
    last = [start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        LOAD_PHASE_SECONDS.labels(name).observe(now - last[0])
        last[0] = now
    return phase


class AdapterRegistry:
    def __init__(self, engine: LoraEngine, checks: AdapterChecks, *, max_resident: int,
                 lazy_load: bool = True):
        self.engine = engine
        self.checks = checks  # what every version passes before add_lora
        self.store_root = checks.store_root
        self.max_resident = max_resident
        self.lazy_load = lazy_load
        self.watchers = Watchers()
        self._versions: dict[str, AdapterVersion] = {}   # "name@version" -> version
        self._active: dict[str, str] = {}                # name -> active version label
        self._next_id = 1
        self._locks: dict[str, asyncio.Lock] = {}        # one per version: loads of others proceed
        self._room = asyncio.Lock()                      # picking victims + reserving a slot
        # The deployment record as applied here (deployment_sync.py keeps these): name ->
        # (version, the entry's generation), and the highest generation fully served here.
        self.deployed: dict[str, tuple[str, int]] = {}
        self.deployment_generation = 0

    # ---- explicit operations (LoadAdapter / UnloadAdapter / PinAdapter) -------------------
    async def load(self, name: str, *, uri: str = "", version: str = "", manifest_sha256: str = "",
                   pin: bool = False, flip: bool = True) -> AdapterVersion:
        """Loads a version (from `uri`, or name+version, or the newest in the store) and makes it
        the active version of `name`; the previously active version drains and is removed.
        flip=False stages it: loaded and validated here, the name keeps its active version."""
        if not NAME_RE.match(name):
            raise invalid("name", "must match [a-z0-9][a-z0-9_-]{0,62}")
        if version and not VERSION_RE.match(version):
            raise invalid("version", "must look like v<N>")
        if uri:
            path = resolve_in_store(self.store_root, uri)
            m = await asyncio.to_thread(read_manifest, path, verify_files=False)
            version = version or m.version
        else:
            version = version or latest_version(self.store_root, name, "name")
            path = resolve_in_store(self.store_root, f"{name}/{version}")
        entry = await self._ensure(name, version, path, trigger="explicit", manifest_sha256=manifest_sha256)
        if pin and not entry.pinned:
            entry.pinned = True
            self._changed(entry)
        if flip:
            self._flip(name, entry.version)
        return entry

    async def apply(self, name: str, version: str, *, pinned: bool) -> None:
        """Makes `version` the active version of `name` as the deployment record says (recording
        nothing): loaded first when the name's current version is resident (traffic flips warm)
        or when it is pinned, else only the alias moves and the first request loads it. A failed
        load raises and leaves the previous version active."""
        if pinned or self._resident(name) is not None:
            entry = await self.load(name, version=version, pin=pinned)
        else:
            self._flip(name, version)
            entry = self._versions.get(f"{name}@{version}")
        if entry is not None and entry.pinned != pinned:
            entry.pinned = pinned
            self._changed(entry)

    def _flip(self, name: str, version: str) -> None:
        """New requests for `name` resolve to `version`; the previous one drains and is removed."""
        previous = self._active.get(name)
        self._active[name] = version  # one assignment: no request sees a half-flipped state
        if previous and previous != version:
            old = self._versions.get(f"{name}@{previous}")
            if old and old.state == "READY":
                self._retire(old)
            elif old:
                self._changed(old)  # no longer active
        entry = self._versions.get(f"{name}@{version}")
        if entry is not None:
            self._changed(entry)

    def active_version(self, name: str) -> str:
        return self._active.get(name, "")

    def get(self, key: str) -> AdapterVersion | None:
        """The tracked `name@version`, if any."""
        return self._versions.get(key)

    async def unload(self, ref: str) -> None:
        name, version = parse_ref(ref, "name")
        targets = [v for v in self._versions.values()
                   if v.name == name and (not version or v.version == version)
                   and v.state == "READY"]
        if not targets and not (not version and name in self._active):
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"adapter {ref!r} is not loaded", metadata={"adapter": ref})
        # Per replica: frees the engine here. A deployed name keeps its alias (the next request
        # loads it again); only an undeployed one forgets it.
        if (not version or self._active.get(name) == version) and name not in self.deployed:
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
        version = version or latest_version(self.store_root, name)
        path = self.store_root / name / version
        if not path.is_dir():
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"adapter {name}@{version} is not in the store",
                                metadata={"adapter": ref})
        entry = await self._ensure(name, version, path, trigger=trigger)
        if name not in self._active and "@" not in ref:
            self._active[name] = version  # first load of a bare name makes it the active one
            self._changed(entry)
        return entry

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
                entry.manifest = await asyncio.to_thread(self.checks.validate, path, version=version,
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
        active = self._active.get(v.name) == v.version
        version, generation = self.deployed.get(v.name, ("", 0))
        return v.snapshot(active=active, deployment_generation=generation if active and version == v.version else 0)

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
                    infos[key] = AdapterVersion(name=d.parent.name, version=d.name, path=d,
                                                manifest=m).snapshot(active=False)
        return sorted(infos.values(), key=lambda i: (i.name, int(i.version[1:])))

    def check_known(self, ref: str) -> None:
        """NOT_FOUND unless `ref` is loaded here or in the store."""
        if self._resident(ref) is not None:
            return
        name, version = parse_ref(ref)
        version = version or self._active.get(name) or latest_version(self.store_root, name)
        if f"{name}@{version}" not in self._versions and not (self.store_root / name / version).is_dir():
            raise TunewireError(R.ADAPTER_NOT_FOUND, f"no adapter {ref!r} is loaded or in the store",
                                metadata={"adapter": ref})

    def watch(self, name: str = "", subscribed: Callable[[], Awaitable[None]] | None = None
              ) -> AsyncIterator[tuple[AdapterInfo, bool]]:
        """(snapshot, initial) for every current version of `name` (or all), then each change;
        see Watchers.watch for `subscribed`."""
        return self.watchers.watch(lambda: [self.info(v) for v in list(self._versions.values())],
                                   name, subscribed)

    def _changed(self, v: AdapterVersion) -> None:
        RESIDENT.set(sum(x.lora_id > 0 for x in self._versions.values()))
        PINNED.set(sum(x.pinned for x in self._versions.values()))
        self.watchers.publish(self.info(v))
