"""Metrics, BT loss and training statistics against independent (brute-force, pure-Python) computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rmserve.kernels.last_token import last_token_scores_reference
from rmserve.training.loss import bt_loss
from rmserve.training.metrics import accuracy, auroc, brier, ece, format_report, nll, pair_report
from rmserve.training.schedule import calibration_split, length_sorted_batches, lr_scale
from rmserve.training.stats import epistemic_factor, fit_normalisation, fit_temperature


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- metrics ---------------------------------------------------------------------------------


def test_accuracy_is_strict_and_weighted():
    d = np.array([1.0, 0.0, -2.0, 3.0])
    assert accuracy(d) == 0.5                       # the tie is a miss
    assert accuracy(d, np.array([1, 1, 1, 5])) == pytest.approx(6 / 8)


def test_ece_hand_computed():
    # p = σ(d); conf = max(p, 1-p); bins of width 0.05
    d = np.array([math.log(9), -math.log(9), math.log(3)])  # p = 0.9, 0.1, 0.75
    # pair 1: conf .9 correct; pair 2: conf .9 wrong -> bin [.9,.95): acc .5, conf .9, 2 pairs
    # pair 3: conf .75 correct -> bin [.75,.8): |1 - .75| = .25
    assert ece(d) == pytest.approx((2 * 0.4 + 0.25) / 3)


def _ece_symmetric_bruteforce(d, w, bins=20):
    """The documented equivalent: bin p itself, each pair counted as (p, 1) and (1 - p, 0)."""
    pts = []
    for di, wi in zip(d, w, strict=True):
        p = sig(di)
        pts += [(p, 1.0, wi), (1 - p, 0.0, wi)]
    total = 0.0
    for b in range(bins):
        inb = [(p, y, wi) for p, y, wi in pts if min(int(p * bins), bins - 1) == b]
        if inb:
            wsum = sum(x[2] for x in inb)
            total += wsum * abs(sum(y * wi for _, y, wi in inb) / wsum - sum(p * wi for p, _, wi in inb) / wsum)
    return total / sum(x[2] for x in pts)


def test_ece_equals_binning_sigma_in_both_orientations():
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = rng.normal(0.5, 2.0, 200)
        w = rng.uniform(0.1, 2.0, 200)
        assert ece(d, w) == pytest.approx(_ece_symmetric_bruteforce(d, w), abs=1e-12)


def test_brier_and_nll_match_pure_python():
    d = [2.0, -1.0, 0.3, 0.0]
    w = [1.0, 2.0, 0.5, 1.0]
    exp_brier = sum(wi * (1 - sig(x)) ** 2 for x, wi in zip(d, w, strict=True)) / sum(w)
    exp_nll = sum(wi * -math.log(sig(x)) for x, wi in zip(d, w, strict=True)) / sum(w)
    assert brier(np.array(d), np.array(w)) == pytest.approx(exp_brier, abs=1e-12)
    assert nll(np.array(d), np.array(w)) == pytest.approx(exp_nll, abs=1e-12)


def _auroc_bruteforce(s, pos, w):
    num = den = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if pos[i] and not pos[j]:
                den += w[i] * w[j]
                num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


def test_auroc_with_ties_and_weights_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(10):
        s = rng.integers(0, 5, 40).astype(float)  # many ties
        pos = rng.random(40) < 0.3
        w = rng.uniform(0.5, 2, 40)
        assert auroc(s, pos, w) == pytest.approx(_auroc_bruteforce(s, pos, w), abs=1e-12)
    assert auroc(np.array([1.0, 2.0]), np.array([True, True])) is None
    assert auroc(np.array([3.0, 1.0, 2.0]), np.array([True, False, False])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5


def test_pair_report_ensemble_is_the_head_mean_and_std_is_the_margin_disagreement():
    rc = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, -2.0]])
    rr = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    rep = pair_report(rc, rr, head_names=["a", "b"])
    assert rep["accuracy"] == pytest.approx(1 / 3)            # margins 2, -1, -0.5
    assert rep["accuracy_per_head"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    # margin std per pair: |1-3|/2 = 1, 0, |1.5+2.5|/2 = 2; misranked: pairs 2 and 3
    assert rep["auroc_std"] == pytest.approx(0.5)             # (1 vs 0 -> 0) and (1 vs 2 -> 1), averaged
    rewards = np.r_[rc.mean(1), rr.mean(1)]
    assert rep["reward_mean"] == pytest.approx(rewards.mean())
    assert rep["reward_std"] == pytest.approx(rewards.std())
    assert "near_ties" not in rep


def test_near_ties_bound_the_accuracy_any_flip_within_the_tolerance_can_reach():
    rng = np.random.default_rng(3)
    d, w = rng.normal(0, 1, 200), rng.uniform(0.5, 2, 200)
    tol = 0.15
    ties = pair_report(d[:, None], np.zeros((200, 1)), w, tie_tolerance=tol)["near_ties"]
    near = np.abs(d) < tol
    assert ties["pairs"] == near.sum() > 0 and ties["margin_below"] == tol
    lo, hi = ties["accuracy_range"]
    # every way of moving the near ties across zero (and nothing else) lands inside the band, ends included
    for _ in range(50):
        moved = np.where(near, rng.uniform(-tol, tol, 200), d)
        assert lo - 1e-12 <= accuracy(moved, w) <= hi + 1e-12
    assert accuracy(np.where(near, -1e-9, d), w) == pytest.approx(lo)
    assert accuracy(np.where(near, 1e-9, d), w) == pytest.approx(hi)
    assert lo <= accuracy(d, w) <= hi


def test_length_split_counts_and_accuracies_by_hand():
    # margins and lengths made up: chosen shorter in pairs 0-2, longer in 3-6, equal in 7
    d = np.array([1.0, -0.5, 2.0, 0.3, 0.4, -1.0, 0.0, 0.2])
    lc = np.array([5, 3, 10, 20, 9, 40, 8, 7])
    lr = np.array([9, 4, 11, 2, 8, 30, 1, 7])
    rep = pair_report(d[:, None], np.zeros((8, 1)), chosen_tokens=lc, rejected_tokens=lr)
    split = rep["length_split"]
    assert split["chosen_shorter"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert split["chosen_longer"] == {"n": 4, "accuracy": pytest.approx(2 / 4)}  # the tie 0.0 is a miss
    assert split["equal_length"] == {"n": 1, "accuracy": 1.0}
    assert rep["length_balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # weighted: pair 1 (the miss among the shorter) weighs 3
    w = np.array([1, 3, 1, 1, 1, 1, 1, 1.0])
    rep_w = pair_report(d[:, None], np.zeros((8, 1)), w, chosen_tokens=lc, rejected_tokens=lr)
    assert rep_w["length_split"]["chosen_shorter"]["accuracy"] == pytest.approx(2 / 5)
    text = format_report(rep)
    assert "length-balanced accuracy" in text and "chosen shorter (n=3)" in text and "0.6667" in text
    assert "length_split" not in pair_report(d[:, None], np.zeros((8, 1)))


def test_length_balanced_accuracy_is_none_when_one_side_is_empty():
    d = np.array([1.0, -1.0, 2.0])
    rep = pair_report(d[:, None], np.zeros((3, 1)), chosen_tokens=np.array([9, 9, 4]),
                      rejected_tokens=np.array([1, 2, 4]))
    assert rep["length_split"]["chosen_shorter"] == {"n": 0, "accuracy": None}
    assert rep["length_split"]["chosen_longer"] == {"n": 2, "accuracy": 0.5}
    assert rep["length_balanced_accuracy"] is None
    assert "n/a" in format_report(rep)


def test_per_origin_reports_only_with_several_datasets():
    d = np.array([1.0, -1.0, 2.0, 3.0, -0.5])
    rc, rr = d[:, None], np.zeros((5, 1))
    rep = pair_report(rc, rr, groups=["a", "b", "a", "b", "b"])
    assert list(rep["per_origin"]) == ["a", "b"]
    assert rep["per_origin"]["a"]["pairs"] == 2 and rep["per_origin"]["a"]["accuracy"] == 1.0
    assert rep["per_origin"]["b"]["pairs"] == 3 and rep["per_origin"]["b"]["accuracy"] == pytest.approx(1 / 3)
    assert "per_origin" not in pair_report(rc, rr, groups=["a"] * 5)


# -- loss ------------------------------------------------------------------------------------


def test_bt_loss_matches_pure_python_with_margin_weights_and_centring():
    rc = [1.0, -0.5, 2.0]
    rr = [0.0, 0.5, 2.5]
    m = [0.2, 0.0, -1.0]
    w = [1.0, 3.0, 0.5]
    coef = 0.1
    per = [-math.log(sig(c - r - mi)) + coef * (c + r) ** 2 for c, r, mi in zip(rc, rr, m, strict=True)]
    expected = sum(p * wi for p, wi in zip(per, w, strict=True)) / sum(w)
    got = bt_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64),
                  margin=torch.tensor(m, dtype=torch.float64), weight=torch.tensor(w), center_coef=coef)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_bt_loss_heads_are_normalised_by_their_own_bootstrap_weight():
    rc = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    rr = torch.zeros(2, 2, dtype=torch.float64)
    w = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # head 1 did not draw pair 0
    head0 = (2 * -math.log(sig(1.0)) + 1 * -math.log(sig(0.0))) / 3
    head1 = -math.log(sig(-1.0))
    assert bt_loss(rc, rr, weight=w).item() == pytest.approx((head0 + head1) / 2, abs=1e-12)
    # stable for huge margins (no inf/nan)
    assert torch.isfinite(bt_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


# -- statistics --------------------------------------------------------------------------------


def test_normalisation_gives_mean_0_std_1_per_head():
    r = np.random.default_rng(2).normal([3.0, -1.0], [2.0, 0.5], size=(500, 2))
    shift, scale = fit_normalisation(r)
    z = (r - shift) / scale
    assert np.allclose(z.mean(0), 0, atol=1e-12) and np.allclose(z.std(0), 1, atol=1e-12)


def test_temperature_minimises_the_nll():
    rng = np.random.default_rng(3)
    d = rng.normal(1.0, 3.0, 400)  # overconfident margins: T > 1 expected
    t = fit_temperature(d)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([nll(d / g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3) and t > 1
    assert fit_temperature(np.array([5.0, 6.0])) == 0.05  # separable: clamped, not infinite


def test_epistemic_factor_gives_the_mahalanobis_norm_the_kernel_computes():
    g = torch.Generator().manual_seed(0)
    e_train = torch.randn(50, 8, generator=g, dtype=torch.float64)
    lam = 0.7
    factor = epistemic_factor(e_train, lam)
    m = lam * torch.eye(8, dtype=torch.float64) + e_train.T @ e_train
    e = torch.randn(5, 8, generator=g, dtype=torch.float64)
    expected = torch.sqrt(torch.einsum("bi,bi->b", e, torch.linalg.solve(m, e.T).T))
    hidden = e[:, None, :]  # [B, T=1, H]
    got = last_token_scores_reference(hidden, torch.zeros(1, 8), torch.zeros(1), lengths=torch.ones(5, dtype=torch.long),
                                      unc_factor=factor, compute_dtype=torch.float64).epistemic
    assert torch.allclose(got, expected, rtol=1e-5)


# -- schedule --------------------------------------------------------------------------------------


def test_calibration_split_keeps_a_ranked_list_on_one_side():
    sources = [f"f:{i // 3}" for i in range(300)]  # 100 rows of 3 pairs
    fit, held, _ = calibration_split(sources, 0.2, 10, seed=0)
    assert len(fit) + len(held) == 300 and not set(fit) & set(held)
    assert {sources[i] for i in fit}.isdisjoint({sources[i] for i in held})
    _, held_small, note = calibration_split(sources, 0.2, 100, seed=0)
    assert len(held_small) == 0 and "fewer than 100" in note


def test_batches_cover_every_pair_once_sorted_and_reproducible():
    lengths = np.random.default_rng(4).integers(5, 500, 1000)
    b1 = length_sorted_batches(lengths, 16, torch.Generator().manual_seed(7))
    b2 = length_sorted_batches(lengths, 16, torch.Generator().manual_seed(7))
    assert all((x == y).all() for x, y in zip(b1, b2, strict=True))
    assert sorted(np.concatenate(b1).tolist()) == list(range(1000))
    # length-sorting keeps padding small (random batches of U[5, 500] would pad to ~1.9x)
    padded = sum(len(b) * lengths[b].max() for b in b1)
    assert padded / lengths.sum() < 1.2


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_scale(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_scale(9, 100, 0.1) == pytest.approx(1.0)
    assert lr_scale(99, 100, 0.1) == pytest.approx(0.1, abs=1e-3)
