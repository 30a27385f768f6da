"""Which comparisons are most worth labelling under the current ensemble (active learning).

Numpy only: the label service calls this on per-head rewards it already has.

For a candidate pair (a, b) and heads k = 1..K with normalised rewards r_k:

- P_k(a ≻ b) = σ(r_a,k − r_b,k), one Bradley–Terry probability per head;
- `prob` = σ(mean_k r_a,k − mean_k r_b,k), the ensemble probability the server's
  Compare returns (the mean of the *rewards*, not of the probabilities);
- `uncertainty` = H(prob), binary entropy in nats: how close to a coin flip the
  ensemble's answer is (uncertainty sampling; mostly *aleatoric* for a
  well-trained model: genuinely ambiguous pairs stay near ½);
- `disagreement` = BALD mutual information (Houlsby et al. 2011, "Bayesian
  Active Learning for Classification and Preference Learning"):
  H(mean_k P_k) − mean_k H(P_k) ≥ 0. Zero when every head gives the same P;
  largest when heads are confident in opposite directions. It isolates the
  *epistemic* part, what another label could still teach the heads (the width
  that AdvPO, Zhang et al. 2024, penalises in the reward).

`score` is the acquisition score (higher = label first). Default rule:
**`combined` = H(prob) + BALD**, chosen by measurement (bench/active_learning.py,
docs/active_learning.md): HH-RLHF harmless, frozen SmolLM2-135M[:14] features,
8 bootstrap linear BT heads, seed 50 random labels, batches of 50, 30 seeds
paired with random choice. Mean dev-accuracy gain over random across the
rounds up to 1000 labels: combined +0.014 (SE 0.003, better on 24/30 seeds),
BALD +0.009 (SE 0.002), entropy +0.006 (SE 0.003). BALD helps early (the heads'
bootstrap spread is real epistemic uncertainty while labels are few) and fades;
entropy hurts early (it buys ambiguous pairs) and helps late; the sum gets both.
The gain is real but small: about one seed-to-seed standard deviation, and
random needs ~1000 labels for the accuracy `combined` reaches at ~550. Gleave &
Irving 2022 ("Uncertainty Estimation for Language Reward Models") saw little
active-learning gain from ensembles of *fine-tuned* RMs sharing a pretrained
model (too little diversity); here only the linear heads learn, so their
bootstrap spread is the model's actual epistemic uncertainty. Expect less with
members that barely disagree. "uncertainty" and "disagreement" stay selectable
(`RULES`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

# Cosine distance (on candidate-centred embeddings) below which two candidates count
# as near-duplicates in `select` (cosine similarity > 0.95). A near-copy guard, not a
# spread-out rule: among the 1510 HH harmless pairs (last-token features, x_a + x_b)
# it catches the one near-duplicate couple (0.047); every other nearest neighbour is
# >= 0.095 away, median 0.32. Stronger diversity (0.3) did not help (docs/active_learning.md).
DEFAULT_MIN_DISTANCE = 0.05

RULES = ("uncertainty", "disagreement", "combined")
DEFAULT_RULE = "combined"


@dataclass
class PairScores:
    """Per-pair [N] arrays; see the module docstring for each definition."""

    prob: np.ndarray
    disagreement: np.ndarray
    uncertainty: np.ndarray
    score: np.ndarray
    rule: str = DEFAULT_RULE


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only: no overflow for large |x|
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in nats, 0 at p ∈ {0, 1} (0·log 0 = 0), log 2 at ½."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log1p(-p), 0.0))
    return np.maximum(h, 0.0)


def score_pairs(
    rewards_a: np.ndarray, rewards_b: np.ndarray, *, rule: str = DEFAULT_RULE
) -> PairScores:
    """Score N candidate pairs from their [N, K] per-head rewards (side a, side b).

    `rule`: "combined" (default: H(prob) + BALD, the measured best), "uncertainty"
    (H(prob) alone) or "disagreement" (BALD alone).
    """
    if rule not in RULES:
        raise ValueError(f"unknown acquisition rule {rule!r}; known: {RULES}")
    ra = np.asarray(rewards_a, dtype=np.float64)
    rb = np.asarray(rewards_b, dtype=np.float64)
    if ra.ndim == 1:
        ra, rb = ra[:, None], rb[:, None]
    if ra.shape != rb.shape or ra.ndim != 2:
        raise ValueError(f"rewards_a {ra.shape} and rewards_b {rb.shape} must both be [N, K]")
    if ra.shape[1] == 0:
        raise ValueError("need at least one head (K >= 1)")
    d = ra - rb                                        # [N, K]
    prob = _sigmoid(d.mean(axis=1))
    pk = _sigmoid(d)
    disagreement = np.maximum(binary_entropy(pk.mean(axis=1)) - binary_entropy(pk).mean(axis=1), 0.0)
    uncertainty = binary_entropy(prob)
    score = {"uncertainty": uncertainty, "disagreement": disagreement,
             "combined": uncertainty + disagreement}[rule]
    return PairScores(prob, disagreement, uncertainty, score, rule)


def select(
    scores: np.ndarray,
    k: int,
    *,
    groups: Sequence[Hashable] | None = None,
    embeddings: np.ndarray | None = None,
    max_per_group: int = 1,
    min_distance: float | None = None,
    center: bool = True,
) -> list[int]:
    """Indices of the k best candidates by score (descending), diversified greedily.

    Why: the top of a score ranking tends to be near-duplicates (several pairs of
    one prompt, or paraphrased responses), and a labelling batch of duplicates
    teaches little more than one of them. Walking the ranking best-first, a
    candidate is skipped when its group already has `max_per_group` picks, or (with
    `embeddings` [N, D]) when its cosine distance to a pick is < `min_distance`
    (default DEFAULT_MIN_DISTANCE). Embeddings are first centred on their mean over
    the candidates (`center`): raw transformer states share a large common
    direction (uncentred, every HH pair's nearest neighbour is < 0.05 away), which
    would make everything a near-duplicate. If that leaves fewer than k, the best skipped
    candidates fill up the batch, so a small pool still yields k. Ties break by
    lower index (stable sort); NaN scores rank last.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(s)
    k = max(0, min(int(k), n))
    if k == 0:
        return []
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} scores")
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-key, kind="stable")
    unit = None
    if embeddings is not None:
        e = np.asarray(embeddings, dtype=np.float64)
        if e.ndim != 2 or len(e) != n:
            raise ValueError(f"embeddings must be [N={n}, D], got {e.shape}")
        if center and len(e) > 1:
            e = e - e.mean(axis=0)
        unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        min_distance = DEFAULT_MIN_DISTANCE if min_distance is None else float(min_distance)
    picked: list[int] = []
    skipped: list[int] = []
    per_group: dict[Hashable, int] = {}
    for i in map(int, order):
        if len(picked) == k:
            break
        if groups is not None and per_group.get(groups[i], 0) >= max_per_group:
            skipped.append(i)
            continue
        if unit is not None and picked and float((1.0 - unit[picked] @ unit[i]).min()) < min_distance:
            skipped.append(i)
            continue
        picked.append(i)
        if groups is not None:
            per_group[groups[i]] = per_group.get(groups[i], 0) + 1
    picked.extend(skipped[: k - len(picked)])
    return picked


def candidate_pairs(n_responses: int) -> list[tuple[int, int]]:
    """All unordered pairs (i, j), i < j, of one prompt's n responses, in lexicographic order."""
    n = int(n_responses)
    return [(i, j) for i in range(n) for j in range(i + 1, n)]
