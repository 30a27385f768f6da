"""A drop-in TRL reward function backed by an rmserve server.

TRL's GRPOTrainer calls each reward function as
`f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **dataset_columns)`
and names it by `__name__`. The function returned here scores the batch
remotely (GRPO groups through ScoreGroups, so each prompt is encoded once),
tags the calls with the trainer step for the server's run monitor, and puts the
ensemble's uncertainty into the trainer's own logs: `rmserve/std` (and
`rmserve/epistemic` and `rmserve/ood_frac` when served) as metrics, per-sample std as a column of the
completions table. trl itself is never imported here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rmserve.client._core import message_text
from rmserve.client.errors import InvalidRequestError, RewardServiceError
from rmserve.client.sync import RewardClient
from rmserve.client.types import ScoreResult

__all__ = ["RewardFunc", "as_trl_reward_func"]

Field = Literal["reward", "conservative", "min"]
_FIELDS = ("reward", "conservative", "min")
OnAlarm = Literal["ignore", "conservative", "min"]
_ON_ALARM = ("ignore", "conservative", "min")


def _messages(msgs: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, str]]:
    """Chat messages with text content. TRL may give None content (a tool-calling turn) or
    typed parts; both read as the SDK reads them (`message_text`: text parts joined, any other
    part refused with its index and type, never dropped)."""
    return [
        {"role": str(m["role"]), "content": message_text(m.get("content"), f"{where}, message {j} content")}
        for j, m in enumerate(msgs)
    ]


def _as_sample(prompt: Any, completion: Any, i: int) -> dict[str, Any]:
    """One Score sample from a TRL (prompt, completion) pair, plain or conversational."""
    if isinstance(completion, str):
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": completion}
        return {"prompt": _messages(prompt, f"prompt {i}"), "response": completion}
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, f"prompt {i}")
    return {"messages": head + _messages(completion, f"completion {i}")}


def _completion_text(completion: Any, i: int) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in _messages(completion, f"completion {i}"))


def _group_completion(completion: Any, i: int) -> str | None:
    """The completion as the single assistant reply ScoreGroups takes, or None when it is more."""
    if isinstance(completion, str):
        return completion
    if (
        isinstance(completion, Sequence)
        and len(completion) == 1
        and isinstance(completion[0], Mapping)
        and completion[0].get("role") == "assistant"
        and not completion[0].get("tool_calls")
    ):
        return message_text(completion[0].get("content"), f"completion {i}, message 0 content")
    return None


def _runs(prompts: Sequence[Any]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive equal prompts (GRPO repeats each prompt G times)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append((start, i))
            start = i
    return runs


class RewardFunc:
    """The callable `as_trl_reward_func` returns; TRL reads its `__name__`.

    Picklable: a client it made itself from an address is not pickled but made
    again on first use, so the function survives being sent to another process.
    """

    def __init__(
        self,
        client_or_address: RewardClient | str,
        *,
        field: Field = "reward",
        uncertainty_penalty: float | None = None,
        run_id: str | None = None,
        name: str | None = None,
        use_groups: bool = True,
        timeout: float | None = None,
        empty_reward: float | None = None,
        on_alarm: OnAlarm = "ignore",
        **client_kwargs: Any,
    ):
        if field not in _FIELDS:
            raise ValueError(f"field must be one of {_FIELDS}, got {field!r}")
        if on_alarm not in _ON_ALARM:
            raise ValueError(f"on_alarm must be one of {_ON_ALARM}, got {on_alarm!r}")
        if isinstance(client_or_address, RewardClient):
            if client_kwargs:
                raise TypeError("client options go to RewardClient(...) when passing a client")
            self._client: RewardClient | None = client_or_address
            self._address: str | None = None
        elif isinstance(client_or_address, str):
            self._client, self._address = None, client_or_address
        else:
            raise TypeError(
                "as_trl_reward_func takes a RewardClient or a 'HOST:PORT' address "
                f"(TRL calls reward functions synchronously), got {type(client_or_address).__name__}"
            )
        self._client_kwargs = client_kwargs
        self.field = field
        self.uncertainty_penalty = uncertainty_penalty
        # The run monitor groups scores by run id; several trainer processes of one
        # run should share it, hence the env var before a random default.
        self.run_id = run_id or os.environ.get("RMSERVE_RUN_ID") or f"trl-{uuid.uuid4().hex[:10]}"
        self.use_groups = use_groups
        self.timeout = timeout
        self.empty_reward = empty_reward
        self.on_alarm = on_alarm
        self.alarmed = False          # the server's run monitor has raised its alarm for this run
        self._monitor_ok = True       # False once the server turned out to have no run monitor
        self.__name__ = name or f"rmserve_{field}"

    @property
    def client(self) -> RewardClient:
        if self._client is None:
            assert self._address is not None
            self._client = RewardClient(self._address, **self._client_kwargs)
        return self._client

    def close(self) -> None:
        """Close the client if this function made it from an address."""
        if self._address is not None and self._client is not None:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._address is not None:
            state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"<{self.__name__}: rmserve {self.field} from {self._address or self._client!r}>"

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        trainer_state: Any = None,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list], None] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per (prompt, completion), in order; logs uncertainty through TRL's hooks.

        An empty completion (a policy may emit EOS at once) is scored like any
        other: the reward model says how bad an empty answer is, so a policy that
        learns to stop at once is penalised. With `empty_reward` set, empty
        completions are not sent and get that value instead (None would be TRL's
        "not applicable", which leaves them unpenalised by this function).
        """
        if len(prompts) != len(completions):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(completions)} completions")
        keep = [
            i for i, c in enumerate(completions)
            if self.empty_reward is None or _completion_text(c, i).strip()
        ]
        if not keep:
            return [self.empty_reward] * len(completions)
        step = getattr(trainer_state, "global_step", None)
        results = self._score([prompts[i] for i in keep], [completions[i] for i in keep], step, keep)
        self._log(results, log_metric, log_extra)
        self._watch_run(log_metric)
        field = self.on_alarm if self.alarmed and self.on_alarm != "ignore" else self.field
        rewards: list[float | None] = [self.empty_reward] * len(completions)
        for i, r in zip(keep, results, strict=True):
            rewards[i] = float(getattr(r, field))
        return rewards

    def _watch_run(self, log_metric: Callable[[str, float], None] | None) -> None:
        """Reads the server's run monitor for this run: logs `rmserve/alarm` (0/1) and
        `rmserve/std_trend` (the latest step's mean std over the run's first steps'), and
        latches `alarmed` so `on_alarm` can switch the reward. A server without the
        monitor (an older version) costs one failed call, then nothing."""
        if not self._monitor_ok:
            return
        try:
            status = self.client.run_status(self.run_id, timeout=self.timeout)
        except RewardServiceError as e:
            if e.code.name in ("UNIMPLEMENTED", "NOT_FOUND"):  # NOT_FOUND: nothing tagged yet
                self._monitor_ok = e.code.name != "UNIMPLEMENTED"
                return
            raise
        self.alarmed = self.alarmed or status.alarm
        if log_metric is None:
            return
        log_metric("rmserve/alarm", float(self.alarmed))
        stds = status.std_mean
        if len(stds) >= 2:
            base = stds[: min(5, len(stds) - 1)]
            mean_base = sum(base) / len(base)
            if mean_base > 0:
                log_metric("rmserve/std_trend", stds[-1] / mean_base)

    def _score(
        self, prompts: Sequence[Any], completions: Sequence[Any], step: int | None, index: Sequence[int]
    ) -> list[ScoreResult]:
        """Scores the pairs; `index` is each pair's position in the trainer's batch (for errors)."""
        options = dict(
            uncertainty_penalty=self.uncertainty_penalty, run_id=self.run_id, step=step, timeout=self.timeout
        )
        runs = _runs(prompts)
        if self.use_groups and any(end - start > 1 for start, end in runs):
            texts = [_group_completion(c, i) for i, c in zip(index, completions, strict=True)]
            if all(t is not None for t in texts):
                groups = []
                for start, end in runs:
                    p = prompts[start]
                    groups.append((p if isinstance(p, str) else _messages(p, f"prompt {index[start]}"), texts[start:end]))
                per_group = self.client.score_groups_many(groups, **options)
                return [r for g in per_group for r in g]
        samples = [_as_sample(p, c, i) for i, p, c in zip(index, prompts, completions, strict=True)]
        return self.client.score(samples, **options)

    @staticmethod
    def _log(
        results: Sequence[ScoreResult],
        log_metric: Callable[[str, float], None] | None,
        log_extra: Callable[[str, list], None] | None,
    ) -> None:
        stds = [r.std for r in results]
        epistemic = [r.epistemic for r in results]
        served = [e for e in epistemic if e is not None]
        if log_metric is not None:
            log_metric("rmserve/std", sum(stds) / len(stds))
            if served:
                log_metric("rmserve/epistemic", sum(served) / len(served))
            log_metric("rmserve/truncated_frac", sum(r.truncated for r in results) / len(results))
            flags = [r.ood for r in results if r.ood is not None]
            if flags:  # a model with OOD statistics: the share of completions it never saw the like of
                log_metric("rmserve/ood_frac", sum(flags) / len(flags))
        if log_extra is not None:
            log_extra("rmserve_std", stds)
            if served:
                log_extra("rmserve_epistemic", epistemic)
            if any(r.ood_score is not None for r in results):
                log_extra("rmserve_ood_score", [r.ood_score for r in results])


def as_trl_reward_func(
    client_or_address: RewardClient | str,
    *,
    field: Field = "reward",
    uncertainty_penalty: float | None = None,
    run_id: str | None = None,
    name: str | None = None,
    use_groups: bool = True,
    timeout: float | None = None,
    empty_reward: float | None = None,
    on_alarm: OnAlarm = "ignore",
    **client_kwargs: Any,
) -> RewardFunc:
    """A reward function for TRL's `GRPOTrainer(reward_funcs=[...])` backed by rmserve.

    `field` picks what the trainer optimises: the ensemble mean (`"reward"`),
    the uncertainty-penalised `"conservative"` (mean - lambda * var, lambda =
    `uncertainty_penalty` or the model's default) or the worst head (`"min"`).
    With `use_groups`, consecutive completions of the same prompt (GRPO's
    `num_generations`) are scored with ScoreGroups. `run_id` tags the scores for
    the server's run monitor (default: $RMSERVE_RUN_ID, else a random id);
    `client_kwargs` go to `RewardClient` when an address is given. Empty
    completions are scored like any other; set `empty_reward` to give them a
    fixed reward instead (they are then not sent).

    The server's run monitor watches the run (by `run_id`); its over-optimisation
    alarm is logged as `rmserve/alarm` and the uncertainty trend as
    `rmserve/std_trend`. `on_alarm="conservative"` (or `"min"`) switches the
    reward returned to that field once the alarm has fired, for the rest of the run.
    """
    return RewardFunc(
        client_or_address,
        field=field,
        uncertainty_penalty=uncertainty_penalty,
        run_id=run_id,
        name=name,
        use_groups=use_groups,
        timeout=timeout,
        empty_reward=empty_reward,
        on_alarm=on_alarm,
        **client_kwargs,
    )
