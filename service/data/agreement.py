"""Per-labeler agreement, so an operator can spot a careless or adversarial labeler.

Numpy only: the label service calls `labeler_report` on the records it stores.

Outcomes are read as three categories: > 0.5 "first preferred", < 0.5 "second
preferred", = 0.5 "tie" (soft AI-judge labels fall on a side). A labeler who
labelled one item several times is represented on it by the mode of their
labels (a tie when there is no single mode).

Statistics of a labeler L:

- `agreement_with_model`: share of L's non-tie labels on scored items whose side
  matches the ensemble (model_prob > 0.5; model_prob = 0.5 is left out);
- `agreement_with_others`: Cohen's κ between L's label and the majority vote
  (mode) of the *other* labelers on the items they share; an item whose other
  labelers have no single mode (a 1–1 split) gives no reference and is left out.
  κ, not raw agreement, because it discounts the agreement that label
  frequencies alone produce (a labeler always answering "first" agrees often on
  a skewed set, yet has κ = 0). None below `min_shared` shared items.
  The reference is then cleaned: labelers whose κ is < `kappa_min` are left out
  of everybody else's majority vote and κ is recomputed, until that set stops
  changing (≤ `max_rounds`). Without it, one adversary among the 2 other
  labelers of an item drags every honest labeler's κ towards 0 and makes the
  honest and the careless hard to tell apart (in the planted test, 8 seeds:
  honest κ 0.23–0.57 on the raw majority, 0.40–0.63 on the cleaned one);
- `self_consistency`: share of L's repeated items on which every label was the same.

Flag rule: a labeler is flagged when any of these holds, each needing enough
evidence, and `reason` says which:

1. κ with others < `kappa_min` (0.2: "slight" agreement or worse, Landis & Koch
   1977) *while the others agree among themselves*: the median κ over all
   labelers with a κ is ≥ `consensus_min` (0.4). An adversary (flips labels)
   has κ well below 0, a careless (random) one κ ≈ 0, an honest one clearly
   > 0. If the median labeler is also near 0 the task (or the reference) is the
   problem, not one labeler, and nobody is flagged on κ. This assumes most
   labelers of an item are honest: majority vote is only a reference then.
2. agreement with the model far below the median labeler: at least
   `model_gap` (0.1) below the median and a binomial z-score < −3 against
   that median, on ≥ `min_scored` (20) labels. Relative to the median, not an
   absolute bar, because a ~0.67-accurate ensemble agrees with honest labelers
   only ~60% of the time; the z-score keeps small samples from flagging. This
   catches labelers with no shared items (a lone RLAIF judge) where κ cannot.
3. self-consistency < `consistency_min` (0.7) on ≥ `min_repeats` (5) repeated
   items: an honest labeler mostly repeats their answer, a random one agrees
   with themselves half the time.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LabelRecord:
    labeler: str
    kind: str                  # "human" | "ai"
    item: str                  # prompt + unordered response pair, in a canonical order
    outcome: float             # 1.0 first preferred, 0.0 second, 0.5 tie
    model_prob: float | None   # ensemble P(first ≻ second); None when not scored


@dataclass
class LabelerStats:
    labeler: str
    kind: str
    volume: int
    agreement_with_model: float | None
    agreement_with_others: float | None   # Cohen's κ vs the others' majority vote
    shared_items: int                      # items with a majority reference from others
    self_consistency: float | None
    repeated_items: int
    flagged: bool
    reason: str
    scored_labels: int = 0                 # non-tie labels on scored items (the model statistic's n)


def category(outcome: float) -> float:
    """1.0, 0.0 or 0.5: the side of 0.5 an outcome lies on."""
    return 1.0 if outcome > 0.5 else 0.0 if outcome < 0.5 else 0.5


def _mode(values: Sequence[float]) -> float | None:
    """The single most common value, or None when several share the top count."""
    counts = Counter(values).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]


def cohens_kappa(x: Sequence[float], y: Sequence[float]) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) of two equally long label sequences.

    p_e from each side's category frequencies. When p_e = 1 (both sides used one
    single category) κ is undefined; it is 1.0 if they agree on it, else 0.0.
    """
    if len(x) != len(y) or not len(x):
        raise ValueError("cohens_kappa needs two non-empty sequences of equal length")
    n = len(x)
    po = sum(a == b for a, b in zip(x, y, strict=True)) / n
    cx, cy = Counter(x), Counter(y)
    pe = sum(cx[c] * cy[c] for c in cx) / (n * n)
    if pe >= 1.0 - 1e-12:
        return 1.0 if po >= 1.0 - 1e-12 else 0.0
    return (po - pe) / (1.0 - pe)


def _kappas(
    item_label: dict[str, dict[str, float]], labelers: Iterable[str], exclude: set[str], min_shared: int
) -> dict[str, tuple[float | None, int]]:
    """labeler -> (κ vs the majority of the other, non-excluded labelers or None, items with a reference)."""
    out: dict[str, tuple[float | None, int]] = {}
    for name in labelers:
        mine, ref = [], []
        for labels in item_label.values():
            if name not in labels:
                continue
            votes = [v for who, v in labels.items() if who != name and who not in exclude]
            others = _mode(votes) if votes else None
            if others is not None:
                mine.append(labels[name])
                ref.append(others)
        out[name] = (cohens_kappa(mine, ref) if len(mine) >= min_shared else None, len(mine))
    return out


def labeler_report(
    records: Sequence[LabelRecord],
    *,
    min_shared: int = 5,
    kappa_min: float = 0.2,
    consensus_min: float = 0.4,
    model_gap: float = 0.1,
    model_z: float = 3.0,
    min_scored: int = 20,
    consistency_min: float = 0.7,
    min_repeats: int = 5,
    max_rounds: int = 5,
) -> list[LabelerStats]:
    """One LabelerStats per labeler (sorted by name); the flag rule is the module docstring's."""
    by_labeler: dict[str, list[LabelRecord]] = defaultdict(list)
    for r in records:
        by_labeler[r.labeler].append(r)

    # each labeler's label on each item (mode of their repeats; None = no single mode -> tie)
    item_label: dict[str, dict[str, float]] = defaultdict(dict)   # item -> labeler -> category
    repeats: dict[str, tuple[int, int]] = {}                        # labeler -> (consistent, repeated)
    for name, recs in by_labeler.items():
        per_item: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            per_item[r.item].append(category(r.outcome))
        rep = [v for v in per_item.values() if len(v) > 1]
        repeats[name] = (sum(len(set(v)) == 1 for v in rep), len(rep))
        for item, v in per_item.items():
            m = _mode(v)
            item_label[item][name] = 0.5 if m is None else m

    # κ against the others' majority; labelers below kappa_min are left out of the
    # reference and κ is recomputed, until that set is stable (see the docstring)
    suspects: set[str] = set()
    for _ in range(max_rounds):
        kappas_final = _kappas(item_label, by_labeler, suspects, min_shared)
        now = {n for n, (k, _) in kappas_final.items() if k is not None and k < kappa_min}
        if now == suspects:
            break
        suspects = now

    stats: list[LabelerStats] = []
    for name in sorted(by_labeler):
        recs = by_labeler[name]
        kind = Counter(r.kind for r in recs).most_common(1)[0][0]

        scored = [(category(r.outcome), r.model_prob) for r in recs
                  if r.model_prob is not None and category(r.outcome) != 0.5 and r.model_prob != 0.5]
        with_model = (sum((c == 1.0) == (p > 0.5) for c, p in scored) / len(scored)) if scored else None

        kappa, shared = kappas_final.get(name, (None, 0))

        consistent, repeated = repeats[name]
        stats.append(LabelerStats(
            labeler=name, kind=kind, volume=len(recs), agreement_with_model=with_model,
            agreement_with_others=kappa, shared_items=shared,
            self_consistency=consistent / repeated if repeated else None, repeated_items=repeated,
            flagged=False, reason="", scored_labels=len(scored),
        ))

    kappas = [s.agreement_with_others for s in stats if s.agreement_with_others is not None]
    consensus = float(np.median(kappas)) if kappas else None
    model_rates = [s.agreement_with_model for s in stats
                   if s.agreement_with_model is not None and s.scored_labels >= min_scored]
    median_model = float(np.median(model_rates)) if model_rates else None

    for s in stats:
        why = []
        k = s.agreement_with_others
        if k is not None and consensus is not None and consensus >= consensus_min and k < kappa_min:
            why.append(f"kappa with others {k:.2f} < {kappa_min:g} (median labeler {consensus:.2f})")
        a = s.agreement_with_model
        if a is not None and median_model is not None and s.scored_labels >= min_scored:
            sd = math.sqrt(max(median_model * (1 - median_model), 1e-12) / s.scored_labels)
            z = (a - median_model) / sd
            if a < median_model - model_gap and z < -model_z:
                why.append(f"agrees with the model {a:.2f} vs median labeler {median_model:.2f} "
                           f"(z = {z:.1f}, n = {s.scored_labels})")
        c = s.self_consistency
        if c is not None and s.repeated_items >= min_repeats and c < consistency_min:
            why.append(f"self-consistency {c:.2f} < {consistency_min:g} on {s.repeated_items} repeats")
        s.flagged = bool(why)
        s.reason = "; ".join(why)
    return stats
