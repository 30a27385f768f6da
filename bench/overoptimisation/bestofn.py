"""Experiment 1: best-of-n against the proxy, scored by the gold.

Best-of-n is the optimiser with a known KL from the policy,
KL_bon(n) = log n − (n − 1)/n (Stiennon et al. 2020; Gao et al. 2022), so proxy and
gold rewards can be plotted against optimisation strength without training.
Each prompt has N policy samples; for m = 1, 2, 4, ..., N the pick is the best of
m of them by the objective. Averaging over `orderings` random orders of the N
samples (best of the first m of each) gives the same expectation as "the first m"
with far less noise than one order; at m = N every order picks the same sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from serving import ProxyScores

Objective = Callable[[ProxyScores], np.ndarray]


def objectives(uwo_lambdas: Sequence[float]) -> dict[str, Objective]:
    """mean: the ensemble mean; wco: the worst head (min over heads);
    uwo-λ: mean − λ·var over heads (Coste et al. 2023), one per λ."""
    out: dict[str, Objective] = {"mean": lambda s: s.mean, "wco": lambda s: s.min}
    for lam in uwo_lambdas:
        out[f"uwo-{lam:g}"] = lambda s, lam=lam: s.mean - lam * s.var
    return out


def kl_bon(n: int) -> float:
    return math.log(n) - (n - 1) / n


@dataclass
class BonPoint:
    objective: str
    n: int
    kl: float
    proxy: float          # proxy ensemble mean of the pick, averaged over prompts and orders
    gold: float           # gold reward of the pick
    gold_sem: float       # standard error over prompts
    std: float            # proxy ensemble std of the pick


def best_of_n(proxy: Sequence[ProxyScores], gold: Sequence[np.ndarray], ns: Sequence[int], uwo_lambdas: Sequence[float],
              orderings: int = 64, seed: int = 0) -> list[BonPoint]:
    """Curves for every objective; `proxy[i]`/`gold[i]` are prompt i's N samples."""
    rng = np.random.default_rng(seed)
    n_total = len(gold[0])
    orders = [np.stack([rng.permutation(n_total) for _ in range(orderings)]) for _ in gold]
    points = []
    for name, objective in objectives(uwo_lambdas).items():
        for n in ns:
            per_prompt = []  # (proxy, gold, std) of the pick, averaged over orders
            for s, g, order in zip(proxy, gold, orders, strict=True):
                obj = objective(s)
                first = order[:, :n]                                   # [orders, n] sample indices
                pick = first[np.arange(len(first)), np.argmax(obj[first], axis=1)]
                per_prompt.append((s.mean[pick].mean(), g[pick].mean(), s.std[pick].mean()))
            arr = np.array(per_prompt)
            points.append(BonPoint(name, n, kl_bon(n), float(arr[:, 0].mean()), float(arr[:, 1].mean()),
                                   float(arr[:, 1].std(ddof=1) / math.sqrt(len(arr))), float(arr[:, 2].mean())))
    return points


def summary(points: Sequence[BonPoint]) -> dict[str, dict[str, float]]:
    """Per objective: gold at n = 1, its peak (and at which n), and at the largest n
    as a share of the best gold any objective reached (the issue's 90%-of-peak target)."""
    best_gold = max(p.gold for p in points)
    out = {}
    for name in dict.fromkeys(p.objective for p in points):
        curve = [p for p in points if p.objective == name]
        peak = max(curve, key=lambda p: p.gold)
        last = curve[-1]
        base = curve[0].gold
        out[name] = {"gold_n1": base, "gold_peak": peak.gold, "peak_n": peak.n, "gold_last": last.gold,
                     "proxy_last": last.proxy, "last_n": last.n,
                     "last_share_of_own_peak_gain": (last.gold - base) / (peak.gold - base) if peak.gold > base else float("nan"),
                     "last_over_best_peak_gain": (last.gold - base) / (best_gold - base) if best_gold > base else float("nan")}
    return out
