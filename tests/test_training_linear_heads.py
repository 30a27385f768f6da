"""Exact Bradley-Terry heads on frozen features (training/linear_heads.py) and the trainer's lbfgs path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rmserve.training.linear_heads import choose_l2, cross_fitted_rewards, fit_bt_head, fold_parts


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
    from rmserve.service.data.train_config import TrainConfig

    with pytest.raises(ValueError, match="needs finetune_layers = 0"):
        TrainConfig(data="x", out="y", head_solver="lbfgs", finetune_layers=1)
    with pytest.raises(ValueError, match="head_solver must be"):
        TrainConfig(data="x", out="y", head_solver="sgd")


def test_cross_fitted_rewards_never_score_a_pair_with_a_head_that_saw_it():
    # random labels in many dimensions: memorisable in-sample, coin-flip out of fold
    g = torch.Generator().manual_seed(5)
    x = torch.randn(240, 150, generator=g, dtype=torch.float64)
    chosen, rejected = torch.arange(0, 240, 2), torch.arange(1, 240, 2)
    weights = torch.ones(2, 120, dtype=torch.float64)
    w = fit_bt_head(x[chosen] - x[rejected], l2=1e-6)
    assert float(((x[chosen] - x[rejected]) @ w > 0).double().mean()) > 0.95
    rc, rr = cross_fitted_rewards(x, chosen, rejected, weights, l2=1e-6)
    oof = float((rc.mean(1) > rr.mean(1)).double().mean())
    assert 0.3 < oof < 0.7
    # served normalisation per head: every fold's head has mean 0 / std 1 over all sequences,
    # so rewards are O(1) and a head's values are comparable across folds
    assert rc.abs().max() < 6 and rr.abs().max() < 6


def test_folds_keep_a_group_together():
    groups = [f"f:{i // 3}" for i in range(30)]  # ten ranked lists of three pairs
    parts = fold_parts(30, 5, seed=0, groups=groups)
    assert sorted(torch.cat(parts).tolist()) == list(range(30))
    for p in parts:
        assert len({groups[i] for i in p.tolist()}) * 3 == len(p)
