"""Study: what ECE does a PERFECTLY calibrated model get on a few hundred pairs?

Takes a model's own dev margins d, draws each pair's outcome from σ(d) (so the
model is calibrated by construction) and computes the 20-bin ECE exactly as
training/metrics.py does, 2000 times. The spread is the metric's noise floor at
that sample size: an observed ECE inside it says nothing about miscalibration.
"""

from __future__ import annotations

import argparse

import numpy as np

from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.metrics import pair_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--draws", type=int, default=2000)
    a = ap.parse_args()
    rm = load_model(a.model)
    pairs, rep = load_pairs(a.data)
    enc = encode_pairs(pairs, rm.encoder, rep)
    out = ScoringEngine(rm).score(enc.seqs)
    d = out.mean[enc.chosen] - out.mean[enc.rejected]
    p = 1 / (1 + np.exp(-d))
    rng = np.random.default_rng(0)
    n = len(d)
    eces = np.array([
        pair_report(np.where(rng.random(n) < p, d, -d)[:, None], np.zeros((n, 1)), np.ones(n))["ece"]
        for _ in range(a.draws)
    ])
    observed = pair_report(d[:, None], np.zeros((n, 1)), np.ones(n))["ece"]
    print(f"{n} pairs; observed ECE {observed:.4f}; a calibrated model's ECE: mean {eces.mean():.4f}, "
          f"median {np.median(eces):.4f}, 90th pct {np.percentile(eces, 90):.4f}, "
          f"P(ECE >= observed) {np.mean(eces >= observed):.3f}, P(ECE <= 0.05) {np.mean(eces <= 0.05):.3f}")
    print(f"mean confidence {np.maximum(p, 1 - p).mean():.4f}, accuracy {(d > 0).mean():.4f}")


if __name__ == "__main__":
    main()
