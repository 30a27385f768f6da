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

Groups: a caller may mark payloads as one group (`submit(..., groups=)`: a GRPO
prompt's completions). A batch takes a group whole or leaves it for the next
batch, so the engine sees every completion of a prompt together and encodes
the prompt once; cutting a group across batches encodes its prompt once per
piece (measured: 16 groups of 8 through one ScoreGroups call cut into 4 batches
ran at 0.91 of the in-process engine; whole, see
bench/results/cpu-grpo-host-2026-12-06.md). Only a group larger than a whole
batch is cut, at the budget.

Fairness: each item carries its client (an API key, a connection). One client
may hold at most `max_queue_per_client` samples queued or being scored, and a
batch takes items in turn from each client's backlog, so a flood from one
client neither fills the queue nor makes everyone else wait behind it.

Faults: a batch whose run fails is split in half and each half run again,
down to single items, so a poisoned sample fails alone (`SampleFailed`, with
its index in the request) and the rest of its batch is answered. Whatever goes
wrong, every admitted item gets an answer: an unexpected error in the loop
fails the items it concerned and the loop goes on; stopping fails the queued
and the running items.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rmserve.service.server.errors import DeadlineExceeded, QueueFull, SampleFailed, Unavailable

log = logging.getLogger("rmserve.scheduler")


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
    client: Hashable | None = None  # None: not subject to the per-client cap
    enqueued: float = field(default_factory=time.monotonic)
    group: Hashable | None = None   # items of one group go into one batch (see _take)


@dataclass(frozen=True)
class _Failed:
    """An item's run raised (alone, after splitting): the value its caller gets raised."""

    error: BaseException


class Scheduler:
    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Any]], list[Any]],
        *,
        max_queue: int = 4096,
        token_budget: int = 16384,
        max_batch_items: int = 512,
        max_wait_s: float = 0.005,
        max_queue_per_client: int | None = None,
        observer: SchedulerObserver | None = None,
    ):
        self._run_batch = run_batch
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client
        self._outstanding: collections.Counter[Hashable] = collections.Counter()  # per client: admitted, unanswered
        self._running: list[_Item] = []  # the batch on the worker now (out of the queue, not yet answered)
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
        self._fail([*self._running, *self._queue], Unavailable("the server is shutting down; retry on another replica"))
        self._running = []
        self._queue.clear()
        self._worker.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- submit -----------------------------------------------------------------

    async def submit(
        self,
        key: Hashable,
        payloads: Sequence[Any],
        costs: Sequence[int],
        deadline: float | None = None,
        client: Hashable | None = None,
        groups: Sequence[Hashable] | None = None,
    ) -> list[Any]:
        """Results for `payloads`, in order. Cancelling the caller drops its queued items.

        `client` is who asks (None: exempt from the per-client cap). `groups`: a label per
        payload; consecutive payloads with equal labels are one group, which a batch takes
        whole (unless it alone is over the token budget). A payload whose run failed alone
        raises `SampleFailed` with its index in `payloads`.
        """
        if not payloads:
            return []
        self._admit(len(payloads), client)
        loop = asyncio.get_running_loop()
        call = object()  # labels are the caller's: groups of two calls never merge
        labels = [None] * len(payloads) if groups is None else [(call, g) for g in groups]
        items = [_Item(key, p, int(c), deadline, loop.create_future(), client, group=g)
                 for p, c, g in zip(payloads, costs, labels, strict=True)]
        self._queue.extend(items)
        if client is not None:
            self._outstanding[client] += len(items)
        self._notify_depth()
        self._wakeup.set()
        try:
            futures = [i.future for i in items]
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            failed = [(n, e) for n, f in enumerate(futures)  # .exception() also marks each one as heard
                      if f.done() and not f.cancelled() and (e := f.exception()) is not None]
            if failed:
                n, e = failed[0]
                if isinstance(e, SampleFailed):
                    e.index = n
                raise e
            return [f.result() for f in futures]
        finally:
            for i in items:  # a caller that left (or failed) frees its queued items
                if not i.future.done():
                    i.future.cancel()
            if client is not None:
                self._outstanding[client] -= len(items)
                if self._outstanding[client] <= 0:
                    del self._outstanding[client]

    def _admit(self, n: int, client: Hashable | None) -> None:
        """Refuse at once what the queue cannot take, with a retry hint (negative where
        waiting cannot help: the request alone is over a limit)."""
        cap = self.max_queue_per_client
        if n > self.max_queue or (client is not None and cap is not None and n > cap):
            limit = self.max_queue if n > self.max_queue else cap
            raise QueueFull(
                f"the request has {n} samples, more than the queue takes from one caller ({limit}); "
                "send fewer samples at once", retry_after_s=-1.0,
            )
        if client is not None and cap is not None and self._outstanding[client] + n > cap:
            held = self._outstanding[client]
            retry = self._retry_after(sum(i.cost for i in self._queue if i.client == client))
            raise QueueFull(
                f"this client already has {held} samples queued or being scored and may have at most {cap} "
                f"(--max-queue-per-client); retry in about {retry:.2f} s, or wait for answers before sending more",
                retry_after_s=retry,
            )
        if len(self._queue) + n > self.max_queue:
            retry = self._retry_after(sum(i.cost for i in self._queue))
            raise QueueFull(
                f"the scoring queue is full ({len(self._queue)} samples waiting, limit {self.max_queue}); "
                f"retry in about {retry:.2f} s or send fewer samples at once",
                retry_after_s=retry,
            )

    def _retry_after(self, tokens: int) -> float:
        """Seconds until `tokens` queued tokens are scored, at the measured rate."""
        return max(0.05, tokens / self._tokens_per_s)

    # -- the loop ---------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not strand callers: whoever it concerned hears it
                log.exception("scheduler: unexpected error; failing the samples it concerned")
                self._fail(self._running or list(self._queue), e)
                if not self._running:
                    self._queue.clear()
                    self._notify_depth()
            self._running = []

    async def _step(self) -> None:
        """Wait for a batch to close and run it, or return after waiting (the loop comes back)."""
        self._purge()
        if not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
            return
        oldest = self._queue[0]
        ready_tokens = sum(i.cost for i in self._queue if i.key == oldest.key)
        wait = oldest.enqueued + self.max_wait_s - time.monotonic()
        if ready_tokens < self.token_budget and wait > 0:
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
            return
        batch = self._running = self._take(oldest.key)
        if not batch:
            return
        now = time.monotonic()
        tokens = sum(i.cost for i in batch)
        if self._observer:
            self._observer.batch_formed(len(batch), tokens, [now - i.enqueued for i in batch])
        t0 = time.monotonic()
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self._worker, self._run_isolating, batch[0].key, [i.payload for i in batch]
        )
        elapsed = time.monotonic() - t0
        if elapsed > 0:
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (tokens / elapsed)
        for i, out in zip(batch, outcomes, strict=True):
            if i.future.done():
                continue
            if isinstance(out, _Failed):
                i.future.set_exception(SampleFailed(out.error))
            else:
                i.future.set_result(out)

    def _run_isolating(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        """run_batch on the worker thread. If it raises, each half is run again (recursively):
        a poisoned item costs log2(batch) extra runs and fails alone, as `_Failed`. A result
        that is an exception instance fails its item alone too (run_batch's per-item errors)."""
        try:
            results = self._run_batch(key, payloads)
            if len(results) != len(payloads):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(payloads)} inputs")
        except BaseException as e:  # a SystemExit on the worker too: every caller must hear an answer
            if len(payloads) == 1:
                return [_Failed(e)]
            log.warning("a batch of %d failed (%s: %s); running its halves apart to isolate the cause",
                        len(payloads), type(e).__name__, e)
            half = len(payloads) // 2
            return self._run_isolating(key, payloads[:half]) + self._run_isolating(key, payloads[half:])
        return [_Failed(r) if isinstance(r, BaseException) else r for r in results]

    def _fail(self, items: Sequence[_Item], error: BaseException) -> None:
        for i in items:
            if not i.future.done():
                i.future.set_exception(error)

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
        """Items of `key` up to the token budget (at least one), taken in turn from each
        client's FIFO backlog (clients in the order they first appear in the queue); with
        one client, plain FIFO. An item that does not fit waits for the next batch. A group
        (consecutive items of one `submit` with equal labels) is taken as one unit: whole,
        or not at all; only a group that is first in an empty batch and alone over the
        budget or the item cap is cut (its first items, at least one)."""
        lanes: dict[Hashable, collections.deque[list[_Item]]] = {}
        for i in self._queue:
            if i.key == key and not i.future.done():
                lane = lanes.setdefault(i.client, collections.deque())
                if i.group is not None and lane and lane[-1][-1].group == i.group:
                    lane[-1].append(i)
                else:
                    lane.append([i])
        batch: list[_Item] = []
        tokens = 0
        while lanes and len(batch) < self.max_batch_items:
            for client in list(lanes):
                lane = lanes[client]
                unit = lane.popleft()
                if not lane:
                    del lanes[client]
                cost = sum(i.cost for i in unit)
                if batch and (tokens + cost > self.token_budget or len(batch) + len(unit) > self.max_batch_items):
                    continue
                if not batch and (cost > self.token_budget or len(unit) > self.max_batch_items):
                    unit, cost = self._head(unit)
                batch.extend(unit)
                tokens += cost
                if len(batch) >= self.max_batch_items:
                    break
        taken = set(batch)
        self._queue = collections.deque(i for i in self._queue if i not in taken)
        self._notify_depth()
        return batch

    def _head(self, unit: list[_Item]) -> tuple[list[_Item], int]:
        """The first items of an oversized group that fit the budget and the item cap (at least one)."""
        out, tokens = [unit[0]], unit[0].cost
        for i in unit[1:]:
            if tokens + i.cost > self.token_budget or len(out) >= self.max_batch_items:
                break
            out.append(i)
            tokens += i.cost
        return out, tokens

    def _notify_depth(self) -> None:
        if self._observer:
            self._observer.queue_depth(len(self._queue))
