"""The run monitor: per-run, per-step statistics of what a trainer is being scored on,
and an over-optimisation alarm (docs/monitoring/run-monitor.md).

Score, ScoreGroups and ScoreStream calls tagged with a `run_id` (and a `step`)
feed it. For every step it keeps the count, the reward's mean and quantiles,
the mean ensemble std, epistemic and OOD terms when the model serves them, the
correlation across samples between reward and std, and the top decile's mean
reward and std. A step closes when a later step of the same run arrives; the
detector then looks at the closed steps.

Why these signals: under plain mean optimisation the ensemble's variance grows
about 3x while the proxy reward climbs, and stays within ~20% under an
uncertainty-penalised objective (Coste et al. 2023, "Reward model ensembles
help mitigate overoptimization"); and a policy that games the reward reaches
its highest rewards where the members disagree or the input is out of the
training distribution. So the alarm fires when, for `patience` closed steps in
a row, either
  (growth)        the recent mean std is >= `std_ratio` x the run's own early
                  baseline while the recent reward mean is >= `min_reward_rise`
                  above the baseline's (normalised rewards: train std 1), or
  (concentration) the reward keeps rising and the top decile's mean std is
                  >= `top_std_ratio` x the step's mean std with a reward-std
                  correlation >= `min_corr`, or >= `top_ood_fraction` of the top
                  decile is flagged out of distribution.
Both need the reward to have risen; with `min_rise_spread` set, the rise must also be
that many times the baseline's within-step p90 - p10 range (a gate in the run's own
units, scale-free; a baseline without spread, such as one sample a step, then never
alarms). A healthy run whose reward rises with flat uncertainty meets neither. The alarm
latches (the step and reason are kept) until the run is forgotten.

Bounded state: at most `max_runs` runs (least recently seen evicted), at most
`max_steps` summaries per run (the two oldest adjacent ones are merged into a
window when a run exceeds it), at most `reservoir` samples held for an open
step (a uniform sample, for quantiles and correlation; counts and means stay
exact). Summaries persist to a JSON file (atomic replace), so a restart keeps
every closed step, the baselines and the alarms; an open step is kept as its
summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
log = logging.getLogger("rmserve.monitor")


@dataclass(frozen=True)
class MonitorConfig:
    max_runs: int = 256              # tracked runs; the least recently seen is evicted beyond this
    max_steps: int = 512             # step summaries per run; older ones merge into windows beyond this
    reservoir: int = 4096            # samples held per open step for quantiles / correlation
    baseline_steps: int = 5          # closed steps that form a run's baseline
    window: int = 3                  # recent closed steps compared with the baseline
    patience: int = 2                # consecutive alarming steps before the alarm fires
    std_ratio: float = 1.2           # growth: recent std / baseline std (docs/overoptimisation.md)
    min_reward_rise: float = 0.2     # growth and concentration: recent reward - baseline reward
    min_rise_spread: float = 0.0     # and that rise >= this x the baseline's within-step p90 - p10 (0: off)
    top_std_ratio: float = 1.5       # concentration: top-decile std / step std
    min_corr: float = 0.3            # concentration: corr(reward, std) across the step's samples
    top_ood_fraction: float = 0.5    # concentration: share of the top decile flagged OOD

    def __post_init__(self) -> None:
        for f in ("max_runs", "max_steps", "reservoir", "baseline_steps", "window", "patience"):
            if getattr(self, f) < 1:
                raise ValueError(f"run monitor: {f} must be >= 1, got {getattr(self, f)}")
        if not self.min_rise_spread >= 0:
            raise ValueError(f"run monitor: min_rise_spread must be >= 0 (0 turns it off), got {self.min_rise_spread}")
        if self.max_steps < self.baseline_steps + self.window:
            raise ValueError("run monitor: max_steps must hold at least baseline_steps + window steps")


@dataclass
class StepSummary:
    """One step (first_step == last_step) or a window of merged older steps."""

    first_step: int
    last_step: int
    count: int
    reward_mean: float
    reward_p10: float
    reward_p50: float
    reward_p90: float
    std_mean: float
    reward_std_corr: float           # Pearson, across samples; 0 when undefined
    top_decile_reward: float         # mean reward of the top 10% by reward
    top_decile_std: float            # their mean std
    epistemic_mean: float | None = None
    ood_score_mean: float | None = None
    ood_fraction: float | None = None
    top_decile_ood_fraction: float | None = None

    def merged(self, other: StepSummary) -> StepSummary:
        """Count-weighted means; quantiles and correlation are count-weighted averages too
        (an approximation, only for windows of old steps)."""
        n = self.count + other.count
        a, b = self.count / n, other.count / n

        def mix(x: float | None, y: float | None) -> float | None:
            if x is None or y is None:
                return x if y is None else y
            return a * x + b * y

        values = {f.name: mix(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        values.update(first_step=min(self.first_step, other.first_step), last_step=max(self.last_step, other.last_step),
                      count=n)
        return StepSummary(**values)


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or float(x.std()) == 0.0 or float(y.std()) == 0.0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


class _OpenStep:
    """The step being fed: exact sums, and a uniform reservoir of samples."""

    def __init__(self, step: int, capacity: int, seed: int):
        self.step = step
        self.capacity = capacity
        self.rng = random.Random(seed)
        self.count = 0
        self.sums = {"reward": 0.0, "std": 0.0, "epistemic": 0.0, "ood_score": 0.0, "ood": 0.0}
        self.counts = {"epistemic": 0, "ood_score": 0, "ood": 0}
        self.samples: list[tuple[float, float, float | None]] = []  # (reward, std, ood)

    def add(self, reward: float, std: float, epistemic: float | None, ood_score: float | None, ood: bool | None) -> None:
        if not (math.isfinite(reward) and math.isfinite(std)):
            return  # a NaN from a broken model must not poison the run's statistics
        self.count += 1
        self.sums["reward"] += reward
        self.sums["std"] += std
        for name, v in (("epistemic", epistemic), ("ood_score", ood_score), ("ood", ood)):
            if v is not None and math.isfinite(float(v)):
                self.sums[name] += float(v)
                self.counts[name] += 1
        sample = (reward, std, None if ood is None else float(ood))
        if len(self.samples) < self.capacity:
            self.samples.append(sample)
        else:  # reservoir sampling (Vitter's R): every sample kept with equal probability
            j = self.rng.randrange(self.count)
            if j < self.capacity:
                self.samples[j] = sample

    def summary(self) -> StepSummary:
        r = np.array([s[0] for s in self.samples], dtype=np.float64)
        s = np.array([s[1] for s in self.samples], dtype=np.float64)
        top = np.argsort(-r, kind="stable")[: max(1, len(r) // 10)]
        oods = [self.samples[i][2] for i in top if self.samples[i][2] is not None]

        def mean(name: str) -> float | None:
            return self.sums[name] / self.counts[name] if self.counts[name] else None

        p10, p50, p90 = np.quantile(r, [0.1, 0.5, 0.9])
        return StepSummary(
            first_step=self.step, last_step=self.step, count=self.count,
            reward_mean=self.sums["reward"] / self.count, reward_p10=float(p10), reward_p50=float(p50),
            reward_p90=float(p90), std_mean=self.sums["std"] / self.count, reward_std_corr=_corr(r, s),
            top_decile_reward=float(r[top].mean()), top_decile_std=float(s[top].mean()),
            epistemic_mean=mean("epistemic"), ood_score_mean=mean("ood_score"), ood_fraction=mean("ood"),
            top_decile_ood_fraction=(sum(oods) / len(oods)) if oods else None,
        )


@dataclass
class RunState:
    run_id: str
    steps: list[StepSummary] = field(default_factory=list)   # closed, in step order
    baseline: StepSummary | None = None                      # the first baseline_steps closed steps, merged
    alarm: bool = False
    alarm_step: int | None = None
    reason: str = ""
    streak: int = 0                                          # consecutive closed steps that looked alarming
    last_seen: float = 0.0
    open: _OpenStep | None = None

    def series(self) -> list[StepSummary]:
        """Closed steps, then the open one's summary so far."""
        return self.steps + ([self.open.summary()] if self.open is not None and self.open.count else [])


def _recent(steps: Sequence[StepSummary]) -> tuple[float, float]:
    n = sum(s.count for s in steps)
    return (sum(s.reward_mean * s.count for s in steps) / n, sum(s.std_mean * s.count for s in steps) / n)


def detect(run: RunState, cfg: MonitorConfig) -> str | None:
    """Why the latest closed step looks over-optimised, or None (see the module docstring)."""
    base = run.baseline
    if base is None:
        return None
    recent = [s for s in run.steps[-cfg.window:] if s.first_step > base.last_step]
    if not recent:
        return None
    reward, std = _recent(recent)
    rise = reward - base.reward_mean
    if rise < cfg.min_reward_rise:
        return None  # the reward is not climbing: whatever the uncertainty does, nothing is being gamed
    spread = base.reward_p90 - base.reward_p10
    if cfg.min_rise_spread > 0 and not (spread > 0 and rise >= cfg.min_rise_spread * spread):
        return None  # not climbing in the run's own units (a baseline without spread gives none: no alarm)
    if base.std_mean > 0 and std / base.std_mean >= cfg.std_ratio:
        return (f"ensemble std grew {std / base.std_mean:.2f}x over the run's baseline (threshold {cfg.std_ratio}) "
                f"while the reward rose {rise:+.3f}")
    last = run.steps[-1]
    if (last.std_mean > 0 and last.top_decile_std / last.std_mean >= cfg.top_std_ratio
            and last.reward_std_corr >= cfg.min_corr):
        return (f"the highest rewards sit where the members disagree: top-decile std "
                f"{last.top_decile_std / last.std_mean:.2f}x the step's mean, corr(reward, std) "
                f"{last.reward_std_corr:.2f}, while the reward rose {rise:+.3f}")
    if last.top_decile_ood_fraction is not None and last.top_decile_ood_fraction >= cfg.top_ood_fraction:
        return (f"{last.top_decile_ood_fraction:.0%} of the top-decile rewards are out of distribution, "
                f"while the reward rose {rise:+.3f}")
    return None


class RunMonitor:
    """Thread-safe: observed from the server's event loop, read by RPCs, saved from a thread."""

    def __init__(self, config: MonitorConfig | None = None, path: str | Path | None = None):
        self.config = config or MonitorConfig()
        self.path = Path(path) if path is not None else None
        self._runs: OrderedDict[str, RunState] = OrderedDict()
        self._lock = threading.Lock()
        self._dirty = False
        self.evicted = 0
        if self.path is not None and self.path.is_file():
            self._load()

    # -- feeding ------------------------------------------------------------------------

    def observe(
        self,
        run_id: str,
        step: int | None,
        rewards: Sequence[float],
        stds: Sequence[float],
        epistemic: Sequence[float | None] | None = None,
        ood_score: Sequence[float | None] | None = None,
        ood: Sequence[bool | None] | None = None,
    ) -> bool:
        """Add one call's samples to run `run_id` at `step` (None: the run's current step).
        True when this call raised the run's alarm (it closed the step that fired)."""
        n = len(rewards)
        with self._lock:
            run = self._touch(run_id)
            was_alarming = run.alarm
            current = run.open.step if run.open is not None else (run.steps[-1].last_step if run.steps else 0)
            step = current if step is None else int(step)
            if run.open is not None and step > run.open.step:
                self._close(run)
            target = self._target(run, step)
            for i in range(n):
                target.add(float(rewards[i]), float(stds[i]), None if epistemic is None else epistemic[i],
                           None if ood_score is None else ood_score[i], None if ood is None else ood[i])
            if target is not run.open:  # late samples of a closed step: fold them into its summary
                self._fold_late(run, target)
            self._dirty = True
            return run.alarm and not was_alarming

    def _touch(self, run_id: str) -> RunState:
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = RunState(run_id)
            while len(self._runs) > self.config.max_runs:
                self._runs.popitem(last=False)
                self.evicted += 1
        self._runs.move_to_end(run_id)
        run.last_seen = time.time()
        return run

    def _target(self, run: RunState, step: int) -> _OpenStep:
        if run.open is None and (not run.steps or step > run.steps[-1].last_step):
            run.open = _OpenStep(step, self.config.reservoir, seed=zlib.crc32(f"{run.run_id}/{step}".encode()))
        if run.open is not None and (step == run.open.step or not run.steps):
            return run.open  # (samples of an earlier step before any step closed join the open one)
        return _OpenStep(step, self.config.reservoir, seed=0)  # a late step: summarised and folded in

    @staticmethod
    def _fold_late(run: RunState, late: _OpenStep) -> None:
        """Into the summary (step or window) that covers the late step, or precedes it."""
        if not late.count:
            return
        i = max((i for i, s in enumerate(run.steps) if s.first_step <= late.step), default=0)
        run.steps[i] = run.steps[i].merged(late.summary())

    def _close(self, run: RunState) -> None:
        assert run.open is not None
        if run.open.count:
            run.steps.append(run.open.summary())
        run.open = None
        cfg = self.config
        if run.baseline is None and len(run.steps) >= cfg.baseline_steps:
            base = run.steps[0]
            for s in run.steps[1:cfg.baseline_steps]:
                base = base.merged(s)
            run.baseline = base
        while len(run.steps) > cfg.max_steps:  # merge the two oldest: recent steps stay exact
            run.steps[0:2] = [run.steps[0].merged(run.steps[1])]
        if run.alarm:
            return
        reason = detect(run, cfg)
        run.streak = run.streak + 1 if reason else 0
        if reason and run.streak >= cfg.patience:
            run.alarm, run.alarm_step, run.reason = True, run.steps[-1].last_step, reason

    # -- reading ------------------------------------------------------------------------

    def status(self, run_id: str) -> tuple[RunState, list[StepSummary]] | None:
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else (run, run.series())

    def runs(self) -> list[tuple[RunState, int]]:
        """(run, steps seen), most recently seen first."""
        with self._lock:
            return [(r, len(r.series())) for r in reversed(self._runs.values())]

    def counts(self) -> tuple[int, int]:
        """(tracked runs, runs in alarm)."""
        with self._lock:
            return len(self._runs), sum(r.alarm for r in self._runs.values())

    # -- persistence --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._dirty = False
            return {"format": FORMAT, "config": asdict(self.config), "runs": [
                {"run_id": r.run_id, "last_seen": r.last_seen, "alarm": r.alarm, "alarm_step": r.alarm_step,
                 "reason": r.reason, "streak": r.streak,
                 "baseline": None if r.baseline is None else asdict(r.baseline),
                 "steps": [asdict(s) for s in r.series()]}
                for r in self._runs.values()
            ]}

    def save(self, force: bool = False) -> bool:
        """Write the summaries atomically (temp file + fsync + rename); False when nothing changed."""
        if self.path is None or (not force and not self._dirty):
            return False
        data = json.dumps(self.snapshot(), allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".runs-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            runs = sorted(data["runs"], key=lambda r: r["last_seen"])[-self.config.max_runs:]
            for r in runs:
                state = RunState(
                    r["run_id"], steps=[StepSummary(**s) for s in r["steps"]][-self.config.max_steps:],
                    baseline=None if r["baseline"] is None else StepSummary(**r["baseline"]),
                    alarm=r["alarm"], alarm_step=r["alarm_step"], reason=r["reason"], streak=r["streak"],
                    last_seen=r["last_seen"],
                )
                self._runs[state.run_id] = state
        except (OSError, ValueError, KeyError, TypeError) as e:
            # a damaged file must not keep the server from starting: keep it aside, start empty
            aside = self.path.with_suffix(f".unreadable-{int(time.time())}.json")
            os.replace(self.path, aside)
            self._runs.clear()
            log.warning("run monitor: %s is unreadable (%s); moved to %s", self.path, e, aside)

