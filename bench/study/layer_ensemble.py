"""Study: does an ensemble of heads on DIFFERENT layers beat bootstrap heads on one layer?

On layer_features.py's output, 5-fold CV on TRAIN only (folds by pair): for each
recipe, out-of-fold ensemble accuracy, NLL after a temperature fitted on the
out-of-fold margins, ECE, and AUROC of the heads' disagreement (std of the pair
margin over heads) at telling misranked pairs from correct ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from safetensors.torch import load_file

from rmserve.training.linear_heads import fit_bt_head
from rmserve.training.metrics import pair_report
from rmserve.training.schedule import bootstrap_counts
from rmserve.training.stats import fit_temperature


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/study")
    ap.add_argument("--l2", type=float, default=0.3)
    a = ap.parse_args()
    tr = load_file(f"{a.dir}/train.safetensors")
    n = len(tr["chosen"])
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(0)).chunk(5)
    recipes = {
        "bootstrap x8 @14": [(14, b) for b in range(8)],
        "full @14": [(14, None)],
        "layers 8..30 step 3 (full data)": [(layer, None) for layer in range(9, 31, 3)],
        "layers 12..30 step 2 (full data)": [(layer, None) for layer in range(12, 31, 2)],
        "layers 10..24 step 2 (full data)": [(layer, None) for layer in range(10, 25, 2)],
        "layers 9..30 step 3, bootstrap": [(layer, i) for i, layer in enumerate(range(9, 31, 3))],
    }
    diffs = {}
    for recipe, heads in recipes.items():
        margins = np.zeros((n, len(heads)))
        for k in range(5):
            test = folds[k]
            train = torch.cat([folds[j] for j in range(5) if j != k])
            for h, (layer, boot) in enumerate(heads):
                if layer not in diffs:
                    f = tr["features"][layer].double()
                    x = (f - f.mean(0)) / f.std(0).clamp_min(1e-6)
                    diffs[layer] = x[tr["chosen"]] - x[tr["rejected"]]
                dx = diffs[layer]
                w = torch.ones(len(train), dtype=torch.float64)
                if boot is not None:
                    w = bootstrap_counts(8, len(train), 100 + k, True)[boot % 8].double()
                wt = fit_bt_head(dx[train], w, l2=a.l2)
                d = dx[test] @ wt
                margins[test.numpy(), h] = d.numpy()
        # per-head normalisation is a rescale: put every head on unit margin std, as serving does
        margins = margins / margins.std(0, keepdims=True)
        t = fit_temperature(margins.mean(1), np.ones(n))
        # pair_report wants chosen/rejected values per head: use margins as chosen, zeros as rejected
        rep = pair_report(margins / t, np.zeros_like(margins), np.ones(n),
                          head_names=[str(h) for h in heads])
        print(f"{recipe:36s} acc {rep['accuracy']:.3f}  nll {rep['nll']:.4f}  ece {rep['ece']:.3f}  "
              f"auroc_std {rep['auroc_std'] or float('nan'):.3f}  auroc_margin {rep['auroc_margin']:.3f}  T {t:.2f}", flush=True)


if __name__ == "__main__":
    main()
