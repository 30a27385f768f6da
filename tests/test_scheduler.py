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

from rmserve.service.server.errors import DeadlineExceeded, QueueFull, SampleFailed, Unavailable
from rmserve.service.server.scheduler import Scheduler

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

    res = run(main())
    assert all(isinstance(r, SampleFailed) and isinstance(r.cause, RuntimeError) for r in res), res
    assert "boom" in str(res[0])


def test_a_poisoned_item_fails_alone_and_the_rest_of_its_batch_is_answered():
    """Three callers share one batch (it closes on the budget); the engine raises for any batch
    holding -1. The batch is split until -1 runs alone: only its caller fails, naming its index."""
    runs: list[list[int]] = []

    def engine(key, payloads):
        runs.append(list(payloads))
        if -1 in payloads:
            raise ValueError("poisoned")
        return [p * 10 for p in payloads]

    async def main():
        s = Scheduler(engine, token_budget=6, max_wait_s=3600)
        s.start()
        res = await asyncio.wait_for(asyncio.gather(
            s.submit("m", [1, 2], [1, 1]), s.submit("m", [3, -1, 4], [1, 1, 1]), s.submit("m", [5], [1]),
            return_exceptions=True,
        ), HANG_GUARD_S)
        await s.stop()
        return res

    ok_a, bad, ok_c = run(main())
    assert ok_a == [10, 20] and ok_c == [50]
    assert isinstance(bad, SampleFailed) and bad.index == 1 and isinstance(bad.cause, ValueError)
    assert "sample 1" in str(bad) and "poisoned" in str(bad)
    assert sorted(runs[0]) == [-1, 1, 2, 3, 4, 5]  # one batch first
    assert [-1] in runs and sum(len(r) for r in runs if -1 not in r) == 5  # every other item ran once


def test_an_exception_returned_for_one_item_fails_only_that_item():
    """run_batch may answer an item with an exception instance (the server does for a NaN score)."""

    def engine(key, payloads):
        return [ValueError(f"bad {p}") if p < 0 else p * 10 for p in payloads]

    async def main():
        s = Scheduler(engine, token_budget=3, max_wait_s=3600)
        s.start()
        res = await asyncio.wait_for(asyncio.gather(
            s.submit("m", [1], [1]), s.submit("m", [2, -3], [1, 1]), return_exceptions=True), HANG_GUARD_S)
        await s.stop()
        return res

    ok, bad = run(main())
    assert ok == [10]
    assert isinstance(bad, SampleFailed) and bad.index == 1 and "bad -3" in str(bad)


def test_a_worker_thread_that_raises_base_exception_still_answers_everyone():
    """SystemExit on the engine thread (a 'crash') reaches every caller as an error, and the
    scheduler keeps serving afterwards."""
    crash = threading.Event()
    crash.set()

    def engine(key, payloads):
        if crash.is_set():
            raise SystemExit("engine thread died")
        return [p * 10 for p in payloads]

    async def main():
        s = Scheduler(engine, token_budget=3, max_wait_s=3600)
        s.start()
        res = await asyncio.wait_for(asyncio.gather(
            s.submit("m", [1], [1]), s.submit("m", [2, 3], [1, 1]), return_exceptions=True), HANG_GUARD_S)
        crash.clear()
        after = await asyncio.wait_for(s.submit("m", [4, 5, 6], [1, 1, 1]), HANG_GUARD_S)
        await s.stop()
        return res, after

    res, after = run(main())
    assert all(isinstance(r, SampleFailed) and isinstance(r.cause, SystemExit) for r in res), res
    assert after == [40, 50, 60]


def test_a_bug_in_the_loop_fails_the_batch_it_concerned_and_the_loop_goes_on():
    class BrokenObserver:
        broken = True

        def queue_depth(self, items):
            pass

        def dropped(self, reason, items):
            pass

        def batch_formed(self, items, tokens, waits_s):
            if self.broken:
                self.broken = False
                raise KeyError("observer bug")

    async def main():
        s = Scheduler(Recorder(), token_budget=2, max_wait_s=3600, observer=BrokenObserver())
        s.start()
        first = await asyncio.wait_for(asyncio.gather(s.submit("m", [1, 2], [1, 1]), return_exceptions=True), HANG_GUARD_S)
        second = await asyncio.wait_for(s.submit("m", [3, 4], [1, 1]), HANG_GUARD_S)
        await s.stop()
        return first[0], second

    first, second = run(main())
    assert isinstance(first, KeyError) and second == [30, 40]


def test_stop_answers_the_batch_being_scored_and_the_queue():
    rec = Recorder(block=True)

    async def main():
        s = Scheduler(rec, token_budget=1, max_wait_s=0.0)
        s.start()
        busy = asyncio.ensure_future(s.submit("m", [1], [1]))
        await until(rec.started.is_set, "the engine holds [1]")
        queued = asyncio.ensure_future(s.submit("m", [2], [1]))
        await until(lambda: s.depth == 1, "[2] waits")
        # stop() waits for the engine thread (blocking the loop): release the engine once the
        # scheduler's task has ended, so the running batch's result can no longer be delivered
        task = s._task
        releaser = threading.Thread(target=lambda: (until_done(task), rec.release.set()))
        releaser.start()
        await s.stop()
        releaser.join(HANG_GUARD_S)
        return await asyncio.gather(busy, queued, return_exceptions=True)

    res = run(main())
    assert all(isinstance(r, Unavailable) for r in res), res


def until_done(fut) -> None:
    end = time.monotonic() + HANG_GUARD_S
    while not fut.done() and time.monotonic() < end:
        time.sleep(0.001)


def test_one_client_holds_at_most_its_share_of_the_queue():
    """A greedy client is refused once it holds max_queue_per_client samples (queued or being
    scored), with a retry hint; another client is still admitted and answered."""
    rec = Recorder(block=True)

    async def main():
        s = Scheduler(rec, max_queue=10, max_queue_per_client=4, token_budget=1, max_wait_s=0.0)
        s.start()
        try:
            greedy = [asyncio.ensure_future(s.submit("m", [1, 2], [1, 1], client="greedy")) for _ in range(2)]
            await until(lambda: s.depth + len(rec.batches) + rec.started.is_set() >= 4, "greedy's 4 admitted")
            with pytest.raises(QueueFull) as refused:
                await s.submit("m", [3], [1], client="greedy")
            with pytest.raises(QueueFull) as too_big:
                await s.submit("m", [1] * 5, [1] * 5, client="polite")  # over the cap alone: do not retry
            polite = asyncio.ensure_future(s.submit("m", [7, 8], [1, 1], client="polite"))
            await until(lambda: s.depth >= 4, "polite queued")
            rec.release.set()
            return await asyncio.wait_for(asyncio.gather(*greedy, polite), HANG_GUARD_S), refused.value, too_big.value
        finally:
            rec.release.set()
            await s.stop()

    (g1, g2, polite), refused, too_big = run(main())
    assert g1 == [10, 20] and g2 == [10, 20] and polite == [70, 80]
    assert refused.retry_after_s > 0 and "this client already has 4 samples" in str(refused)
    assert too_big.retry_after_s < 0 and "send fewer" in str(too_big)


def test_batches_take_clients_in_turn():
    """A client with a long backlog does not make a later client wait behind all of it: the
    next batch takes one item from each client in turn."""
    rec = Recorder(block=True)

    async def main():
        s = Scheduler(rec, token_budget=4, max_wait_s=0.0)
        s.start()
        try:
            first = asyncio.ensure_future(s.submit("m", [0], [1], client="a"))
            await until(rec.started.is_set, "the engine holds [0]")
            backlog = asyncio.ensure_future(s.submit("m", list(range(1, 9)), [1] * 8, client="a"))
            await until(lambda: s.depth == 8, "a's backlog queued")
            late = asyncio.ensure_future(s.submit("m", [100, 101], [1, 1], client="b"))
            await until(lambda: s.depth == 10, "b queued")
            rec.release.set()
            await asyncio.wait_for(asyncio.gather(first, backlog, late), HANG_GUARD_S)
        finally:
            rec.release.set()
            await s.stop()

    run(main())
    assert rec.batches[1][1] == [1, 100, 2, 101]
