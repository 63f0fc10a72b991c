"""A serving replica follows the fleet's deployment record (tunewire/deployments.py).

The record in the shared adapter store says which version each adapter name serves (and its
pin). `DeploymentSync` applies it to this replica's registry: once at start-up, before health
turns SERVING (a restarted or added replica never resolves a deployed name to "the newest in the
store"), then whenever the record changes: a task `os.stat`s it every `poll_seconds`, which
bounds how far a replica lags behind a deployment (plus the time to load a resident name's new
version, which happens before the flip so traffic flips warm).

Applying an entry = `AdapterRegistry.apply`: nothing is recorded. Names without an entry keep
the registry's own behaviour (a bare name resolves to the newest version in the store).

The replica's applied generation (ListAdapters/GetModelInfo `deployment_generation`) is the
highest G such that every entry with generation <= G is served here: an entry this replica
cannot load (its previous version keeps serving; the version shows FAILED with its failure) holds
it below that entry's generation until a later deployment of that name applies. A failed entry
is tried again on the next change of the record.

Writes from this replica (LoadAdapter, PinAdapter) go through `deploy` and `pin`, which load
here first, record, and apply the record at once, under the same lock as the poller.

    sync = DeploymentSync(registry, Path("var/adapters"), replica_id="serving-0", poll_seconds=0.25)
    await sync.start()                      # applies the record; then follows it
    entry, generation = await sync.deploy("extract", version="v1")   # a rollback, fleet-wide
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from serving_service.adapter_versions import AdapterVersion
from serving_service.registry import AdapterRegistry
from tunewire import deployments
from tunewire.errors import TunewireError

log = logging.getLogger("tunewire.serving.deployments")


class DeploymentSync:
    def __init__(self, registry: AdapterRegistry, store_root: Path, *, replica_id: str,
                 poll_seconds: float):
        self.registry, self.store_root = registry, Path(store_root)
        self.replica_id, self.poll_seconds = replica_id, poll_seconds
        self._lock = asyncio.Lock()   # one application (or local deploy) at a time
        self._stamp: tuple[int, int, int] | None = None   # the record's stamp last applied
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Applies the record (an unreadable one fails start-up: serving "the newest" instead
        would silently undo rollbacks), then follows it."""
        await self.refresh(strict=True)
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                stamp = await asyncio.to_thread(deployments.stamp, self.store_root)
                if stamp != self._stamp:
                    await self.refresh()
            except Exception:  # noqa: BLE001 - the follower must outlive any one bad read
                log.exception("applying the deployment record failed")

    async def refresh(self, *, strict: bool = False) -> None:
        """Reads the record and applies what changed. An unreadable record raises with `strict`,
        else is logged once and the replica keeps what it serves."""
        async with self._lock:
            stamp = await asyncio.to_thread(deployments.stamp, self.store_root)
            try:
                record = await asyncio.to_thread(deployments.read, self.store_root)
            except TunewireError as e:
                if strict:
                    raise
                if stamp != self._stamp:
                    log.error("deployment record unreadable; keeping the current deployment: %s", e.message)
                self._stamp = stamp
                return
            await self._apply(record)
            self._stamp = stamp

    async def _apply(self, record: deployments.Deployments) -> None:
        reg = self.registry
        failed: list[int] = []
        for name, d in sorted(record.adapters.items()):
            current = reg.get(f"{name}@{d.version}")
            if (reg.active_version(name) == d.version and reg.deployed.get(name) == (d.version, d.generation)
                    and (current is None or current.pinned == d.pinned)):
                continue
            try:
                await reg.apply(name, d.version, pinned=d.pinned)
            except TunewireError as e:
                failed.append(d.generation)
                log.warning("deployed version not applied here; the previous one keeps serving",
                            extra={"adapter": f"{name}@{d.version}", "reason": e.reason,
                                   "generation": d.generation})
                continue
            reg.deployed[name] = (d.version, d.generation)
            log.info("deployment applied", extra={"adapter": f"{name}@{d.version}",
                                                  "generation": d.generation, "pinned": d.pinned})
        served = min(failed) - 1 if failed else record.generation
        reg.deployment_generation = max(reg.deployment_generation, served)

    async def deploy(self, name: str, *, uri: str = "", version: str = "", manifest_sha256: str = "",
                     pin: bool = False) -> tuple[AdapterVersion, int]:
        """LoadAdapter: loads the version here (a refusal records nothing), records it as the
        name's deployment for the whole fleet, applies the record here; (version, generation)."""
        async with self._lock:
            entry = await self.registry.load(name, uri=uri, version=version,
                                             manifest_sha256=manifest_sha256, pin=pin)
            record = await asyncio.to_thread(deployments.record, self.store_root, name, entry.version,
                                             pinned=True if pin else None,
                                             source=f"LoadAdapter on {self.replica_id}")
            await self._apply(record)
            self._stamp = None  # the next poll re-reads: another write may have come in between
        return entry, record.adapters[name].generation

    async def pin(self, ref: str, pinned: bool) -> AdapterVersion:
        """PinAdapter: pins here; a name's deployed version is pinned (or not) fleet-wide."""
        async with self._lock:
            entry = await self.registry.pin(ref, pinned)
            if self.registry.deployed.get(entry.name, ("",))[0] == entry.version:
                record = await asyncio.to_thread(deployments.record, self.store_root, entry.name,
                                                 entry.version, pinned=pinned,
                                                 source=f"PinAdapter on {self.replica_id}")
                await self._apply(record)
                self._stamp = None
        return entry
