"""Scheduler: coalescing, token budgets, deadlines, cancellation, back-pressure.

No test orders events by sleeping: the fake engine says when it has started a
batch and blocks until released, and the tests wait for states (engine busy,
items queued, a caller gone, a deadline passed) before taking the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rmserve.service.errors import DeadlineExceeded, QueueFull
from rmserve.service.scheduler import Scheduler

# How long a test waits for a state before failing (or the blocked engine gives up): a hang
# guard for a broken scheduler, never reached when it works, however loaded the machine.
HANG_GUARD_S = 60.0


class Recorder:
    """A fake engine: records the batches it ran; optionally blocks until released.

    `started` is set as soon as the engine holds a batch (before it blocks).
    """

    def __init__(self, block: bool = False):
        self.batches: list[tuple[object, list]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, key, payloads):
        self.started.set()
        self.release.wait(HANG_GUARD_S)
        self.batches.append((key, list(payloads)))
        return [p * 10 for p in payloads]


async def until(condition, what: str) -> None:
    """Yield to the event loop until `condition()` holds."""
    end = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        await asyncio.sleep(0.001)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_are_coalesced_into_one_batch():
    """Six callers' 12 items make exactly the token budget, so the batch closes on the budget: it
    cannot close on time (max_wait_s is an hour), and it holds every caller's items."""

    async def main():
        rec = Recorder()
        s = Scheduler(rec, token_budget=60, max_wait_s=3600)
        s.start()
        callers = asyncio.gather(*(s.submit("m", [i, i + 100], [5, 5]) for i in range(6)))
        results = await asyncio.wait_for(callers, HANG_GUARD_S)
        await s.stop()
        return rec, results

    rec, results = run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(6)]
    assert len(rec.batches) == 1 and len(rec.batches[0][1]) == 12


def test_token_budget_closes_batches_and_keys_never_mix():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, token_budget=20, max_wait_s=0.01)
        s.start()
        await asyncio.gather(s.submit("v1", list(range(5)), [8] * 5), s.submit("v2", [7, 8], [8, 8]))
        await s.stop()
        return rec

    rec = run(main())
    for key, payloads in rec.batches:
        assert len(payloads) * 8 <= 20
        assert all((p in (7, 8)) == (key == "v2") for p in payloads)
    assert sorted(p for _, b in rec.batches for p in b) == [0, 1, 2, 3, 4, 7, 8]


def test_expired_samples_fail_with_deadline_exceeded_and_are_not_computed():
    async def main():
        rec = Recorder(block=True)
        s = Scheduler(rec, token_budget=1, max_wait_s=0.0)
        s.start()
        try:
            first = asyncio.ensure_future(s.submit("m", [1], [1]))
            await until(rec.started.is_set, "the engine is busy with [1]")
            deadline = time.monotonic() + 0.05
            late = asyncio.ensure_future(s.submit("m", [2], [1], deadline=deadline))
            await until(lambda: s.depth == 1, "[2] waits in the queue")
            await until(lambda: time.monotonic() > deadline, "[2]'s deadline passed")
            rec.release.set()
            assert await first == [10]
            with pytest.raises(DeadlineExceeded):
                await late
        finally:
            rec.release.set()
            await s.stop()
        return rec

    rec = run(main())
    assert [b for _, b in rec.batches] == [[1]]


def test_cancelled_callers_are_dropped_before_compute():
    async def main():
        rec = Recorder(block=True)
        s = Scheduler(rec, token_budget=1, max_wait_s=0.0)
        s.start()
        try:
            first = asyncio.ensure_future(s.submit("m", [1], [1]))
            await until(rec.started.is_set, "the engine is busy with [1]")
            gone = asyncio.ensure_future(s.submit("m", [2, 3], [1, 1]))
            await until(lambda: s.depth == 2, "[2, 3] wait in the queue")
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone  # the caller has left: its items' futures are cancelled
            rec.release.set()
            await first
            kept = await s.submit("m", [4], [1])
        finally:
            rec.release.set()
            await s.stop()
        return rec, kept

    rec, kept = run(main())
    assert kept == [40]
    assert [b for _, b in rec.batches] == [[1], [4]]


def test_full_queue_refuses_with_a_retry_hint():
    async def main():
        rec = Recorder(block=True)
        s = Scheduler(rec, max_queue=3, token_budget=1, max_wait_s=0.0)
        s.start()
        try:
            busy = asyncio.ensure_future(s.submit("m", [1], [1]))
            await until(rec.started.is_set, "the engine is busy with [1]")
            waiting = asyncio.ensure_future(s.submit("m", [2, 3], [1, 1]))
            await until(lambda: s.depth == 2, "[2, 3] wait in the queue")
            with pytest.raises(QueueFull) as err:
                await s.submit("m", [4, 5], [1, 1])  # 2 queued + 2 > max_queue 3
            assert s.depth == 2  # the refused items were never queued
            rec.release.set()
            assert await busy == [10] and await waiting == [20, 30]
        finally:
            rec.release.set()
            await s.stop()
        return err.value

    err = run(main())
    assert err.retry_after_s > 0 and "queue is full" in str(err)


def test_an_engine_failure_reaches_every_caller_of_the_batch():
    def broken(key, payloads):
        raise RuntimeError("boom")

    async def main():
        s = Scheduler(broken, max_wait_s=0.01)
        s.start()
        res = await asyncio.gather(s.submit("m", [1], [1]), s.submit("m", [2], [1]), return_exceptions=True)
        await s.stop()
        return res

    assert all(isinstance(r, RuntimeError) for r in run(main()))
