"""Plots and the markdown results file of the over-optimisation experiment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bestofn import BonPoint
from evolve import RunResult
from replay import gold_peak

COLOURS = {"mean": "tab:red", "uwo": "tab:blue", "wco": "tab:purple", "gold": "tab:green", "policy": "tab:gray"}


def colour(name: str) -> str:
    """uwo-0.5 and uwo-20 are shades of the uwo colour."""
    base = name.split("-")[0]
    if base == "uwo" and name != "uwo":
        return "tab:cyan" if float(name.split("-", 1)[1]) < 1 else "tab:blue"
    return COLOURS.get(base, "k")


def plot_bon(points: Sequence[BonPoint], path: Path, title: str) -> None:
    """Proxy (dashed) and gold (solid) reward of the best-of-n pick against KL_bon, per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(p.objective for p in points):
        c = [p for p in points if p.objective == name]
        kl = [p.kl for p in c]
        axes[0].plot(kl, [p.proxy for p in c], "--o", color=colour(name), label=f"{name}: proxy", ms=3)
        axes[0].plot(kl, [p.gold for p in c], "-o", color=colour(name), label=f"{name}: gold", ms=3)
        axes[1].errorbar(kl, [p.gold for p in c], yerr=[p.gold_sem for p in c], fmt="-o", color=colour(name),
                         label=name, ms=3, capsize=2)
    for ax in axes:
        ax.set_xlabel("KL_bon = log n − (n−1)/n  (nats)")
        ax.grid(alpha=0.3)
    top = axes[0].secondary_xaxis("top")
    ns = sorted({p.n for p in points})
    top.set_xticks([p.kl for p in points if p.objective == points[0].objective], [str(n) for n in ns])
    top.set_xlabel("n")
    axes[0].set_ylabel("reward of the pick (normalised)")
    axes[0].set_title("proxy (dashed) and gold (solid)")
    axes[1].set_ylabel("gold reward of the pick (± s.e. over prompts)")
    axes[1].set_title("gold only")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runs(runs: Sequence[RunResult], alarms: Mapping[str, Mapping[str, int | None]], path: Path,
              title: str) -> None:
    """Per run: proxy and gold mean of each step's scored samples, and the proxy std; the gold
    peak (smoothed) as a dot and the alarm steps as vertical lines (server: solid; the
    recommended settings' replay: dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(3.4 * len(runs), 6), sharex=True, squeeze=False)
    for j, run in enumerate(runs):
        steps = [s.step for s in run.steps]
        ax, ax2 = axes[0][j], axes[1][j]
        c = colour(run.run_id)
        ax.plot(steps, [s.proxy_mean for s in run.steps], ":", color=c, label="proxy, children (monitored)")
        ax.plot(steps, [s.pop_proxy for s in run.steps], "--", color=c, label="proxy, population")
        ax.plot(steps, [s.pop_gold for s in run.steps], "-", color="k", label="gold, population")
        peak = gold_peak([s.pop_gold for s in run.steps])
        ax.plot([steps[peak]], [run.steps[peak].pop_gold], "o", color="k", ms=6)
        ax2.plot(steps, [s.std_mean for s in run.steps], ":", color=c, label="children (monitored)")
        ax2.plot(steps, [s.pop_std for s in run.steps], "--", color=c, label="population")
        for label, style in (("server", "-"), ("recommended", ":")):
            a = alarms.get(label, {}).get(run.run_id)
            if a is not None:
                for axis in (ax, ax2):
                    axis.axvline(a, color="tab:orange", ls=style, lw=1.5)
        ax.set_title(f"run '{run.run_id}'", fontsize=10)
        ax.grid(alpha=0.3)
        ax2.grid(alpha=0.3)
        ax2.set_xlabel("step")
        if j == 0:
            ax.set_ylabel("mean reward")
            ax2.set_ylabel("mean proxy ensemble std")
            ax.legend(fontsize=7)
            ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float | None, fmt: str = "+.3f") -> str:
    return "—" if x is None else format(x, fmt)


def bon_table(points: Sequence[BonPoint]) -> str:
    names = list(dict.fromkeys(p.objective for p in points))
    ns = sorted({p.n for p in points})
    head = "| n | KL_bon | " + " | ".join(f"{o} proxy | {o} gold | {o} std" for o in names) + " |"
    lines = [head, "| " + " | ".join(["---"] * (2 + 3 * len(names))) + " |"]
    for n in ns:
        row = [str(n), f"{next(p.kl for p in points if p.n == n):.2f}"]
        for o in names:
            p = next(p for p in points if p.n == n and p.objective == o)
            row += [f"{p.proxy:+.3f}", f"{p.gold:+.3f} ± {p.gold_sem:.3f}", f"{p.std:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(runs: Sequence[RunResult], replayed: Mapping[str, Mapping[str, int | None]]) -> str:
    lines = ["| run | children proxy, step 0 → last | children std, step 0 → last | population proxy, step 0 → last | "
             "population gold: step 0 → peak (step) → last | server alarm step | alarm, recommended settings | "
             "gold peak − server alarm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        s0, sl = r.steps[0], r.steps[-1]
        peak = gold_peak([s.pop_gold for s in r.steps])
        a = r.status.get("alarm_step") if r.status.get("alarm") else None
        rec = replayed.get("recommended", {}).get(r.run_id)
        lines.append(
            f"| {r.run_id} | {s0.proxy_mean:+.3f} → {sl.proxy_mean:+.3f} | {s0.std_mean:.3f} → {sl.std_mean:.3f} "
            f"({sl.std_mean / s0.std_mean:.2f}x) | {s0.pop_proxy:+.3f} → {sl.pop_proxy:+.3f} | {s0.pop_gold:+.3f} → "
            f"{r.steps[peak].pop_gold:+.3f} ({r.steps[peak].step}) → {sl.pop_gold:+.3f} | {_f(a, 'd')} | "
            f"{_f(rec, 'd')} | {_f(None if a is None else r.steps[peak].step - a, '+d')} |")
    return "\n".join(lines)


def steps_table(run: RunResult, every: int) -> str:
    lines = ["| step | children proxy | children std | children gold | population proxy | population std | "
             "population gold | corr(proxy, gold) in population | words |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in run.steps:
        if s.step % every == 0 or s.step == run.steps[-1].step:
            lines.append(f"| {s.step} | {s.proxy_mean:+.3f} | {s.std_mean:.3f} | {_f(s.gold_mean)} | "
                         f"{s.pop_proxy:+.3f} | {s.pop_std:.3f} | {s.pop_gold:+.3f} | {s.pop_corr_proxy_gold:+.2f} | "
                         f"{s.pop_words:.0f} |")
    return "\n".join(lines)


def sweep_table(rows: Sequence[Mapping[str, Any]], run_ids: Sequence[str]) -> str:
    lines = ["| setting | " + " | ".join(f"{r} (all / A / B)" for r in run_ids) + " | separates | worst lead |",
             "| --- | " + " | ".join("---" for _ in run_ids) + " | --- | --- |"]
    for row in rows:
        label = row.get("label") or ", ".join(f"{k}={v}" for k, v in row["params"].items())
        cells = []
        for rid in run_ids:
            a = row["alarms"].get(rid, {})
            cells.append(" / ".join(_f(a.get(p), "d") for p in ("all", "A", "B")))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'yes' if row['separates'] else 'no'} | "
                     f"{_f(row['min_lead'], '+d')} |")
    return "\n".join(lines)
