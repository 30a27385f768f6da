"""Exact Bradley-Terry heads on frozen features (training/linear_heads.py) and the trainer's lbfgs path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rmserve.training.linear_heads import choose_l2, fit_bt_head


def synthetic(n: int, h: int, seed: int, noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(h, generator=g, dtype=torch.float64)
    dx = torch.randn(n, h, generator=g, dtype=torch.float64)
    p = torch.sigmoid(dx @ w_true / noise)
    flip = torch.rand(n, generator=g, dtype=torch.float64) > p
    dx[flip] = -dx[flip]  # orient each pair so that "chosen" won a BT draw
    return dx, w_true


def test_the_fit_is_the_regularised_optimum():
    dx, _ = synthetic(300, 12, seed=0)
    a = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    m = torch.full((300,), 0.3, dtype=torch.float64)

    def grad_at(w: torch.Tensor) -> torch.Tensor:
        w = w.clone().requires_grad_(True)
        loss = (a / a.sum() * F.softplus(m - dx @ w)).sum() + 0.01 * (w @ w)
        return torch.autograd.grad(loss, w)[0]

    # independent check: the objective's gradient, large at the start, vanishes at the returned weights (KKT)
    assert grad_at(torch.zeros(12, dtype=torch.float64)).abs().max() > 1e-2
    assert grad_at(fit_bt_head(dx, a, l2=0.01, margin=m)).abs().max() < 1e-5


def test_the_fit_recovers_the_true_preference_direction():
    dx, w_true = synthetic(4000, 8, seed=2)
    w = fit_bt_head(dx, l2=1e-6)
    assert F.cosine_similarity(w, w_true, dim=0) > 0.99
    assert torch.allclose(w, w_true, rtol=0.15, atol=0.15)  # BT is identified: the scale too, not just the direction


def test_cv_prefers_more_regularisation_when_data_is_scarce():
    few, _ = synthetic(40, 30, seed=3, noise=4.0)
    many, _ = synthetic(3000, 30, seed=3, noise=4.0)
    grid = (1e-4, 1e-2, 1.0)
    assert choose_l2(few, grid=grid).l2 > choose_l2(many, grid=grid).l2


def test_lbfgs_needs_a_frozen_backbone(tmp_path):
    from rmserve.training.config import TrainConfig

    with pytest.raises(ValueError, match="needs finetune_layers = 0"):
        TrainConfig(data="x", out="y", head_solver="lbfgs", finetune_layers=1)
    with pytest.raises(ValueError, match="head_solver must be"):
        TrainConfig(data="x", out="y", head_solver="sgd")
