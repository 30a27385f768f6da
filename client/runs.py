"""Run-monitor results shared by both clients: GetRunStatus and ListRuns as typed values."""

from __future__ import annotations

from dataclasses import dataclass

from rmserve.v1 import reward_pb2 as pb

__all__ = ["RunStatus", "RunStep", "parse_run_status"]


@dataclass(frozen=True)
class RunStep:
    """One step of a run (or, for old steps of a long run, a window first_step..last_step)."""

    first_step: int
    last_step: int
    count: int
    reward_mean: float
    reward_p10: float
    reward_p50: float
    reward_p90: float
    std_mean: float
    reward_std_corr: float
    top_decile_reward: float
    top_decile_std: float
    epistemic_mean: float | None
    ood_score_mean: float | None
    ood_fraction: float | None
    top_decile_ood_fraction: float | None


@dataclass(frozen=True)
class RunStatus:
    """What the server's run monitor knows of one run (docs/monitoring/run-monitor.md)."""

    run_id: str
    steps: int                       # steps seen
    alarm: bool                      # the over-optimisation alarm has fired
    alarm_step: int | None           # the step at which it fired
    reason: str                      # why, in words ("" without an alarm)
    series: tuple[RunStep, ...]      # per step, in order (empty from list_runs)
    last_seen_unix: float

    @property
    def reward_mean(self) -> list[float]:
        """Mean reward per step, one value per entry of `series`."""
        return [s.reward_mean for s in self.series]

    @property
    def std_mean(self) -> list[float]:
        """Mean ensemble std per step, one value per entry of `series`."""
        return [s.std_mean for s in self.series]


_OPTIONAL = ("epistemic_mean", "ood_score_mean", "ood_fraction", "top_decile_ood_fraction")


def _step(s: pb.RunStep) -> RunStep:
    plain = {f: getattr(s, f) for f in RunStep.__dataclass_fields__ if f not in _OPTIONAL}
    optional = {f: (getattr(s, f) if s.HasField(f) else None) for f in _OPTIONAL}
    return RunStep(**plain, **optional)


def parse_run_status(m: pb.RunStatus) -> RunStatus:
    return RunStatus(
        run_id=m.run_id, steps=m.steps, alarm=m.alarm, alarm_step=m.alarm_step if m.HasField("alarm_step") else None,
        reason=m.reason, series=tuple(_step(s) for s in m.series), last_seen_unix=m.last_seen_unix,
    )
