"""Study: which layer's last-token features make the best Bradley-Terry linear head?

Reads layer_features.py's output. For every layer: the trainer's own exact head
fit (training/linear_heads.py) with its L2 chosen by 5-fold CV on TRAIN; prints
CV accuracy and NLL. Dev is scored once, for the layer chosen on train only.
"""

from __future__ import annotations

import argparse

from safetensors.torch import load_file

from rmserve.training.linear_heads import choose_l2, fit_bt_head


def whitened_diffs(d, layer, mu, sd):
    x = (d["features"][layer].double() - mu) / sd
    return x[d["chosen"]] - x[d["rejected"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/study")
    ap.add_argument("--layers", type=int, nargs="*")
    ap.add_argument("--dev", action="store_true", help="score dev once for the layer chosen on train")
    a = ap.parse_args()
    tr, dev = load_file(f"{a.dir}/train.safetensors"), load_file(f"{a.dir}/dev.safetensors")
    best = None
    for layer in a.layers or range(tr["features"].shape[0]):
        f = tr["features"][layer].double()
        mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
        c = choose_l2(whitened_diffs(tr, layer, mu, sd), tr["weight"])
        print(f"layer {layer:2d}: l2 {c.l2:g}  CV acc {c.cv_accuracy[c.l2]:.3f}  CV nll {c.cv_nll[c.l2]:.4f}  "
              f"(best acc over grid {max(c.cv_accuracy.values()):.3f})", flush=True)
        if best is None or c.cv_nll[c.l2] < best[0].cv_nll[best[0].l2]:
            best = (c, layer, mu, sd)
    c, layer, mu, sd = best
    print(f"chosen on train (CV NLL): layer {layer}, l2 {c.l2:g}, CV acc {c.cv_accuracy[c.l2]:.3f}")
    if not a.dev:
        return
    w = fit_bt_head(whitened_diffs(tr, layer, mu, sd), tr["weight"], l2=c.l2)
    dev_acc = float((whitened_diffs(dev, layer, mu, sd) @ w > 0).double().mean())
    print(f"dev acc {dev_acc:.3f}")


if __name__ == "__main__":
    main()
