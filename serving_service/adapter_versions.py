"""One adapter version as the registry tracks it, its snapshot for clients, and the watch fan-out.

`AdapterVersion` is the registry's mutable record of one `name@version` (state, engine id, pin,
use counts, the request count in flight); `AdapterInfo` is an immutable snapshot of it for
ListAdapters and WatchAdapters (servicer.py maps it to the proto). `Watchers` hands every
snapshot the registry publishes to each WatchAdapters stream.

States: UNLOADED (in the store only) → LOADING → READY → UNLOADING (retired: draining its
requests) → UNLOADED; EVICTED (made room for another, loads again on demand); FAILED (did not
pass validation or add_lora; `failure` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunewire.adapters import Manifest
from tunewire.errors import TunewireError


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

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def snapshot(self, active: bool, deployment_generation: int = 0) -> AdapterInfo:
        m = self.manifest
        return AdapterInfo(
            name=self.name, version=self.version, path=str(self.path), state=self.state,
            tier="ENGINE" if self.lora_id else "STORE", active=active, pinned=self.pinned,
            rank=m.rank if m else 0, target_modules=m.target_modules if m else (),
            base_model_fingerprint=m.base_model_fingerprint if m else "",
            source_job=m.source_job if m else "", manifest_sha256=m.sha256 if m else "",
            size_bytes=self.size_bytes, load_time=self.load_time, load_ms=self.load_ms,
            last_used=self.last_used, requests=self.requests, inflight=self.inflight,
            failure_reason=self.failure.reason if self.failure else "",
            failure_message=self.failure.message if self.failure else "",
            deployment_generation=deployment_generation)


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
    deployment_generation: int = 0   # the deployment entry it serves as (active and recorded), else 0


class Watchers:
    """Every published snapshot goes to each open watch. A reader that falls 10,000 changes
    behind is ended rather than letting its queue grow: it reconnects and gets a fresh snapshot."""

    def __init__(self, max_behind: int = 10_000):
        self.max_behind = max_behind
        self._queues: set[asyncio.Queue] = set()

    async def watch(self, current: Callable[[], list[AdapterInfo]], name: str = "",
                    subscribed: Callable[[], Awaitable[None]] | None = None
                    ) -> AsyncIterator[tuple[AdapterInfo, bool]]:
        """(snapshot, initial): `current()` of `name` (or all), then each change. `subscribed` is
        awaited once this watch receives changes, before the first snapshot: a client told of it
        (WatchAdapters sends its headers then) cannot miss a change it causes afterwards."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.max_behind)
        self._queues.add(queue)
        try:
            if subscribed is not None:
                await subscribed()
            for info in current():
                if not name or info.name == name:
                    yield info, True
            while True:
                info = await queue.get()
                if info is None:
                    return  # overflowed or closed
                if not name or info.name == name:
                    yield info, False
        finally:
            self._queues.discard(queue)

    def publish(self, info: AdapterInfo) -> None:
        for q in list(self._queues):
            try:
                q.put_nowait(info)
            except asyncio.QueueFull:
                self._queues.discard(q)
                q.get_nowait()
                q.put_nowait(None)

    def close(self) -> None:
        """Ends every watch (on drain, so shutdown does not wait for them)."""
        for q in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
