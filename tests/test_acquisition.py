"""service/data/acquisition.py: the pair scores (hand-computed) and the diversified batch selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmserve.service.data.acquisition import (
    DEFAULT_MIN_DISTANCE,
    DEFAULT_RULE,
    binary_entropy,
    candidate_pairs,
    score_pairs,
    select,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bald_zero_when_heads_agree() -> None:
    ra = np.array([[1.0, 1.0, 1.0], [0.2, 0.2, 0.2]])
    rb = np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.2]])
    s = score_pairs(ra, rb)
    np.testing.assert_allclose(s.disagreement, 0.0, atol=1e-12)
    # identical heads: the entropy is the single head's; an exact tie is maximal
    np.testing.assert_allclose(s.uncertainty, [float(binary_entropy(np.array(sig(1.0)))), math.log(2)])


def test_bald_hand_computed_and_maximal_for_split_heads() -> None:
    # two heads confident in opposite directions: P = sig(3), sig(-3)
    ra = np.array([[3.0, -3.0], [1.0, -1.0], [0.5, 0.5]])
    rb = np.zeros((3, 2))
    s = score_pairs(ra, rb, rule="disagreement")
    p = sig(3.0)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert s.disagreement[0] == pytest.approx(math.log(2) - h, abs=1e-12)   # mean P = 1/2
    assert s.disagreement[0] > s.disagreement[1] > s.disagreement[2] == pytest.approx(0.0, abs=1e-12)
    # fully split, saturated heads reach the bound log 2
    far = score_pairs(np.array([[40.0, -40.0]]), np.zeros((1, 2)))
    assert far.disagreement[0] == pytest.approx(math.log(2), abs=1e-9)
    # the ensemble is unsure on both split pairs: prob = sig(mean diff) = 1/2
    np.testing.assert_allclose(s.prob[:2], 0.5)
    np.testing.assert_array_equal(s.score, s.disagreement)


def test_prob_is_sigmoid_of_mean_reward_difference() -> None:
    rng = np.random.default_rng(0)
    ra, rb = rng.normal(size=(50, 8)) * 5, rng.normal(size=(50, 8)) * 5
    s = score_pairs(ra, rb)
    expect = np.array([sig(x) for x in (ra.mean(1) - rb.mean(1))])
    np.testing.assert_allclose(s.prob, expect, rtol=1e-12)
    # not the mean of the per-head probabilities
    assert not np.allclose(s.prob, (1 / (1 + np.exp(-(ra - rb)))).mean(1))
    np.testing.assert_allclose(s.uncertainty, binary_entropy(s.prob))
    assert (s.disagreement >= 0).all() and (s.disagreement <= math.log(2) + 1e-12).all()
    # the default rule (combined) is entropy of prob plus BALD
    assert s.rule == DEFAULT_RULE == "combined"
    np.testing.assert_allclose(s.score, s.uncertainty + s.disagreement)
    np.testing.assert_array_equal(score_pairs(ra, rb, rule="uncertainty").score, s.uncertainty)
    c = s
    # swapping sides mirrors prob and leaves every score unchanged
    sw = score_pairs(rb, ra, rule="combined")
    np.testing.assert_allclose(sw.prob, 1 - s.prob, atol=1e-12)
    np.testing.assert_allclose(sw.score, c.score, atol=1e-12)


def test_extreme_rewards_are_finite() -> None:
    s = score_pairs(np.array([[1e4, -1e4]]), np.zeros((1, 2)))
    assert np.isfinite([s.prob, s.disagreement, s.uncertainty]).all()


def test_score_pairs_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="must both be"):
        score_pairs(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown acquisition rule"):
        score_pairs(np.zeros((1, 2)), np.zeros((1, 2)), rule="nope")


def test_select_top_k_and_stable_ties() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    assert select(scores, 3) == [1, 3, 2]          # tie 0.9 broken by lower index
    assert select(scores, 0) == []
    assert select(scores, 99) == [1, 3, 2, 4, 0]   # k capped at N
    assert select(np.array([np.nan, 0.2, 0.1]), 3) == [1, 2, 0]   # NaN last
    assert select(scores, 3) == select(scores.copy(), 3)


def test_select_groups_and_fill_up() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = ["p1", "p1", "p2", "p2", "p3"]
    assert select(scores, 3, groups=groups) == [0, 2, 4]
    assert select(scores, 3, groups=groups, max_per_group=2) == [0, 1, 2]
    # only 3 groups: the 4th and 5th come from the best skipped ones, in score order
    assert select(scores, 5, groups=groups) == [0, 2, 4, 1, 3]
    with pytest.raises(ValueError, match="groups"):
        select(scores, 2, groups=["a"])


def test_select_min_distance() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    emb = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    # 1 is a near-duplicate of 0 (cos distance 5e-5); 3 is 0.29 away from 0 and 2
    kw = {"embeddings": emb, "center": False}
    assert select(scores, 3, **kw) == [0, 2, 3]
    assert select(scores, 3, min_distance=0.0, **kw) == [0, 1, 2]
    assert select(scores, 2, min_distance=0.5, **kw) == [0, 2]
    # 3 is within 0.5 of both: skipped, then filled back (after 1, the better skipped one)
    assert select(scores, 4, min_distance=0.5, **kw) == [0, 2, 1, 3]
    assert 0 < DEFAULT_MIN_DISTANCE < 0.5
    # both rules together
    assert select(scores, 2, groups=["a", "b", "b", "c"], **kw) == [0, 2]
    assert select(scores, 2, embeddings=emb, center=False) == select(scores, 2, **kw)


def test_select_centres_anisotropic_embeddings() -> None:
    # a large shared offset makes every raw pair look like a near-duplicate (cos ~ 1);
    # centring on the candidates' mean recovers the distinct directions
    rng = np.random.default_rng(0)
    emb = 100.0 + rng.normal(size=(6, 16))
    emb[1] = emb[0] + 1e-3                      # a genuine near-copy of 0
    scores = np.linspace(1, 0, 6)
    assert select(scores, 3, embeddings=emb, center=False) == [0, 1, 2]   # all skipped, then filled
    assert select(scores, 3, embeddings=emb) == [0, 2, 3]                 # only the copy skipped


def test_candidate_pairs() -> None:
    assert candidate_pairs(0) == [] and candidate_pairs(1) == []
    assert candidate_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(candidate_pairs(6)) == 15
