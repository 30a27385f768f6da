"""Fit the OOD statistics of a served model and calibrate its flag (service/engine/ood.py).

Each member's statistics are the mean and a shrunk covariance of its last-token
embeddings over the training responses; the threshold is the `quantile` of the
model's scores on held-out pairs of the same data, so by construction about
1 - quantile of in-distribution samples are flagged (0.99: 1% false alarms).

The split is by pair: a held-out pair's responses (and its prompt) are never in
the fit, so the threshold is measured on conversations the statistics did not
see. Shrinkage towards a scaled identity is chosen by the Gaussian likelihood of
an inner held-out slice of the fit set: with H = 576 dimensions and a few
thousand responses, the sample covariance alone is near-singular.

`rmserve calibrate-ood MODEL --data train.jsonl` adds the statistics to an
existing ensemble directory (the manifest is rewritten last, atomically); the
trainer calls `fit_ood` on the embeddings it already has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.service.engine.ensemble import read_manifest, save_ood, write_manifest
from rmserve.service.engine.model import load_model
from rmserve.service.engine.ood import OodCalibration, OodStats
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.features import compute_features

log = logging.getLogger(__name__)

SHRINKAGE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 0.7)


def _eig(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, eigenvalues and eigenvectors of the sample covariance of x [N, H], in float64."""
    x = x.double()
    mu = x.mean(0)
    cov = torch.cov((x - mu).T, correction=1)
    evals, evecs = torch.linalg.eigh(cov)
    return mu, evals.clamp_min(0), evecs


def _shrunk(evals: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eigenvalues of (1 - alpha) S + alpha (tr S / H) I: same eigenvectors as S."""
    return (1 - alpha) * evals + alpha * evals.mean()


def _loglik(x: torch.Tensor, mu: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> float:
    """Mean Gaussian log-likelihood of rows of x (up to the constant)."""
    z = ((x.double() - mu) @ evecs) ** 2 / evals
    return float(-0.5 * (z.sum(1).mean() + evals.log().sum()))


def choose_shrinkage(x: torch.Tensor, *, seed: int = 0, holdout: float = 0.2) -> float:
    """The grid value whose shrunk covariance, fitted on 80% of x, best explains the other 20%."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(holdout * n))
    inner, held = x[perm[k:]], x[perm[:k]]
    mu, evals, evecs = _eig(inner)
    scores = {a: _loglik(held, mu, _shrunk(evals, a), evecs) for a in SHRINKAGE_GRID}
    return max(scores, key=scores.get)


def fit_stats(x: torch.Tensor, shrinkage: float | None = None, *, seed: int = 0) -> tuple[OodStats, float]:
    """OOD statistics of embeddings x [N, H] (N >= 2), and the shrinkage used."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"OOD statistics need at least 2 embeddings [N, H], got {tuple(x.shape)}")
    alpha = choose_shrinkage(x, seed=seed) if shrinkage is None else float(shrinkage)
    mu, evals, evecs = _eig(x)
    lam = _shrunk(evals, alpha).clamp_min(1e-12)
    factor = evecs / lam.sqrt()  # (e - mu) @ factor has identity covariance
    return OodStats(mu.float(), factor.float()), alpha


def threshold_of(scores: np.ndarray, quantile: float) -> float:
    """The `quantile` of held-out in-distribution scores (numpy's default, linear interpolation)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if len(scores) == 0:
        raise ValueError("no held-out scores to calibrate the threshold on")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


def split_pairs(chosen: np.ndarray, rejected: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ids to fit on and held-out sequence ids (only in held-out pairs), split by pair."""
    if not 0 < frac < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {frac}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(chosen))
    k = max(1, round(frac * len(chosen)))
    held, fit = perm[:k], perm[k:]
    fit_seqs = np.unique(np.concatenate([chosen[fit], rejected[fit]]))
    held_seqs = np.setdiff1d(np.concatenate([chosen[held], rejected[held]]), fit_seqs)
    return fit_seqs, held_seqs


def fit_ood(
    embeddings: Sequence[torch.Tensor],
    fit_idx: np.ndarray,
    held_idx: np.ndarray,
    *,
    quantile: float = 0.99,
    calibrated_on: str,
    seed: int = 0,
) -> tuple[list[OodStats], OodCalibration, dict[str, Any]]:
    """Per-member statistics on rows `fit_idx` of each member's embeddings [N, H], and the
    threshold on rows `held_idx` of the model-level score (the mean over members)."""
    stats, alphas = [], []
    for e in embeddings:
        s, a = fit_stats(e[torch.as_tensor(fit_idx)], seed=seed)
        stats.append(s)
        alphas.append(a)
    held = torch.stack([s.score(e[torch.as_tensor(held_idx)]) for s, e in zip(stats, embeddings, strict=True)]).mean(0)
    scores = held.double().numpy()
    cal = OodCalibration(threshold=threshold_of(scores, quantile), quantile=quantile,
                         calibrated_on=calibrated_on, num_calibration=len(scores))
    info = {"shrinkage": alphas, "fit_sequences": len(fit_idx), "held_out_sequences": len(held_idx),
            "held_out_score_median": float(np.median(scores)), "threshold": cal.threshold}
    return stats, cal, info


def calibrate_directory(
    model_dir: str | Path,
    data: str | Path,
    *,
    quantile: float = 0.99,
    holdout: float = 0.25,
    seed: int = 0,
    token_budget: int = 4096,
    dtype: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Add OOD statistics and the flag's threshold to the ensemble at `model_dir`, from the
    responses of preference data `data` (its training data), through the serving engine in
    the dtype it serves. Returns what was fitted."""
    t0 = time.monotonic()
    model_dir = Path(model_dir)
    man = read_manifest(model_dir)
    rm = load_model(model_dir, dtype=dtype)
    pairs, report = load_pairs(data)
    enc = encode_pairs(pairs, rm.encoder, report)
    fit_idx, held_idx = split_pairs(enc.chosen, enc.rejected, holdout, seed)
    engine = ScoringEngine(rm, token_budget=token_budget)
    embeddings = []
    for m in range(len(rm.members)):
        def report_progress(done: int, total: int, m: int = m) -> None:
            if progress is not None:
                progress(f"member {m} embeddings", done, total)
        embeddings.append(compute_features(engine, enc.seqs, member=m, progress=report_progress))
    where = (f"{Path(data).name}: {len(held_idx)} responses of a held-out {holdout:.0%} of its pairs "
             f"(seed {seed}), {rm.dtype_name}")
    stats, cal, info = fit_ood(embeddings, fit_idx, held_idx, quantile=quantile, calibrated_on=where, seed=seed)
    for spec, s in zip(man.members, stats, strict=True):
        spec.ood = spec.ood or "ood.safetensors"
        save_ood(model_dir, spec, s)
    man.ood = asdict(cal)
    write_manifest(model_dir, man)  # last: readers see old or new statistics, never half
    info.update({"seconds": round(time.monotonic() - t0, 1), "calibration": asdict(cal)})
    return info


__all__ = ["calibrate_directory", "choose_shrinkage", "fit_ood", "fit_stats", "split_pairs", "threshold_of"]
