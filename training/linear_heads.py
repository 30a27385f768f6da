"""Bradley-Terry heads on frozen features, fitted exactly.

On a frozen backbone a head is a logistic regression on pair differences
x_c - x_r: a convex problem with one optimum per L2 strength. Solving it with
L-BFGS (float64, to convergence) replaces an lr/epochs search with one knob,
and that knob is chosen by k-fold cross-validation on the training pairs
(never on dev). The bias cancels in r_c - r_r; it is set by the normalisation.

`fit_exact_heads` is the trainer's `head_solver=lbfgs` path: what the training
loop (training/trainer.py) calls instead of its AdamW steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from rmserve.training.events import ProgressEvent, Reporter
from rmserve.training.schedule import derive_seed

if TYPE_CHECKING:  # the solvers stay importable without the model layer (bench/study uses them)
    from rmserve.training.inputs import EmbedFn, FitPairs

DEFAULT_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def fit_bt_head(
    dx: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    l2: float,
    margin: torch.Tensor | None = None,
    max_iter: int = 500,
) -> torch.Tensor:
    """argmin_w  sum_i a_i softplus(m_i - dx_i . w) / sum_i a_i  +  l2 |w|^2   (float64 L-BFGS).

    dx [P, H] pair differences, weight [P] pair weights a_i >= 0 (default 1), margin [P] (default 0).
    """
    dx = dx.double()
    a = torch.ones(len(dx), dtype=torch.float64) if weight is None else weight.double()
    m = torch.zeros(len(dx), dtype=torch.float64) if margin is None else margin.double()
    a = a / a.sum().clamp_min(1e-300)
    w = torch.zeros(dx.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (a * F.softplus(m - dx @ w)).sum() + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def fold_parts(n: int, folds: int, seed: int, groups: list | None = None) -> list[torch.Tensor]:
    """Pair indices of each fold; pairs of one group (a source row: a ranked list) stay in one fold."""
    if groups is None:
        return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).chunk(folds))
    keys = sorted(set(groups), key=str)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {keys[j]: i % folds for i, j in enumerate(order)}
    return [torch.tensor([p for p in range(n) if fold_of[groups[p]] == f], dtype=torch.long) for f in range(folds)]


@dataclass
class L2Choice:
    l2: float
    cv_accuracy: dict[float, float]   # grid value -> cross-validated pair accuracy
    cv_nll: dict[float, float]        # grid value -> cross-validated mean -log sigma(d)
    folds: int


def choose_l2(
    dx: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    grid: tuple[float, ...] = DEFAULT_GRID,
    folds: int = 5,
    seed: int = 0,
    groups: list | None = None,
) -> L2Choice:
    """The grid value with the lowest k-fold cross-validated NLL (accuracy reported beside it).

    NLL rather than accuracy: it is smooth, so a few hundred pairs still rank the
    grid sensibly, and it rewards the calibrated margins the temperature builds on.
    """
    a = torch.ones(len(dx), dtype=torch.float64) if weight is None else weight.double()
    parts = fold_parts(len(dx), folds, seed, groups)
    acc, nll = {}, {}
    for l2 in grid:
        hit = loss = tot = 0.0
        for k in range(folds):
            test = parts[k]
            train = torch.cat([parts[j] for j in range(folds) if j != k])
            w = fit_bt_head(dx[train], a[train], l2=l2)
            d = dx[test].double() @ w
            hit += float((a[test] * (d > 0)).sum())
            loss += float((a[test] * F.softplus(-d)).sum())
            tot += float(a[test].sum())
        acc[l2], nll[l2] = hit / tot, loss / tot
    best = min(grid, key=lambda g: nll[g])
    return L2Choice(best, acc, nll, folds)


def cross_fitted_rewards(
    x: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    head_weights: torch.Tensor,
    *,
    l2: float,
    margin: torch.Tensor | None = None,
    folds: int = 5,
    seed: int = 0,
    groups: list | None = None,
    norm_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold normalised rewards (r_chosen, r_rejected), each [P, K].

    For every fold of pairs, the K heads (head_weights [K, P]: pair weights times
    bootstrap multiplicities) are fitted on the other folds, normalised as
    serving normalises them (mean 0, std 1 over the rows `norm_rows` of `x`, default all), and score
    the fold's pairs. Every pair is then scored by an ensemble that never saw it:
    a temperature fitted on these margins uses all of train, and their metrics
    are the honest estimate of generalisation that train offers.
    """
    x = x.double()
    n, k = len(chosen), head_weights.shape[0]
    dx = x[chosen] - x[rejected]
    rc = torch.empty(n, k, dtype=torch.float64)
    rr = torch.empty(n, k, dtype=torch.float64)
    parts = fold_parts(n, folds, seed, groups)
    for i, test in enumerate(parts):
        train = torch.cat([p for j, p in enumerate(parts) if j != i])
        for h in range(k):
            w = fit_bt_head(dx[train], head_weights[h, train], l2=l2,
                            margin=None if margin is None else margin[train])
            r = x @ w
            ref = r if norm_rows is None else r[norm_rows]
            r = (r - ref.mean()) / ref.std(correction=0).clamp_min(1e-12)
            rc[test, h], rr[test, h] = r[chosen[test]], r[rejected[test]]
    return rc, rr


@dataclass
class ExactFit:
    """What an exact (lbfgs) head fit hands to finalisation; empty for gradient-trained heads."""

    info: dict[str, Any] | None = None                              # report["heads"]
    cross_fitted: tuple[torch.Tensor, torch.Tensor] | None = None  # out-of-fold (chosen, rejected) rewards


def fit_exact_heads(
    pairs: FitPairs,
    embed_fn: EmbedFn,
    *,
    seed: int,
    l2: float | None,
    sources: list,
    num_seqs: int,
    cross_fit: bool,
    rep: Reporter,
    real_seqs: np.ndarray | None = None,
    member: int,
    step: int,
    total: int,
) -> tuple[torch.Tensor, ExactFit]:
    """Each head's L2 logistic regression on frozen (whitened) features, solved exactly.

    `l2` None: chosen by CV grouped by `sources` (a ranked list stays in one fold).
    `cross_fit`: also the out-of-fold rewards the temperature is fitted on when no
    slice of train is held out. One `step` event per head, numbered from `step` + 1.
    Returns the weights [K, H] (whitened space) and what finalisation reports.
    """
    pw, margin = pairs.weight, pairs.margin
    k = pairs.counts.shape[0]
    dx = (embed_fn(pairs.chosen[pairs.fit]) - embed_fn(pairs.rejected[pairs.fit])).double()
    l2, info = _head_l2(l2, seed, dx, pairs, sources, rep)
    cross_fitted = _cross_fitted(seed, l2, pairs, embed_fn, sources, num_seqs, rep, real_seqs) if cross_fit else None
    weights = []
    t0 = time.monotonic()
    for j in range(k):
        w = fit_bt_head(dx, pairs.counts[j].double() * pw.double(), l2=l2, margin=margin)
        weights.append(w.float())
        step += 1
        d = dx @ w
        rep.emit(ProgressEvent(
            "step", "train", step=step, total=total, member=member,
            loss=round(float((pw * F.softplus(margin - d.float())).sum() / pw.sum()), 5),
            accuracy=round(float((pw * (d > 0)).sum() / pw.sum()), 4),
            eta_s=round((time.monotonic() - t0) / (j + 1) * (k - j - 1), 1),
        ))
    return torch.stack(weights), ExactFit(info, cross_fitted)


def _head_l2(l2: float | None, seed: int, dx: torch.Tensor, pairs: FitPairs, sources: list,
             rep: Reporter) -> tuple[float, dict[str, Any]]:
    """The L2 strength, `--head-l2` or chosen by grouped CV on train, and its report["heads"] entry."""
    if l2 is not None:
        return l2, {"solver": "lbfgs", "l2": l2, "chosen_by": "--head-l2"}
    choice = choose_l2(dx, pairs.weight.double(), seed=derive_seed(seed, "cv"), groups=sources)
    l2 = choice.l2
    info = {"solver": "lbfgs", "l2": l2, "chosen_by": f"{choice.folds}-fold CV NLL on train",
            "cv_accuracy": {str(g): round(v, 4) for g, v in choice.cv_accuracy.items()},
            "cv_nll": {str(g): round(v, 5) for g, v in choice.cv_nll.items()}}
    rep.phase("train", f"L2 {l2:g} chosen by {choice.folds}-fold CV on train "
                       f"(CV accuracy {choice.cv_accuracy[l2]:.3f})")
    return l2, info


def _cross_fitted(seed: int, l2: float, pairs: FitPairs, embed_fn: EmbedFn, sources: list, num_seqs: int,
                  rep: Reporter, real_seqs: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """No held-out slice: out-of-fold rewards of the train pairs, so the temperature sees unseen pairs."""
    rep.phase("train", "out-of-fold rewards on train (5 folds) for the temperature")
    chosen, rejected = pairs.chosen[pairs.fit], pairs.rejected[pairs.fit]
    seqs = torch.unique(torch.cat([chosen, rejected]))
    where = torch.full((num_seqs,), -1, dtype=torch.long)
    where[seqs] = torch.arange(len(seqs))
    return cross_fitted_rewards(
        embed_fn(seqs), where[chosen], where[rejected], pairs.counts.double() * pairs.weight.double(),
        l2=l2, margin=pairs.margin, seed=derive_seed(seed, "cv"), groups=sources,
        norm_rows=None if real_seqs is None else torch.as_tensor(np.isin(seqs.numpy(), real_seqs)))
