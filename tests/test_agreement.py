"""service/data/agreement.py: κ against hand computation, self-consistency, and the flag rule on planted labelers."""

from __future__ import annotations

import numpy as np
import pytest

from rmserve.service.data.agreement import LabelRecord, cohens_kappa, labeler_report


def rec(labeler: str, item: str, outcome: float, p: float | None = None, kind: str = "human") -> LabelRecord:
    return LabelRecord(labeler=labeler, kind=kind, item=item, outcome=outcome, model_prob=p)


X = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
Y = [1, 0, 0, 0, 1, 1, 1, 1, 0, 0]
# by hand: p_o = 7/10; X has 6 ones, Y 5: p_e = .6*.5 + .4*.5 = .5; kappa = (.7 - .5)/(1 - .5) = .4


def test_kappa_hand_computed() -> None:
    assert cohens_kappa(X, Y) == pytest.approx(0.4)
    assert cohens_kappa(X, X) == pytest.approx(1.0)
    assert cohens_kappa(X, [1 - v for v in X]) == pytest.approx(-12 / 13)  # p_o 0, p_e .48
    # three categories with ties: p_o = 3/5; p_e = (2*2 + 2*1 + 1*2)/25 = 8/25; kappa = (15-8)/(25-8)
    assert cohens_kappa([1, 1, 0, 0, 0.5], [1, 0.5, 0, 1, 0.5]) == pytest.approx(7 / 17)
    assert cohens_kappa([1, 1], [1, 1]) == 1.0 and cohens_kappa([1, 1], [0, 0]) == 0.0
    with pytest.raises(ValueError):
        cohens_kappa([], [])


def test_report_kappa_two_labelers_matches_hand_example() -> None:
    recs = [rec("a", f"i{j}", x) for j, x in enumerate(X)] + [rec("b", f"i{j}", y) for j, y in enumerate(Y)]
    stats = {s.labeler: s for s in labeler_report(recs)}
    assert stats["a"].agreement_with_others == pytest.approx(0.4)
    assert stats["b"].agreement_with_others == pytest.approx(0.4)
    assert stats["a"].shared_items == 10 and stats["a"].volume == 10
    assert stats["a"].agreement_with_model is None and stats["a"].self_consistency is None
    # below min_shared there is no kappa
    few = {s.labeler: s for s in labeler_report(recs, min_shared=11)}
    assert few["a"].agreement_with_others is None


def test_majority_of_others_skips_split_votes() -> None:
    # item x: others b=1, c=0 split -> no reference for a; item y: b=c=1 -> reference 1
    recs = [rec("a", "x", 1), rec("b", "x", 1), rec("c", "x", 0),
            rec("a", "y", 0), rec("b", "y", 1), rec("c", "y", 1)]
    raw = {s.labeler: s for s in labeler_report(recs, min_shared=1, max_rounds=1)}  # no cleaning
    assert raw["a"].shared_items == 1
    # cleaning: c (kappa 0 vs the others) leaves the reference, b alone decides x for a
    clean = {s.labeler: s for s in labeler_report(recs, min_shared=1)}
    assert clean["a"].shared_items == 2


def test_self_consistency_and_model_agreement_by_hand() -> None:
    recs = [
        rec("a", "i1", 1, 0.9), rec("a", "i1", 1, 0.9),                 # consistent
        rec("a", "i2", 0, 0.8), rec("a", "i2", 0, 0.8), rec("a", "i2", 0, 0.8),  # consistent
        rec("a", "i3", 1, 0.2), rec("a", "i3", 0, 0.2),                 # not
        rec("a", "i4", 0.5, 0.7), rec("a", "i4", 0.5, 0.7),             # consistent ties
        rec("a", "i5", 1, None), rec("a", "i6", 0, 0.5),               # unscored / model tie
    ]
    (s,) = labeler_report(recs)
    assert s.repeated_items == 4 and s.self_consistency == pytest.approx(3 / 4)
    # scored non-tie labels: i1 x2 (agree), i2 x3 (disagree), i3: 1 vs .2 no, 0 vs .2 yes
    assert s.scored_labels == 7 and s.agreement_with_model == pytest.approx(3 / 7)
    assert s.volume == 11 and not s.flagged


def planted(seed: int) -> tuple[list[LabelRecord], set[str]]:
    """4 honest (85% with a hidden truth), 1 adversary (flips), 1 careless (coin); 3 labelers an item."""
    rng = np.random.default_rng(seed)
    names = ["h1", "h2", "h3", "h4", "adv", "rnd"]
    n_items = 300
    truth = rng.integers(0, 2, n_items)
    # a ~70%-accurate model: the honest labelers agree with it ~0.85*.7 + .15*.3 = 0.64
    model_right = rng.random(n_items) < 0.7
    p_first = np.where(truth == model_right, rng.uniform(0.55, 0.95, n_items), rng.uniform(0.05, 0.45, n_items))
    recs: list[LabelRecord] = []
    opinions: dict[tuple[str, int], float] = {}
    for i in range(n_items):
        for who in rng.choice(names, size=3, replace=False):
            if who == "rnd":
                y = float(rng.integers(0, 2))
            else:
                honest = truth[i] if rng.random() < 0.85 else 1 - truth[i]
                y = float(1 - honest if who == "adv" else honest)
            opinions[(str(who), i)] = y
            recs.append(rec(str(who), f"item{i}", y, float(p_first[i]), kind="ai" if who == "h4" else "human"))
    # planted repeats: 12 items a labeler; honest and adversary repeat their answer, careless redraws
    for who in names:
        mine = [i for (w, i) in opinions if w == who][:12]
        for i in mine:
            y = float(rng.integers(0, 2)) if who == "rnd" else opinions[(who, i)]
            recs.append(rec(who, f"item{i}", y, float(p_first[i])))
    return recs, {"adv", "rnd"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flags_exactly_the_adversary_and_the_careless_labeler(seed: int) -> None:
    recs, bad = planted(seed)
    stats = {s.labeler: s for s in labeler_report(recs)}
    assert {n for n, s in stats.items() if s.flagged} == bad, {n: s.reason for n, s in stats.items()}
    for n in ("h1", "h2", "h3", "h4"):
        s = stats[n]
        assert s.agreement_with_others is not None and s.agreement_with_others > 0.3
        assert s.self_consistency == 1.0 and s.repeated_items == 12
        assert s.reason == ""
    assert stats["h4"].kind == "ai" and stats["h1"].kind == "human"
    assert stats["adv"].agreement_with_others < -0.3
    assert abs(stats["rnd"].agreement_with_others) < 0.25
    assert stats["adv"].agreement_with_model < stats["h1"].agreement_with_model
    assert "kappa" in stats["adv"].reason and "kappa" in stats["rnd"].reason
    assert stats["adv"].self_consistency == 1.0          # flipping consistently is still consistent
    assert stats["rnd"].self_consistency < 1.0
    assert all(s.volume > 100 and s.shared_items >= 50 for s in stats.values())


def test_no_kappa_flag_without_consensus() -> None:
    # everybody random: the median kappa is ~0, so nobody is flagged on kappa
    rng = np.random.default_rng(5)
    recs = [rec(f"l{j}", f"i{i}", float(rng.integers(0, 2)))
            for i in range(200) for j in rng.choice(5, size=3, replace=False)]
    stats = labeler_report(recs)
    assert not any(s.flagged for s in stats)


def test_model_flag_for_a_labeler_without_shared_items() -> None:
    # a lone judge labelling items nobody else saw, against the model; the others agree with it
    rng = np.random.default_rng(3)
    recs = []
    for j, who in enumerate(["a", "b", "c", "judge"]):
        for i in range(100):
            p = 0.8
            agree = rng.random() < (0.3 if who == "judge" else 0.75)
            recs.append(rec(who, f"{j}-{i}", 1.0 if agree else 0.0, p, kind="ai" if who == "judge" else "human"))
    stats = {s.labeler: s for s in labeler_report(recs)}
    assert stats["judge"].agreement_with_others is None
    assert {n for n, s in stats.items() if s.flagged} == {"judge"}
    assert "model" in stats["judge"].reason
