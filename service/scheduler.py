"""The request queue: many callers' samples coalesced into token-budget batches.

The scheduler knows nothing of models. Callers `submit` opaque payloads with a
cost (tokens) and a key; one background task closes a batch when it holds
`token_budget` tokens or its oldest item has waited `max_wait_s`, and runs it
with `run_batch(key, payloads)` on a single worker thread, so the event loop
never computes. Items of different keys (model versions) never share a batch.

Items whose caller left (cancelled future) are dropped before they cost
compute; items past their deadline fail with DeadlineExceeded. A full queue
refuses new work at once with QueueFull and a retry hint, rather than letting
latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rmserve.service.errors import DeadlineExceeded, QueueFull, Unavailable


class SchedulerObserver(Protocol):
    def queue_depth(self, items: int) -> None: ...
    def batch_formed(self, items: int, tokens: int, waits_s: Sequence[float]) -> None: ...
    def dropped(self, reason: str, items: int) -> None: ...


@dataclass(eq=False)
class _Item:
    key: Hashable
    payload: Any
    cost: int
    deadline: float | None       # time.monotonic() seconds
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Any]], list[Any]],
        *,
        max_queue: int = 4096,
        token_budget: int = 16384,
        max_batch_items: int = 512,
        max_wait_s: float = 0.005,
        observer: SchedulerObserver | None = None,
    ):
        self._run_batch = run_batch
        self.max_queue = max_queue
        self.token_budget = token_budget
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_s
        self._observer = observer
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        # One thread: the engine runs one batch at a time and owns the cores.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmserve-engine")
        self._tokens_per_s = 2000.0  # refined from measured batches; only used for retry hints

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="rmserve-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Unavailable("the server is shutting down; retry on another replica"))
        self._queue.clear()
        self._worker.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- submit -----------------------------------------------------------------

    async def submit(
        self, key: Hashable, payloads: Sequence[Any], costs: Sequence[int], deadline: float | None = None
    ) -> list[Any]:
        """Results for `payloads`, in order. Cancelling the caller drops its queued items."""
        if len(self._queue) + len(payloads) > self.max_queue:
            queued_tokens = sum(i.cost for i in self._queue)
            retry = max(0.05, queued_tokens / self._tokens_per_s)
            raise QueueFull(
                f"the scoring queue is full ({len(self._queue)} samples waiting, limit {self.max_queue}); "
                f"retry in about {retry:.2f} s or send fewer samples at once",
                retry_after_s=retry,
            )
        loop = asyncio.get_running_loop()
        items = [_Item(key, p, int(c), deadline, loop.create_future()) for p, c in zip(payloads, costs, strict=True)]
        self._queue.extend(items)
        self._notify_depth()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for i in items:  # a caller that left (or failed) frees its queued items
                if not i.future.done():
                    i.future.cancel()

    # -- the loop ---------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._purge()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._queue[0]
            ready_tokens = sum(i.cost for i in self._queue if i.key == oldest.key)
            wait = oldest.enqueued + self.max_wait_s - time.monotonic()
            if ready_tokens < self.token_budget and wait > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                continue
            batch = self._take(oldest.key)
            if not batch:
                continue
            now = time.monotonic()
            tokens = sum(i.cost for i in batch)
            if self._observer:
                self._observer.batch_formed(len(batch), tokens, [now - i.enqueued for i in batch])
            t0 = time.monotonic()
            try:
                results = await loop.run_in_executor(self._worker, self._run_batch, batch[0].key, [i.payload for i in batch])
            except Exception as e:  # the whole batch failed: every caller hears why
                for i in batch:
                    if not i.future.done():
                        i.future.set_exception(e)
                continue
            elapsed = time.monotonic() - t0
            if elapsed > 0:
                self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (tokens / elapsed)
            for i, r in zip(batch, results, strict=True):
                if not i.future.done():
                    i.future.set_result(r)

    def _purge(self) -> None:
        """Drop cancelled items and fail expired ones before they cost compute."""
        now = time.monotonic()
        kept: collections.deque[_Item] = collections.deque()
        cancelled = expired = 0
        for i in self._queue:
            if i.future.done():
                cancelled += 1
            elif i.deadline is not None and now >= i.deadline:
                i.future.set_exception(DeadlineExceeded("the deadline passed while the sample waited in the queue"))
                expired += 1
            else:
                kept.append(i)
        if cancelled or expired:
            self._queue = kept
            if self._observer:
                if cancelled:
                    self._observer.dropped("cancelled", cancelled)
                if expired:
                    self._observer.dropped("deadline", expired)
            self._notify_depth()

    def _take(self, key: Hashable) -> list[_Item]:
        """FIFO items of `key` up to the token budget (at least one)."""
        batch: list[_Item] = []
        rest: collections.deque[_Item] = collections.deque()
        tokens = 0
        for i in self._queue:
            fits = not batch or (tokens + i.cost <= self.token_budget and len(batch) < self.max_batch_items)
            if i.key == key and fits and not i.future.done():
                batch.append(i)
                tokens += i.cost
            else:
                rest.append(i)
        self._queue = rest
        self._notify_depth()
        return batch

    def _notify_depth(self) -> None:
        if self._observer:
            self._observer.queue_depth(len(self._queue))
