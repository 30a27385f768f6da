"""What training leaves in the manifest besides heads: normalisation, temperature, epistemic factor."""

from __future__ import annotations

import numpy as np
import torch


def fit_normalisation(rewards: np.ndarray, weights: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per-head shift/scale so rewards over the training sequences have mean 0, std 1."""
    r = np.asarray(rewards, dtype=np.float64)
    w = np.ones(len(r)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = w @ r / w.sum()
    std = np.sqrt(w @ (r - mean) ** 2 / w.sum())
    # a constant head (e.g. untrained) keeps scale 1 rather than dividing by ~0
    std = np.where(std > 1e-8, std, 1.0)
    return mean.tolist(), std.tolist()


def fit_temperature(
    d: np.ndarray, weights: np.ndarray | None = None, *, lo: float = 0.05, hi: float = 20.0
) -> float:
    """T minimising the weighted NLL of σ(d / T), clamped to [lo, hi].

    The NLL is convex in β = 1/T, so bisection on its derivative is exact and
    needs no tuning. Separable data pushes β to infinity: the clamp keeps T >= lo.
    """
    d = np.asarray(d, dtype=np.float64)
    w = np.ones(len(d)) if weights is None else np.asarray(weights, dtype=np.float64)

    def grad(beta: float) -> float:  # d/dβ Σ w softplus(-β d) = -Σ w d σ(-β d)
        return float(-(w * d * np.exp(-np.logaddexp(0.0, beta * d))).sum())

    a, b = np.log(1.0 / hi), np.log(1.0 / lo)
    if grad(np.exp(a)) >= 0:
        return hi
    if grad(np.exp(b)) <= 0:
        return lo
    for _ in range(100):
        mid = 0.5 * (a + b)
        if grad(np.exp(mid)) < 0:
            a = mid
        else:
            b = mid
    return float(1.0 / np.exp(0.5 * (a + b)))


def epistemic_factor(embeddings: torch.Tensor, lambda0: float) -> torch.Tensor:
    """L [H, H] with L Lᵀ = M⁻¹, M = λ₀ I + Σ eᵢ eᵢᵀ, so that ‖Lᵀ e‖² = eᵀ M⁻¹ e.

    With M = C Cᵀ (Cholesky), M⁻¹ = C⁻ᵀ C⁻¹, so L = C⁻ᵀ: one factorisation and
    one triangular solve in float64, never an explicit inverse of M.
    """
    if lambda0 <= 0:
        raise ValueError("lambda0 must be positive (it keeps M invertible)")
    e = embeddings.double()
    h = e.shape[1]
    m = e.T @ e + lambda0 * torch.eye(h, dtype=torch.float64)
    c = torch.linalg.cholesky(m)
    eye = torch.eye(h, dtype=torch.float64)
    return torch.linalg.solve_triangular(c.T, eye, upper=True).float()
