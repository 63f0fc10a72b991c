"""Admission control in front of the engine: a bounded queue, fair across adapters.

Why: vLLM queues without limit, so under overload every request gets slower until all of them
time out. Here at most `max_running` requests are in the engine; up to `max_queued` more wait
in our queue; past that a request is refused at once with RESOURCE_EXHAUSTED and a retry hint,
so a client (or a load balancer) can back off or go to another replica. An optional
`per_adapter` limit caps how many requests of one adapter run at once: when a slot frees, the
oldest waiter whose adapter is under its limit goes first, so one hot adapter cannot starve the
rest. Waiting honours the request's deadline (DEADLINE_EXCEEDED, never a hung request).

    admission = Admission(max_running=32, max_queued=64, per_adapter=8)
    async with admission.slot("my-adapter", deadline=time.monotonic() + 5) as queued_ms: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from tunewire import reasons as R
from tunewire.errors import TunewireError

QUEUE_DEPTH = Gauge("tunewire_serving_admission_queue_depth", "Requests waiting for admission.")
RUNNING = Gauge("tunewire_serving_requests_running", "Requests admitted to the engine.")
REJECTED = Counter("tunewire_serving_admission_rejected_total",
                   "Requests refused by admission control.", ["reason"])
WAIT = Histogram("tunewire_serving_admission_wait_seconds", "Time spent waiting for admission.",
                 buckets=(.001, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


@dataclass
class _Waiter:
    key: str
    future: asyncio.Future


class Admission:
    def __init__(self, *, max_running: int, max_queued: int, per_adapter: int = 0,
                 retry_after_s: float = 1.0):
        if max_running < 1 or max_queued < 0 or per_adapter < 0:
            raise ValueError("max_running >= 1, max_queued >= 0, per_adapter >= 0")
        self.max_running, self.max_queued = max_running, max_queued
        self.per_adapter, self.retry_after_s = per_adapter, retry_after_s
        self._running: Tally[str] = Tally()
        self._waiters: list[_Waiter] = []

    @property
    def running(self) -> int:
        return sum(self._running.values())

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _fits(self, key: str) -> bool:
        return self.running < self.max_running and (
            not self.per_adapter or self._running[key] < self.per_adapter)

    @contextlib.asynccontextmanager
    async def slot(self, key: str, deadline: float | None = None) -> AsyncIterator[float]:
        """Holds one engine slot for adapter `key` ("" = base); yields ms spent queued.
        `deadline` is a time.monotonic() value."""
        started = time.monotonic()
        # Nobody jumps the queue: a newcomer runs at once only if no eligible waiter is older.
        if self._fits(key) and not any(self._fits(w.key) for w in self._waiters):
            self._take(key)
        else:
            await self._wait(key, deadline)
        waited = time.monotonic() - started
        WAIT.observe(waited)
        try:
            yield 1000 * waited
        finally:
            self._running[key] -= 1
            RUNNING.set(self.running)
            self._wake()

    def _take(self, key: str) -> None:
        self._running[key] += 1
        RUNNING.set(self.running)

    async def _wait(self, key: str, deadline: float | None) -> None:
        if len(self._waiters) >= self.max_queued:
            REJECTED.labels("queue_full").inc()
            raise TunewireError(R.QUEUE_FULL,
                                f"{self.running} requests running and {len(self._waiters)} queued; "
                                "retry later or on another replica", retry_after_s=self.retry_after_s,
                                metadata={"max_queued": str(self.max_queued)})
        w = _Waiter(key, asyncio.get_running_loop().create_future())
        self._waiters.append(w)
        QUEUE_DEPTH.set(len(self._waiters))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as the
            # future completes (admitted in the same instant), so a request whose client had gone
            # ran to the end on the engine with nobody listening.
            async with asyncio.timeout(timeout):
                await asyncio.shield(w.future)
        except (TimeoutError, asyncio.CancelledError) as e:
            if w.future.done() and not w.future.cancelled():
                self._running[key] -= 1  # admitted in the same instant: give the slot back
                RUNNING.set(self.running)
                self._wake()
            else:
                w.future.cancel()
            if isinstance(e, TimeoutError):
                REJECTED.labels("deadline").inc()
                raise TunewireError(R.DEADLINE_EXCEEDED_IN_QUEUE,
                                    "the deadline passed while the request waited for admission") from None
            raise
        finally:
            if w in self._waiters:
                self._waiters.remove(w)
            QUEUE_DEPTH.set(len(self._waiters))

    def _wake(self) -> None:
        """Admits waiters, oldest first, skipping those whose adapter is at its limit."""
        for w in list(self._waiters):
            if not self._fits(w.key):
                if self.running >= self.max_running:
                    return
                continue
            self._waiters.remove(w)
            if not w.future.done():
                self._take(w.key)
                w.future.set_result(None)
        QUEUE_DEPTH.set(len(self._waiters))
