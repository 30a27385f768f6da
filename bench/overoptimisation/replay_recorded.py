"""Replay a recorded over-optimisation experiment under other reward-rise gates, offline.

    .venv/bin/python bench/overoptimisation/replay_recorded.py \\
        bench/results/overoptimisation-2026-12-02.json --out bench/results/monitor-rise-gate-$(date +%F).md

The absolute gate (`min_reward_rise`, in the proxy's reward units) is compared with the
scale-free one (`min_rise_spread`: the rise over the baseline's within-step p90 - p10
range) on every recorded run, whole and as two halves of its prompts, with every other
setting at today's defaults. Each stream is replayed as recorded and with every reward and
std multiplied by 0.5 and by 2: a proxy with compressed or stretched rewards. std_ratio
and the concentration signals are ratios, so only the rise gate can move an alarm between
scales; a scale-free gate must not.

Printed per gate and scale: the alarm steps of the `mean` run's three streams, how many
healthy streams fire, and the smallest lead of an alarm over its run's gold peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from evolve import RunResult, StepRecord
from replay import alarm_step, gold_peak, streams

HACKED, HEALTHY = ("mean",), ("uwo-20", "wco", "gold", "policy")
GATES: list[tuple[str, dict[str, float]]] = [
    *((f"min_reward_rise {v}", {"min_reward_rise": v}) for v in (0.1, 0.2)),
    *((f"min_rise_spread {v}", {"min_reward_rise": 0.0, "min_rise_spread": v}) for v in (0.1, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)),
]
SCALES = (0.5, 1.0, 2.0)


def load(path: Path) -> tuple[list[RunResult], int, dict[str, Any]]:
    raw = json.loads(path.read_text())
    runs = [RunResult(r["run_id"], r["objective"], [StepRecord(**s) for s in r["steps"]], r["status"], r["seconds"],
                      r["examples"]) for r in raw["search"]]
    return runs, raw["args"]["search_prompts"], raw


def scaled(stream: list[tuple[int, np.ndarray, np.ndarray]], c: float) -> list[tuple[int, np.ndarray, np.ndarray]]:
    return [(step, c * r, c * s) for step, r, s in stream]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recorded", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs, prompts, raw = load(args.recorded)
    by_id = {r.run_id: r for r in runs}
    data = {rid: streams(by_id[rid], prompts) for rid in (*HACKED, *HEALTHY)}
    peaks = {rid: gold_peak([s.pop_gold for s in by_id[rid].steps]) for rid in data}
    lines = [f"# Run monitor: the reward-rise gate, absolute vs scale-free ({datetime.now(timezone.utc):%Y-%m-%d} UTC)", "",
             f"- recorded runs: {args.recorded} ({raw['command'] if isinstance(raw['command'], str) else ' '.join(raw['command'])})",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- gold peaks (step): {peaks}; every other setting at MonitorConfig's defaults", "",
             "| gate | reward scale | `mean` alarm: all / A / B | healthy streams firing (of 12) | smallest lead |",
             "| --- | ---: | --- | ---: | ---: |"]
    for name, params in GATES:
        for c in SCALES:
            alarms = {rid: {part: alarm_step(scaled(st, c), params) for part, st in parts.items()}
                      for rid, parts in data.items()}
            hacked = " / ".join(str(alarms["mean"][p]) for p in ("all", "A", "B"))
            false = [f"{rid}/{p}" for rid in HEALTHY for p, a in alarms[rid].items() if a is not None]
            leads = [peaks["mean"] - a for a in alarms["mean"].values() if a is not None]
            lines.append(f"| {name} | {c:g} | {hacked} | {len(false)}{' (' + ', '.join(false) + ')' if false else ''} | {min(leads) if leads else '—'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
