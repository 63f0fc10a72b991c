"""Admission control (serving_service/admission.py) and bounded metric labels, on a real event loop.

Tasks are let run until a stated condition holds (`until`), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serving_service.admission import Admission
from serving_service.generation import LabelLimiter
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(30)


async def until(condition, turns: int = 1000) -> None:
    """Lets the other tasks run until `condition()` holds (each turn one pass of the event loop)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def _hold(adm: Admission, key: str, release: asyncio.Event, order: list, deadline=None):
    async with adm.slot(key, deadline) as queued_ms:
        order.append((key, queued_ms))
        await release.wait()


def test_bounded_queue_refuses_with_retry_hint():
    async def main():
        adm = Admission(max_running=2, max_queued=2, retry_after_s=0.5)
        release, order = asyncio.Event(), []
        tasks = [asyncio.create_task(_hold(adm, "a", release, order)) for _ in range(4)]
        await until(lambda: (adm.running, adm.queued, len(order)) == (2, 2, 2))
        with pytest.raises(TunewireError) as e:
            async with adm.slot("b"):
                pass
        assert e.value.reason == "QUEUE_FULL" and e.value.retry_after_s == 0.5
        release.set()
        await asyncio.gather(*tasks)
        assert (adm.running, adm.queued) == (0, 0) and len(order) == 4
        assert order[2][1] > 0  # the queued ones report their wait

    asyncio.run(main())


def test_per_adapter_limit_lets_other_adapters_through():
    async def main():
        adm = Admission(max_running=3, max_queued=10, per_adapter=2)
        hot_release, cold_release, order = asyncio.Event(), asyncio.Event(), []
        hot = [asyncio.create_task(_hold(adm, "hot", hot_release, order)) for _ in range(4)]
        await until(lambda: adm.queued == 2 and len(order) == 2)
        assert adm.running == 2  # the hot adapter is capped at 2
        cold = asyncio.create_task(_hold(adm, "cold", cold_release, order))
        await until(lambda: len(order) == 3)
        assert [k for k, _ in order] == ["hot", "hot", "cold"]  # cold skipped the hot queue
        hot_release.set()
        cold_release.set()
        await asyncio.gather(*hot, cold)
        assert [k for k, _ in order] == ["hot", "hot", "cold", "hot", "hot"]

    asyncio.run(main())


def test_fifo_without_per_adapter_limit():
    async def main():
        adm = Admission(max_running=1, max_queued=5)
        release, order = asyncio.Event(), []
        first = asyncio.create_task(_hold(adm, "x", release, order))
        await until(lambda: adm.running == 1)
        rest = []
        for key in ("a", "b", "c"):
            rest.append(asyncio.create_task(_hold(adm, key, release, order)))
            await until(lambda: adm.queued == len(rest))  # queued in this order
        release.set()
        await asyncio.gather(first, *rest)
        assert [k for k, _ in order] == ["x", "a", "b", "c"]

    asyncio.run(main())


def test_deadline_in_queue_and_cancel_free_the_place():
    async def main():
        adm = Admission(max_running=1, max_queued=2)
        release, order = asyncio.Event(), []
        holder = asyncio.create_task(_hold(adm, "a", release, order))
        await until(lambda: adm.running == 1)
        t0 = time.monotonic()
        with pytest.raises(TunewireError) as e:
            async with adm.slot("b", time.monotonic() + 0.05):
                pass
        assert e.value.reason == "DEADLINE_EXCEEDED_IN_QUEUE" and time.monotonic() - t0 < 1
        waiting = asyncio.create_task(_hold(adm, "c", release, order))
        await until(lambda: adm.queued == 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert adm.queued == 0 and adm.running == 1
        release.set()
        await holder
        assert adm.running == 0

    asyncio.run(main())


def test_cancel_in_the_instant_of_admission_is_not_swallowed():
    """The slot frees and the waiter's client cancels in the same loop turn: the waiter must see
    CancelledError (not run its request) and give the slot back. asyncio.wait_for on 3.11 swallowed
    this cancel, and a request nobody was listening to ran to the end on the engine."""
    async def main():
        adm = Admission(max_running=1, max_queued=2)
        release, order = asyncio.Event(), []
        holder = asyncio.create_task(_hold(adm, "a", release, order))
        await until(lambda: adm.running == 1)
        done = asyncio.Event()
        done.set()  # were the cancel swallowed, the request would "run" and return at once
        waiter = asyncio.create_task(_hold(adm, "b", done, order, time.monotonic() + 60))
        await until(lambda: adm.queued == 1)
        release.set()
        await holder          # frees the slot: the waiter's future is set, the waiter not yet run
        waiter.cancel()       # ...and its client goes away in the same instant
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert [k for k, _ in order] == ["a"], "the cancelled waiter ran its request"
        assert (adm.running, adm.queued) == (0, 0)

    asyncio.run(main())


def test_label_limiter_bounds_cardinality():
    label = LabelLimiter(2)
    assert [label(n) for n in ("", "a", "b", "c", "a", "d")] == ["base", "a", "b", "other", "a", "other"]
