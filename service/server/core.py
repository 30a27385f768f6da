"""The scoring core: the one serving path behind every door.

gRPC (reward.py), the HTTP front door (http.py) and LabelService (labels.py)
convert their requests to the plain forms of encoding.py, call this core, and
convert the plain results below back to their wire format. The core encodes on
the tokenizer threads, queues on the shared scheduler (which batches across
callers and doors), turns the engine's rows into `ScoreResult`s and feeds the
metrics and the run monitor from those same objects. Nothing here knows
protobuf or JSON.

    core = ScoringCore(state)
    scored = await core.score([Sample(Text(prompt, response), id="a")], ScoreOptions(run_id="ppo", step=3),
                              deadline=time.monotonic() + 5, caller="key:…")
    scored.results[0].reward, scored.model_version

A new result field: add it to `ScoreResult`, fill it in `_result` (from the
engine's row), then one line in each door's converter (wire.py, http.py) and
in the SDK's types (docs/architecture.md, "Where a new field goes").
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from rmserve.service.engine.model import RewardModel
from rmserve.service.engine.tokenization import Encoded
from rmserve.service.server.encoding import (
    Group,
    Prompt,
    Sample,
    completion_name,
    encode_groups,
    encode_samples,
    sample_name,
)
from rmserve.service.server.errors import InvalidInput, SampleFailed
from rmserve.service.server.state import ModelSlot, Row, ServingState

log = logging.getLogger("rmserve.server")


@dataclass(frozen=True, slots=True)
class ScoreOptions:
    """What a caller may choose per call."""

    run_id: str = ""                          # tags the call for the run monitor ("" : not monitored)
    step: int | None = None                   # the trainer's step, for the run monitor
    return_members: bool = False              # fill ScoreResult.members
    uncertainty_penalty: float | None = None  # lambda of `conservative`; None: the model's default


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Everything a caller can get for one sample. Numbers are float32 values (the engine's
    precision and the wire's), so every door answers the same bits."""

    reward: float                  # mean over heads, after normalisation
    std: float                     # population std over heads
    min: float                     # min over heads
    conservative: float            # reward - lambda * std^2
    num_tokens: int                # tokens actually scored
    truncated: bool                # the prompt was cut from the left to fit
    id: str = ""                   # the sample's id, as sent
    epistemic: float | None = None  # None: the model has no statistics for it
    ood_score: float | None = None  # Mahalanobis distance per dimension; None: no OOD statistics
    ood: bool | None = None        # ood_score over the model's calibrated threshold; None: no threshold
    members: tuple[float, ...] | None = None  # per-head rewards, when asked (return_members)


@dataclass(frozen=True, slots=True)
class Scored:
    results: list[ScoreResult]
    model_version: str


@dataclass(frozen=True, slots=True)
class GroupResult:
    id: str
    results: list[ScoreResult]


@dataclass(frozen=True, slots=True)
class ScoredGroups:
    groups: list[GroupResult]
    model_version: str


@dataclass(frozen=True, slots=True)
class Comparison:
    """P(a preferred over b) under Bradley–Terry, from the ensemble mean and per head."""

    prob: float
    member_probs: tuple[float, ...]
    a: ScoreResult
    b: ScoreResult
    model_version: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a caller may know of the live model and the server's limits."""

    name: str
    version: str
    kind: str
    num_members: int
    num_heads: int
    backbone: str
    backbone_layers: int
    max_tokens: int
    dtype: str
    shift: float                      # normalisation: reward = (raw - shift) / scale
    scale: float
    default_uncertainty_penalty: float
    has_epistemic: bool
    max_samples_per_request: int
    ood_threshold: float | None       # None: the model flags nothing OOD
    ood_quantile: float | None
    ood_calibrated_on: str | None

    @classmethod
    def of(cls, m: RewardModel, max_samples_per_request: int) -> ModelInfo:
        return cls(
            name=m.name, version=m.version, kind=m.kind, num_members=len(m.members), num_heads=m.num_heads,
            backbone=m.backbone_name, backbone_layers=m.backbone_layers, max_tokens=m.max_tokens,
            dtype=m.dtype_name, shift=m.shift, scale=m.scale, default_uncertainty_penalty=m.uncertainty_penalty,
            has_epistemic=m.has_epistemic, max_samples_per_request=max_samples_per_request,
            ood_threshold=m.ood.threshold if m.ood else None, ood_quantile=m.ood.quantile if m.ood else None,
            ood_calibrated_on=m.ood.calibrated_on if m.ood else None,
        )


_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """`x` rounded to float32, as the wire carries it (struct: a fraction of numpy's scalar cost)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # beyond float32's range: infinite, as a float32 cast gives
        return math.copysign(math.inf, x)


def _result(row: Row, enc: Encoded, *, lam: float, members: bool, sample_id: str = "",
            ood_threshold: float | None = None) -> ScoreResult:
    """One sample's result from its row of the engine's output and its encoding."""
    out, i = row.out, row.i
    mean, var = float(out.mean[i]), float(out.var[i])
    ood_score = None if out.ood_score is None else float(out.ood_score[i])
    return ScoreResult(
        id=sample_id,
        reward=_f32(mean),
        std=_f32(math.sqrt(max(var, 0.0))),
        min=_f32(out.min[i]),
        conservative=_f32(mean - lam * var),
        num_tokens=len(enc.ids),
        truncated=enc.truncated,
        epistemic=None if out.epistemic is None else _f32(out.epistemic[i]),
        ood_score=None if ood_score is None else _f32(ood_score),
        ood=None if ood_score is None or ood_threshold is None else ood_score > ood_threshold,
        members=tuple(out.rewards[i].astype(np.float32).tolist()) if members else None,
    )


def _penalty(options: ScoreOptions, model: RewardModel) -> float:
    lam = options.uncertainty_penalty
    if lam is None:
        return model.uncertainty_penalty
    if not math.isfinite(lam) or lam < 0:
        raise InvalidInput(f"uncertainty_penalty must be a finite number >= 0, got {lam}")
    return lam


def _ood_threshold(model: RewardModel) -> float | None:
    """The flag's threshold, or None: then results carry ood_score (if any) but no ood."""
    return model.ood.threshold if model.ood is not None else None


_DEFAULT = ScoreOptions()


class ScoringCore:
    """Score samples, groups and pairs on the live model; every door's one way in."""

    def __init__(self, state: ServingState):
        self.state = state

    def model_info(self) -> ModelInfo:
        return ModelInfo.of(self.state.live_slot().model, self.state.config.max_samples_per_request)

    async def score(self, samples: Sequence[Sample], options: ScoreOptions = _DEFAULT, *,
                    deadline: float | None = None, caller: Hashable | None = None,
                    name: Callable[[int], str] | None = None, max_samples: int | None = None) -> Scored:
        """Each sample's result, in order. `deadline`: on the time.monotonic clock; `caller`:
        who the samples count against (--max-queue-per-client; None: no cap); `name(i)`: how
        errors name sample i (default "sample i (id …)"); `max_samples`: the most samples one
        call may hold (default --max-samples-per-request, which the SDK splits for)."""
        slot = self.state.live_slot()
        lam = _penalty(options, slot.model)
        cap = self.state.config.max_samples_per_request if max_samples is None else max_samples
        name = name or (lambda i: sample_name(i, samples[i].id))
        encoded = await self._off_loop(encode_samples, slot.model.encoder, samples, cap, name)
        rows = await self._submit(slot, encoded, deadline, caller, name)
        threshold = _ood_threshold(slot.model)
        results = [_result(r, e, lam=lam, members=options.return_members, sample_id=s.id, ood_threshold=threshold)
                   for r, e, s in zip(rows, encoded, samples, strict=True)]
        self._observe(results, options)
        return Scored(results, slot.version)

    async def score_groups(self, groups: Sequence[Group], options: ScoreOptions = _DEFAULT, *,
                           deadline: float | None = None, caller: Hashable | None = None) -> ScoredGroups:
        """Each group's results (GRPO: a group's completions share one batch and one prompt encoding)."""
        slot = self.state.live_slot()
        lam = _penalty(options, slot.model)
        per_group = await self._groups(slot, groups, self.state.config.max_samples_per_request, deadline, caller,
                                       lam=lam, members=options.return_members)
        out = [GroupResult(g.id, res or []) for g, res in zip(groups, per_group, strict=True)]  # none is None
        self._observe([r for g in out for r in g.results], options)
        return ScoredGroups(out, slot.version)

    async def compare(self, prompt: Prompt, response_a: str, response_b: str, *,
                      deadline: float | None = None, caller: Hashable | None = None) -> Comparison:
        """Two responses to one prompt, with members; counted in the metrics, not the run monitor."""
        slot = self.state.live_slot()
        encoded = (await self._off_loop(encode_groups, slot.model.encoder, [Group(prompt, [response_a, response_b])],
                                        self.state.config.max_samples_per_request))[0]
        assert encoded is not None
        a, b = await self._submit(slot, encoded, deadline, caller, ("response_a", "response_b").__getitem__)
        threshold = _ood_threshold(slot.model)
        res_a, res_b = (_result(r, e, lam=slot.model.uncertainty_penalty, members=True, ood_threshold=threshold)
                        for r, e in zip((a, b), encoded, strict=True))
        self._observe([res_a, res_b], None)
        member_probs = 1.0 / (1.0 + np.exp(-(a.rewards.astype(np.float64) - b.rewards)))
        return Comparison(prob=float(1.0 / (1.0 + math.exp(-(a.mean - b.mean)))),
                          member_probs=tuple(member_probs.tolist()), a=res_a, b=res_b, model_version=slot.version)

    async def judge(self, groups: Sequence[Group], *, deadline: float | None = None,
                    skip_unreadable: bool = False) -> tuple[list[list[ScoreResult] | None], str]:
        """The server's own look at stored or suggested texts (LabelService): every group's
        results with members, at any count, not counted against a caller nor fed to the metrics
        or the run monitor. With `skip_unreadable`, a group the model cannot encode is None."""
        slot = self.state.live_slot()
        limit = max(self.state.config.max_samples_per_request, sum(len(g.completions) for g in groups))
        per_group = await self._groups(slot, groups, limit, deadline, None, lam=slot.model.uncertainty_penalty,
                                       members=True, skip_unreadable=skip_unreadable)
        return per_group, slot.version

    # -- the path ----------------------------------------------------------------------

    async def _off_loop(self, fn, *args):
        """Validation and tokenisation on the tokenizer threads: the event loop only moves messages."""
        return await asyncio.get_running_loop().run_in_executor(self.state.tokenizer_pool, fn, *args)

    async def _groups(self, slot: ModelSlot, groups: Sequence[Group], limit: int, deadline: float | None,
                      caller: Hashable | None, *, lam: float, members: bool,
                      skip_unreadable: bool = False) -> list[list[ScoreResult] | None]:
        encoded = await self._off_loop(
            lambda: encode_groups(slot.model.encoder, groups, limit, skip_unreadable=skip_unreadable))
        flat = [e for g in encoded if g is not None for e in g]
        names = [completion_name(gi, ci) for gi, g in enumerate(encoded) if g is not None for ci in range(len(g))]
        labels = [gi for gi, g in enumerate(encoded) if g is not None for _ in g]  # a group is scored in one batch
        rows = await self._submit(slot, flat, deadline, caller, names.__getitem__, labels) if flat else []
        threshold = _ood_threshold(slot.model)
        out: list[list[ScoreResult] | None] = []
        i = 0
        for g in encoded:
            if g is None:
                out.append(None)
                continue
            out.append([_result(rows[i + j], e, lam=lam, members=members, ood_threshold=threshold)
                        for j, e in enumerate(g)])
            i += len(g)
        return out

    async def _submit(self, slot: ModelSlot, encoded: Sequence[Encoded], deadline: float | None,
                      caller: Hashable | None, name: Callable[[int], str],
                      groups: list[int] | None = None) -> list[Row]:
        """The scheduler's rows for `encoded`; a sample that failed alone is named by `name(index)`.
        `groups`: a label per sample; a group's samples are scored in one batch (one prompt encoding)."""
        try:
            return await self.state.scheduler.submit(
                slot, [e.ids for e in encoded], [len(e.ids) for e in encoded], deadline, caller, groups
            )
        except SampleFailed as e:
            e.where = name(e.index)
            raise

    def _observe(self, results: Sequence[ScoreResult], options: ScoreOptions | None) -> None:
        """Metrics for every result; the run monitor for calls tagged with a run id."""
        metrics = self.state.metrics
        rewards, stds = [r.reward for r in results], [r.std for r in results]
        metrics.scored(rewards, stds, sum(r.truncated for r in results))
        if options is None or not options.run_id:
            return
        monitor = self.state.monitor
        raised = monitor.observe(
            options.run_id, options.step, rewards, stds,
            epistemic=[r.epistemic for r in results], ood_score=[r.ood_score for r in results],
            ood=[r.ood for r in results],
        )
        tracked, alarming = monitor.counts()
        metrics.runs(tracked, alarming, new_alarm=options.run_id if raised else None)
        if raised:
            run, _ = monitor.status(options.run_id)
            log.warning("run %s: over-optimisation alarm at step %s: %s", run.run_id, run.alarm_step, run.reason)
