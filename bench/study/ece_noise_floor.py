"""Study: what ECE does a PERFECTLY calibrated model get on a few hundred pairs?

Takes a model's own dev margins d, draws each pair's outcome from σ(d) (so the
model is calibrated by construction) and computes the 20-bin ECE exactly as
training/metrics.py does, 2000 times. The spread is the metric's noise floor at
that sample size: an observed ECE inside it says nothing about miscalibration.
The README's ECE row cites it (bench/results/default-model-study-2026-12-02.md, §4):

    python bench/study/ece_noise_floor.py service/default_model --data dev.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np

from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.metrics import pair_report


def pair_ece(d: np.ndarray) -> float:
    """ECE of chosen-minus-rejected margins d, as `rmserve eval` reports it (one head, unit weights)."""
    n = len(d)
    return float(pair_report(d[:, None], np.zeros((n, 1)), np.ones(n))["ece"])


def noise_floor(d: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    """ECEs of `draws` label sets drawn from σ(d): what a calibrated model with these margins scores."""
    p = 1 / (1 + np.exp(-d))
    rng = np.random.default_rng(seed)
    return np.array([pair_ece(np.where(rng.random(len(d)) < p, d, -d)) for _ in range(draws)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--draws", type=int, default=2000)
    a = ap.parse_args(argv)
    rm = load_model(a.model)
    pairs, rep = load_pairs(a.data)
    enc = encode_pairs(pairs, rm.encoder, rep)
    out = ScoringEngine(rm).score(enc.seqs)
    d = out.mean[enc.chosen] - out.mean[enc.rejected]
    p = 1 / (1 + np.exp(-d))
    eces = noise_floor(d, a.draws)
    observed = pair_ece(d)
    print(f"{len(d)} pairs; observed ECE {observed:.4f}; a calibrated model's ECE: mean {eces.mean():.4f}, "
          f"median {np.median(eces):.4f}, 90th pct {np.percentile(eces, 90):.4f}, "
          f"P(ECE >= observed) {np.mean(eces >= observed):.3f}, P(ECE <= 0.05) {np.mean(eces <= 0.05):.3f}")
    print(f"mean confidence {np.maximum(p, 1 - p).mean():.4f}, accuracy {(d > 0).mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
