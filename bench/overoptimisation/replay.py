"""Replaying the recorded runs through the run monitor under other settings.

The live runs are judged once, by the server, under the settings it was started
with. To choose settings we replay every run's per-step samples (the proxy
reward and std of exactly what the server was sent) into a fresh
`RunMonitor(MonitorConfig(...))` per setting: the same code the server runs, and
with fewer samples per step than `reservoir`, the same statistics. A replay with
the server's settings must reproduce the server's alarm (checked in run.py).

Each run is also replayed as two halves (the first and second half of its
prompts), so a setting is only credited when it holds on independent prompt
sets, not on one lucky stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from evolve import RunResult

from rmserve.service.server.monitor import MonitorConfig, RunMonitor

DEFAULTS = asdict(MonitorConfig())
GRID: dict[str, Sequence[Any]] = {
    "baseline_steps": (3, 5),
    "window": (3,),
    "patience": (2, 3),
    "std_ratio": (1.1, 1.15, 1.2, 1.3, 1.5, 1.7),
    "min_reward_rise": (0.05, 0.1, 0.2),
    "top_std_ratio": (1.5, math.inf),
    "min_corr": (0.3,),
}


def alarm_step(steps: Sequence[tuple[int, np.ndarray, np.ndarray]], params: Mapping[str, Any]) -> int | None:
    """The step a monitor with `params` fires at on this stream of (step, rewards, stds), or None."""
    mon = RunMonitor(MonitorConfig(**{**DEFAULTS, **params}))
    for step, r, s in steps:
        mon.observe("r", step, r.tolist(), s.tolist())
    status = mon.status("r")
    assert status is not None
    return status[0].alarm_step if status[0].alarm else None


def streams(run: RunResult, prompts: int) -> dict[str, list[tuple[int, np.ndarray, np.ndarray]]]:
    """The run's whole stream, and its first/second half of prompts (samples are prompt-major)."""
    whole, a, b = [], [], []
    for rec in run.steps:
        r = np.asarray(rec.samples["reward"])
        s = np.asarray(rec.samples["std"])
        cut = len(r) // prompts * (prompts // 2)
        whole.append((rec.step, r, s))
        a.append((rec.step, r[:cut], s[:cut]))
        b.append((rec.step, r[cut:], s[cut:]))
    return {"all": whole, "A": a, "B": b}


def gold_peak(values: Sequence[float], smooth: int = 5) -> int:
    """Index of the peak of the centred moving average of width `smooth` (edges use what exists):
    one noisy step must not count as the peak."""
    v = np.asarray(values, dtype=np.float64)
    h = smooth // 2
    avg = np.array([v[max(0, i - h) : i + h + 1].mean() for i in range(len(v))])
    return int(np.argmax(avg))


def sweep(runs: Sequence[RunResult], prompts: int, hacked: Sequence[str], healthy: Sequence[str]) -> dict[str, Any]:
    """Every grid setting on every run and half; which settings fire on all `hacked` streams
    (at or before their gold peak) and on none of the `healthy` ones."""
    by_id = {r.run_id: r for r in runs}
    data = {rid: streams(by_id[rid], prompts) for rid in [*hacked, *healthy] if rid in by_id}
    peaks = {rid: gold_peak([s.pop_gold for s in by_id[rid].steps]) for rid in data}
    keys = list(GRID)
    rows = []
    for values in itertools.product(*(GRID[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        alarms = {rid: {part: alarm_step(st, params) for part, st in parts.items()} for rid, parts in data.items()}
        fires_hacked = all(a is not None for rid in hacked if rid in alarms for a in alarms[rid].values())
        quiet_healthy = all(a is None for rid in healthy if rid in alarms for a in alarms[rid].values())
        lead = min((peaks[rid] - a for rid in hacked if rid in alarms for a in alarms[rid].values()
                    if a is not None), default=None)
        rows.append({"params": params, "alarms": alarms, "separates": fires_hacked and quiet_healthy,
                     "min_lead": lead})
    return {"grid": {k: list(v) for k, v in GRID.items()}, "gold_peaks": peaks, "rows": rows}


def distance_from_defaults(params: Mapping[str, Any]) -> float:
    """How far a setting moves from today's defaults (relative change, summed): ties between
    separating settings go to the smallest change."""
    d = 0.0
    for k, v in params.items():
        base = DEFAULTS[k]
        d += 1.0 if math.isinf(v) else abs(v - base) / abs(base)
    return d


def recommend(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The separating setting, alarming at or before every gold peak, that changes the defaults
    least (one experiment should move them as little as it can), then the earliest alarm."""
    ok = [r for r in result["rows"] if r["separates"] and r["min_lead"] is not None and r["min_lead"] >= 0]
    if not ok:
        return None
    return min(ok, key=lambda r: (distance_from_defaults(r["params"]), -r["min_lead"]))
