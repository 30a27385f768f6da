"""A drop-in verl reward function backed by an rmserve server.

verl's reward loop (config: `reward.custom_reward_function.path=pkg://rmserve.client.verl`,
`name=compute_score`; examples/verl.md) calls a custom reward function once per sample,

    await compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **reward_kwargs)

from `reward.num_workers` workers, each scoring its share of the batch with
`asyncio.gather`. `compute_score` here is that function (an `async def`, so
verl awaits it on its own loop instead of running it in a thread): the
concurrent per-sample calls of one process are coalesced by a micro-batcher
into a few batched Score RPCs, and each call gets back

    {"score": float, "rm_reward": float, "rm_std": float, "rm_epistemic": float, "rm_ood": float}

verl puts the keys other than "score" into `reward_extra_info`, which needs the
same keys for every sample, so every key is always there: a value the server
does not provide (no epistemic statistics in the model, no OOD score in this
server version) is NaN, which verl's aggregation (numpy mean/std) carries
through as "not available" rather than as a fake zero.

`solution_str` is the response only. The prompt comes from
`extra_info["prompt"]` (text or chat messages) or `extra_info["raw_prompt"]`;
the dataset's preprocessing puts it there (examples/verl.md). Without either,
the response is scored alone, as `{"prompt": "", "response": solution_str}`.

Settings, most specific first: `extra_info["rmserve_<name>"]` for one sample,
then the keyword arguments verl passes (`reward.custom_reward_function.reward_kwargs`),
then environment variables, then defaults:

    address         RMSERVE_ADDRESS               127.0.0.1:50051
    api_key         RMSERVE_API_KEY               none
    field           RMSERVE_FIELD                 reward  (reward | conservative | min: what "score" is)
    run_id          RMSERVE_RUN_ID                none    (tags calls for the server's run monitor)
    step            extra_info "global_step"/"step"; else RMSERVE_STEP_GAP_S (see below)
    uncertainty_penalty RMSERVE_UNCERTAINTY_PENALTY  the model's default
    timeout         RMSERVE_TIMEOUT               none    (seconds, per batched call)
    max_wait_ms     RMSERVE_MAX_WAIT_MS           5       (how long the batcher waits for more calls)
    max_batch       RMSERVE_MAX_BATCH             256     (flush at once at this many samples)
    max_retries     RMSERVE_MAX_RETRIES           the SDK's (4; on UNAVAILABLE / RESOURCE_EXHAUSTED)

verl does not put the trainer step into `extra_info`. With
`RMSERVE_STEP_GAP_S=g` (> 0), a process numbers its reward rounds itself: a
call that comes after `g` seconds without any call starts the next step (verl
scores a whole batch, then trains for a while), so the run monitor sees steps.

verl itself is never imported here, and nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rmserve.client import _core
from rmserve.client.async_client import AsyncRewardClient
from rmserve.client.errors import InvalidRequestError
from rmserve.client.types import ScoreResult

__all__ = [
    "EXTRA_KEYS",
    "MicroBatcher",
    "as_reward_dict",
    "batchers",
    "build_sample",
    "compute_score",
    "compute_score_batch",
    "compute_score_sync",
    "reset",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_BATCH = 256
FIELDS = ("reward", "conservative", "min")
#: The keys of every dict `compute_score` returns, in order.
EXTRA_KEYS = ("score", "rm_reward", "rm_std", "rm_epistemic", "rm_ood")
NAN = float("nan")


# ---------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class _Settings:
    address: str
    api_key: str | None
    field: str
    run_id: str | None
    step: int | None
    uncertainty_penalty: float | None
    timeout: float | None
    max_wait_ms: float
    max_batch: int
    max_retries: int | None


def _pick(name: str, extra_info: Mapping[str, Any], kwargs: Mapping[str, Any], env: str) -> Any:
    value = extra_info.get(f"rmserve_{name}")
    if value is None:
        value = kwargs.get(name)
    if value is None:
        value = os.environ.get(env) or None
    return value


def _float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"rmserve verl: {name} must be a number, got {value!r}") from None


def _settings(extra_info: Mapping[str, Any], kwargs: Mapping[str, Any]) -> _Settings:
    field = str(_pick("field", extra_info, kwargs, "RMSERVE_FIELD") or "reward")
    if field not in FIELDS:
        raise ValueError(f"rmserve verl: field must be one of {FIELDS}, got {field!r}")
    max_wait = _float(_pick("max_wait_ms", extra_info, kwargs, "RMSERVE_MAX_WAIT_MS"), "max_wait_ms")
    max_batch = _pick("max_batch", extra_info, kwargs, "RMSERVE_MAX_BATCH")
    timeout = _float(_pick("timeout", extra_info, kwargs, "RMSERVE_TIMEOUT"), "timeout")
    run_id = _pick("run_id", extra_info, kwargs, "RMSERVE_RUN_ID")
    retries = _pick("max_retries", extra_info, kwargs, "RMSERVE_MAX_RETRIES")
    return _Settings(
        address=str(_pick("address", extra_info, kwargs, "RMSERVE_ADDRESS") or DEFAULT_ADDRESS),
        api_key=_pick("api_key", extra_info, kwargs, "RMSERVE_API_KEY"),
        field=field,
        run_id=None if run_id is None else str(run_id),
        step=_step(extra_info, kwargs),
        uncertainty_penalty=_float(
            _pick("uncertainty_penalty", extra_info, kwargs, "RMSERVE_UNCERTAINTY_PENALTY"), "uncertainty_penalty"
        ),
        timeout=timeout if timeout and timeout > 0 else None,
        max_wait_ms=DEFAULT_MAX_WAIT_MS if max_wait is None else max(max_wait, 0.0),
        max_batch=max(int(max_batch), 1) if max_batch is not None else DEFAULT_MAX_BATCH,
        max_retries=None if retries is None else int(retries),
    )


_round_lock = threading.Lock()
_round = {"step": -1, "last": -math.inf}


def _step(extra_info: Mapping[str, Any], kwargs: Mapping[str, Any]) -> int | None:
    for value in (extra_info.get("rmserve_step"), kwargs.get("step"),
                  extra_info.get("global_step"), extra_info.get("step")):
        if value is not None:
            return int(value)
    gap = _float(kwargs.get("step_gap_s") or os.environ.get("RMSERVE_STEP_GAP_S") or None, "step_gap_s")
    if not gap or gap <= 0:
        return None
    with _round_lock:  # a process-wide round counter: a pause of `gap` seconds starts the next step
        now = time.monotonic()
        if now - _round["last"] > gap:
            _round["step"] += 1
        _round["last"] = now
        return _round["step"]


# ---------------------------------------------------------------------------
# The sample


def _plain(value: Any) -> Any:
    """numpy arrays (verl's non-tensor batch holds object arrays) as lists."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _prompt(extra_info: Mapping[str, Any]) -> str | list[dict[str, str]]:
    for key in ("prompt", "raw_prompt"):
        prompt = _plain(extra_info.get(key))
        if prompt is None:
            continue
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, Mapping):
            prompt = [prompt]
        if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
            return [
                {"role": str(m["role"]),
                 "content": _core.message_text(_plain(m.get("content")), f"extra_info[{key!r}], message {j} content")}
                for j, m in enumerate(prompt)
            ]
        raise InvalidRequestError(
            f"rmserve verl: extra_info[{key!r}] must be text or chat messages "
            f"([{{'role': ..., 'content': ...}}, ...]), got {type(prompt).__name__}"
        )
    return ""


def build_sample(solution_str: Any, extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Score sample for one verl call: the prompt from `extra_info`, the response from `solution_str`.

    Message content reads as everywhere in the SDK (`_core.message_text`): text parts joined,
    any other part refused with its index and type."""
    return {"prompt": _prompt(extra_info or {}), "response": _core.message_text(_plain(solution_str), "solution_str")}


def as_reward_dict(result: ScoreResult, field: str = "reward") -> dict[str, float]:
    """verl's reward dict for one result: `score` (the chosen field) and the same extras every time."""

    def num(value: Any) -> float:
        return NAN if value is None else float(value)

    return {
        "score": float(getattr(result, field)),
        "rm_reward": float(result.reward),
        "rm_std": float(result.std),
        "rm_epistemic": num(result.epistemic),
        "rm_ood": num(getattr(result, "ood", None)),
    }


# ---------------------------------------------------------------------------
# The micro-batcher


_BatchKey = tuple[str | None, int | None, float | None, float | None]  # run_id, step, penalty, timeout


class MicroBatcher:
    """Coalesces concurrent single-sample score calls on one event loop into batched Score calls.

    A sample waits at most `max_wait_ms` for others (or until `max_batch` are
    waiting); then all waiting samples with the same call options go out in
    one `client.score(...)`, and each caller's future gets its own result. An
    error fails exactly the callers of that batch, with the SDK's typed error;
    except INVALID_ARGUMENT (a sample the server rejects, e.g. a response longer
    than the model's token limit), after which the batch's samples are sent one
    by one, so that only the offending callers fail.
    """

    def __init__(self, client: AsyncRewardClient, *, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.client = client
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch = max_batch
        self._pending: dict[_BatchKey, list[tuple[dict[str, Any], asyncio.Future]]] = {}
        self._timers: dict[_BatchKey, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        #: Batched Score calls sent and samples in them (for logs and tests).
        self.calls = 0
        self.samples = 0

    async def score(self, sample: dict[str, Any], *, run_id: str | None = None, step: int | None = None,
                    uncertainty_penalty: float | None = None, timeout: float | None = None) -> ScoreResult:
        loop = asyncio.get_running_loop()
        key: _BatchKey = (run_id, step, uncertainty_penalty, timeout)
        fut: asyncio.Future = loop.create_future()
        queue = self._pending.setdefault(key, [])
        queue.append((sample, fut))
        if len(queue) >= self.max_batch:
            self._flush(key)
        elif key not in self._timers:
            self._timers[key] = loop.call_later(self.max_wait, self._flush, key)
        return await fut

    def _flush(self, key: _BatchKey) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        items = self._pending.pop(key, [])
        items = [(s, f) for s, f in items if not f.done()]  # callers cancelled while waiting (a verl timeout)
        if not items:
            return
        task = asyncio.get_running_loop().create_task(self._send(key, items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: _BatchKey, items: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        run_id, step, penalty, timeout = key
        self.calls += 1
        self.samples += len(items)
        try:
            results = await self.client.score(
                [s for s, _ in items], run_id=run_id, step=step, uncertainty_penalty=penalty, timeout=timeout
            )
        except asyncio.CancelledError:  # the loop is shutting down
            for _, fut in items:
                fut.cancel()
            raise
        except InvalidRequestError as e:
            if len(items) == 1:
                self._fail(items, e)
                return
            # One sample the server rejects (too long for the model, ...) must not cost the
            # others their reward: send each on its own, so only the bad one gets the error.
            await asyncio.gather(*(self._send(key, [item]) for item in items))
            return
        except Exception as e:  # every caller of the batch gets the SDK's typed error
            self._fail(items, e)
            return
        for (_, fut), result in zip(items, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    @staticmethod
    def _fail(items: list[tuple[dict[str, Any], asyncio.Future]], error: Exception) -> None:
        for _, fut in items:
            if not fut.done():
                fut.set_exception(error)


# One batcher (and one AsyncRewardClient) per (event loop, address, api key): a grpc.aio
# channel belongs to its loop, and verl may run each worker on a loop of its own.
_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, MicroBatcher]] = weakref.WeakKeyDictionary()
_batchers_lock = threading.Lock()


def _batcher(s: _Settings) -> MicroBatcher:
    loop = asyncio.get_running_loop()
    key = (s.address, s.api_key, s.max_wait_ms, s.max_batch, s.max_retries)
    with _batchers_lock:
        # A client's channel keeps its loop alive, so the weak keys alone never let go: drop closed loops.
        for old in [lp for lp in _batchers if lp.is_closed()]:
            del _batchers[old]
        per_loop = _batchers.setdefault(loop, {})
        batcher = per_loop.get(key)
        if batcher is None:
            retries = {} if s.max_retries is None else {"max_retries": s.max_retries}
            client = AsyncRewardClient(s.address, api_key=s.api_key, **retries)
            batcher = per_loop[key] = MicroBatcher(client, max_wait_ms=s.max_wait_ms, max_batch=s.max_batch)
        return batcher


def batchers() -> list[MicroBatcher]:
    """The batchers of the running loop (for inspection)."""
    with _batchers_lock:
        return list(_batchers.get(asyncio.get_running_loop(), {}).values())


async def reset() -> None:
    """Close the running loop's clients and forget its batchers (tests; a worker shutting down)."""
    with _batchers_lock:
        per_loop = _batchers.pop(asyncio.get_running_loop(), {})
    for b in per_loop.values():
        await b.client.close()


# ---------------------------------------------------------------------------
# verl's entry points


async def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's custom reward function: `reward.custom_reward_function.name=compute_score`.

    Returns `{"score", "rm_reward", "rm_std", "rm_epistemic", "rm_ood"}` (NaN
    where the server has no value). `data_source` and `ground_truth` are
    ignored: the reward model judges the response to the prompt. Raises the
    SDK's `RewardServiceError` subclasses (bad address, wrong key, ...), and
    `InvalidRequestError` (a ValueError too) for a prompt or response it cannot read. Extra keyword arguments that are
    not settings (verl's `reward_router_address`, ...) are ignored.
    """
    extra_info = extra_info if isinstance(extra_info, Mapping) else {}
    s = _settings(extra_info, kwargs)
    sample = build_sample(solution_str, extra_info)
    _core.build_sample(sample, 0)  # a malformed sample fails its own caller, not its whole batch
    result = await _batcher(s).score(
        sample, run_id=s.run_id, step=s.step, uncertainty_penalty=s.uncertainty_penalty, timeout=s.timeout
    )
    return as_reward_dict(result, s.field)


# The sync entry points run the async path on one background loop per process, so that
# threads calling them at once (verl's run_in_executor) are still batched together.
_bg: dict[str, Any] = {"loop": None, "pid": None}
_bg_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    with _bg_lock:
        if _bg["loop"] is None or _bg["pid"] != os.getpid() or _bg["loop"].is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rmserve-verl", daemon=True).start()
            _bg.update(loop=loop, pid=os.getpid())
        return _bg["loop"]


def _run(coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


def compute_score_sync(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """`compute_score` for callers that cannot await (verl's legacy `naive` reward manager)."""
    return _run(compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs))


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    **kwargs: Any,
) -> list[dict[str, float]]:
    """For verl's `batch` reward manager, which passes whole lists: one dict per sample, in order."""

    async def all_of_them() -> list[dict[str, float]]:
        infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        return list(await asyncio.gather(*(
            compute_score(d, r, g, e, **kwargs)
            for d, r, g, e in zip(data_sources, solution_strs, ground_truths, infos, strict=True)
        )))

    return _run(all_of_them())
