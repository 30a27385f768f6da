"""Pairwise evaluation metrics, in float64 numpy, with optional per-pair weights.

Definitions (d = r_chosen - r_rejected of the ensemble mean reward, p = σ(d),
the model's probability that the chosen response is preferred):

- accuracy: weighted fraction of pairs with d > 0 (strict: a tie is a miss).
- ECE: the predicted winner's confidence c = max(p, 1 - p) against whether it
  is the chosen one (d > 0), in the 20 equal-width bins of [0, 1] (so bins
  10..19 are used: c >= 0.5); ECE = Σ_b (W_b / W) |acc_b - mean c_b|. This equals
  binning p itself in 20 bins with every pair counted in both orientations
  ((p, 1) and (1 - p, 0)), except for exact ties d = 0.
- Brier: mean (1 - p)²: the squared error of p against the observed outcome.
- NLL: mean -log p, the Bradley-Terry loss without margin.
- AUROC(score, misranked): probability that a misranked pair (d <= 0) scores
  higher than a correct one, ties counting one half (Mann-Whitney); None when
  one class is empty.
- length split: the pairs whose chosen response is shorter than the rejected one
  (in response tokens, prompt excluded), longer, or equal, each with its count n
  and weighted accuracy (None when empty); `length_balanced_accuracy` is the mean
  of the shorter and longer accuracies (None if either is empty), so that a model
  that learnt "longer wins" scores 0.5 on it however the data's lengths lean.
- near ties: pairs with |d| below the serving dtype's rounding noise. Their
  side can change with the CPU's or GPU's kernels, so accuracy is only
  reproducible to within `accuracy_range` (every near tie counted wrong, then right).

Every metric takes `weights` (ranked lists weigh their pairs; None = 1 each).
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 20


def _w(x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(x),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per pair, with a positive sum")
    return w


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def accuracy(d: np.ndarray, weights: np.ndarray | None = None) -> float:
    d = np.asarray(d, dtype=np.float64)
    w = _w(d, weights)
    return float(w @ (d > 0) / w.sum())


def ece(d: np.ndarray, weights: np.ndarray | None = None, bins: int = ECE_BINS) -> float:
    d = np.asarray(d, dtype=np.float64)
    w = _w(d, weights)
    p = sigmoid(d)
    conf = np.maximum(p, 1.0 - p)
    correct = (d > 0).astype(np.float64)
    b = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for k in np.unique(b):
        m = b == k
        wk = w[m].sum()
        if wk > 0:
            total += abs(w[m] @ correct[m] - w[m] @ conf[m])  # = W_b |acc_b - conf_b|
    return float(total / w.sum())


def brier(d: np.ndarray, weights: np.ndarray | None = None) -> float:
    d = np.asarray(d, dtype=np.float64)
    w = _w(d, weights)
    return float(w @ (1.0 - sigmoid(d)) ** 2 / w.sum())


def nll(d: np.ndarray, weights: np.ndarray | None = None) -> float:
    d = np.asarray(d, dtype=np.float64)
    w = _w(d, weights)
    return float(w @ np.logaddexp(0.0, -d) / w.sum())


def near_ties(d: np.ndarray, weights: np.ndarray | None, tolerance: float) -> dict[str, Any]:
    """The pairs whose side is within rounding noise, and the accuracy band they span."""
    d = np.asarray(d, dtype=np.float64)
    w = _w(d, weights)
    near = np.abs(d) < tolerance
    sure = w @ ((d > 0) & ~near) / w.sum()
    return {"margin_below": tolerance, "pairs": int(near.sum()),
            "accuracy_range": [float(sure), float(sure + w @ near / w.sum())]}


def auroc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """P(score of a positive > score of a negative) + ½ P(equal), weighted; O(n log n)."""
    s = np.asarray(score, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    w = _w(s, weights)
    wp, wn = w[pos].sum(), w[~pos].sum()
    if wp == 0 or wn == 0:
        return None
    order = np.argsort(s, kind="stable")
    s, pos, w = s[order], pos[order], w[order]
    # group equal scores; for each group: positives x (negatives strictly below + ½ negatives in group)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos_w = np.add.reduceat(w * pos, starts)
    neg_w = np.add.reduceat(w * ~pos, starts)
    neg_below = np.cumsum(neg_w) - neg_w
    return float((pos_w * (neg_below + 0.5 * neg_w)).sum() / (wp * wn))


LENGTH_GROUPS = ("chosen_shorter", "chosen_longer", "equal_length")


def length_split(
    d: np.ndarray, chosen_tokens: np.ndarray, rejected_tokens: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy where the chosen response is the shorter, the longer, of equal length; their balance."""
    d = np.asarray(d, dtype=np.float64)
    w = _w(d, weights)
    lc, lr = np.asarray(chosen_tokens), np.asarray(rejected_tokens)
    if lc.shape != d.shape or lr.shape != d.shape:
        raise ValueError("one chosen and one rejected length per pair")
    split: dict[str, dict[str, Any]] = {}
    for name, m in zip(LENGTH_GROUPS, (lc < lr, lc > lr, lc == lr), strict=True):
        wm = w[m].sum()
        split[name] = {"n": int(m.sum()), "accuracy": float(w[m] @ (d[m] > 0) / wm) if wm > 0 else None}
    short, long = split["chosen_shorter"]["accuracy"], split["chosen_longer"]["accuracy"]
    return {"length_split": split,
            "length_balanced_accuracy": None if short is None or long is None else (short + long) / 2}


def pair_report(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    head_names: list[str] | None = None,
    epistemic_chosen: np.ndarray | None = None,
    epistemic_rejected: np.ndarray | None = None,
    tie_tolerance: float | None = None,
    chosen_tokens: np.ndarray | None = None,
    rejected_tokens: np.ndarray | None = None,
    groups: list[str] | None = None,
) -> dict[str, Any]:
    """All metrics for pairs scored by K heads: r_* are [P, K] normalised rewards.

    The ensemble reward is the mean over heads, as served. Three uncertainty
    scores are tested as predictors of misranked pairs: the heads' std of the
    pair margin (their disagreement about this comparison: `auroc_std`), the
    mean of the two samples' served std (`auroc_sample_std`), and the mean
    epistemic term; `auroc_margin` (score -|d|) is the baseline any uncertainty
    should beat, since small margins are the obvious predictor of mistakes.
    With `tie_tolerance`, the report says how many pairs are near ties (`near_ties`);
    with the response lengths `chosen_tokens`/`rejected_tokens` ([P] each), the
    `length_split` and `length_balanced_accuracy`; with `groups` (a dataset name per
    pair) naming several datasets, the same report for each in `per_origin`.
    """
    rc = np.asarray(r_chosen, dtype=np.float64)
    rr = np.asarray(r_rejected, dtype=np.float64)
    if rc.ndim == 1:
        rc, rr = rc[:, None], rr[:, None]
    k = rc.shape[1]
    names = head_names or [f"head{i}" for i in range(k)]
    d = rc.mean(1) - rr.mean(1)
    wrong = ~(d > 0)
    w = _w(d, weights)
    rewards = np.concatenate([rc.mean(1), rr.mean(1)])
    ww = np.concatenate([w, w])
    mean = float(ww @ rewards / ww.sum())
    report: dict[str, Any] = {
        "pairs": len(d),
        "accuracy": accuracy(d, w),
        "ece": ece(d, w),
        "brier": brier(d, w),
        "nll": nll(d, w),
        "accuracy_per_head": {n: accuracy(rc[:, i] - rr[:, i], w) for i, n in enumerate(names)},
        "auroc_std": auroc((rc - rr).std(1), wrong, w) if k > 1 else None,
        "auroc_sample_std": auroc((rc.std(1) + rr.std(1)) / 2, wrong, w) if k > 1 else None,
        "auroc_epistemic": None,
        "auroc_margin": auroc(-np.abs(d), wrong, w),
        "reward_mean": mean,
        "reward_std": float(np.sqrt(ww @ (rewards - mean) ** 2 / ww.sum())),
        "mean_head_std": float(ww @ np.concatenate([rc.std(1), rr.std(1)]) / ww.sum()),
    }
    if epistemic_chosen is not None and epistemic_rejected is not None:
        epi = (np.asarray(epistemic_chosen, dtype=np.float64) + np.asarray(epistemic_rejected, dtype=np.float64)) / 2
        report["auroc_epistemic"] = auroc(epi, wrong, w)
    if tie_tolerance is not None:
        report["near_ties"] = near_ties(d, w, tie_tolerance)
    if chosen_tokens is not None and rejected_tokens is not None:
        report.update(length_split(d, chosen_tokens, rejected_tokens, w))
    if groups is not None and len(set(groups)) > 1:
        g = np.asarray(groups)
        report["per_origin"] = {}
        for name in dict.fromkeys(groups):
            m = g == name
            if w[m].sum() <= 0:  # only zero-weight pairs: nothing to measure
                report["per_origin"][name] = {"pairs": int(m.sum())}
                continue
            report["per_origin"][name] = pair_report(
                rc[m], rr[m], w[m], head_names=names,
                epistemic_chosen=None if epistemic_chosen is None else np.asarray(epistemic_chosen)[m],
                epistemic_rejected=None if epistemic_rejected is None else np.asarray(epistemic_rejected)[m],
                tie_tolerance=tie_tolerance,
                chosen_tokens=None if chosen_tokens is None else np.asarray(chosen_tokens)[m],
                rejected_tokens=None if rejected_tokens is None else np.asarray(rejected_tokens)[m],
            )
    return report


def format_report(report: dict[str, Any], title: str = "") -> str:
    """A small fixed-width table of the headline numbers, for the terminal."""

    def f(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = [
        ("pairs", report.get("pairs")), ("accuracy", report.get("accuracy")), ("ECE (20 bins)", report.get("ece")),
        ("Brier", report.get("brier")), ("NLL", report.get("nll")),
        ("AUROC std -> misranked", report.get("auroc_std")),
        ("AUROC sample std", report.get("auroc_sample_std")),
        ("AUROC epistemic", report.get("auroc_epistemic")),
        ("AUROC -|margin| (baseline)", report.get("auroc_margin")),
        ("reward mean", report.get("reward_mean")), ("reward std", report.get("reward_std")),
    ]
    if ties := report.get("near_ties"):
        lo, hi = ties["accuracy_range"]
        rows.insert(2, (f"  near ties (|d| < {ties['margin_below']:g})", f"{ties['pairs']}: accuracy {lo:.4f}-{hi:.4f}"))
    if split := report.get("length_split"):
        at = next(i for i, r in enumerate(rows) if r[0] == "ECE (20 bins)")
        rows[at:at] = [("length-balanced accuracy", report.get("length_balanced_accuracy"))] + [
            (f"  {name.replace('_', ' ')} (n={g['n']})", g["accuracy"]) for name, g in split.items()]
    rows += [(f"  accuracy {n}", v) for n, v in (report.get("accuracy_per_head") or {}).items()]
    width = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines += [f"{name:<{width}}  {f(v)}" for name, v in rows]
    return "\n".join(lines)
