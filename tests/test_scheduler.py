"""Scheduler: coalescing, token budgets, deadlines, cancellation, back-pressure."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rmserve.service.errors import DeadlineExceeded, QueueFull
from rmserve.service.scheduler import Scheduler


class Recorder:
    """A fake engine: records the batches it ran; optionally blocks until released."""

    def __init__(self, block: bool = False):
        self.batches: list[tuple[object, list]] = []
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, key, payloads):
        self.release.wait(5)
        self.batches.append((key, list(payloads)))
        return [p * 10 for p in payloads]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_are_coalesced_into_one_batch():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, token_budget=1000, max_wait_s=0.05)
        s.start()
        results = await asyncio.gather(*(s.submit("m", [i, i + 100], [5, 5]) for i in range(6)))
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
        first = asyncio.ensure_future(s.submit("m", [1], [1]))
        await asyncio.sleep(0.05)  # the engine is now busy with [1]
        late = asyncio.ensure_future(s.submit("m", [2], [1], deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.15)
        rec.release.set()
        assert await first == [10]
        with pytest.raises(DeadlineExceeded):
            await late
        await s.stop()
        return rec

    rec = run(main())
    assert [b for _, b in rec.batches] == [[1]]


def test_cancelled_callers_are_dropped_before_compute():
    async def main():
        rec = Recorder(block=True)
        s = Scheduler(rec, token_budget=1, max_wait_s=0.0)
        s.start()
        first = asyncio.ensure_future(s.submit("m", [1], [1]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(s.submit("m", [2, 3], [1, 1]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        rec.release.set()
        await first
        kept = await s.submit("m", [4], [1])
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
        busy = asyncio.ensure_future(s.submit("m", [1], [1]))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(s.submit("m", [2, 3], [1, 1]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as err:
            await s.submit("m", [4, 5], [1, 1])
        rec.release.set()
        assert await busy == [10] and await waiting == [20, 30]
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
