"""Does an acquisition rule beat random choice of pairs to label? Simulated on HH-RLHF harmless.

From the repository root (the recorded run, bench/results/active-learning-2026-12-02.md:
10 min of simulation on 2 loaded cores, plus the features once):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/active_learning.py \\
        --seeds 30 --budget 1000 --min-distance 0.3 \\
        --out bench/results/active-learning-2026-12-02.md --plot docs/active_learning.png

    .venv/bin/python bench/active_learning.py --quick     # smoke run: 2 seeds to 200 labels, ~15 s

The frozen features are computed once through rmserve's own machinery and cached
under ~/.cache/rmserve/features (the train file is the one `rmserve train` on
train.jsonl reuses): ~30 min for the 3620 sequences on this loaded machine
(train 3020 in ~26 min, dev 600 in 258 s), seconds after.

Setup. Features: last-token embeddings of the embedded default's backbone
(SmolLM2-135M-Instruct cut after 14 layers), standardised with train statistics,
exactly what `rmserve train --kind heads` fits on. Model: K=8 bootstrap linear
Bradley-Terry heads (`fit_bt_head`, fixed L2) on pair differences; each head's
rewards are normalised to std 1 over the pool+dev responses, as serving does.
Each pool item is one HH pair shown in a random order; its hidden label is which
side was chosen. A random seed set is labelled first; every round the ensemble
scores the unlabelled pool, the rule picks a batch, the labels are revealed and
the heads are refitted. Dev (300 pairs) is only ever evaluated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
BACKBONE = "builtin:smollm2-135m-instruct"
NUM_LAYERS = 14


def load_features(train_path: Path, dev_path: Path) -> dict[str, np.ndarray]:
    """Standardised features of every response, and (chosen, rejected) index pairs of train and dev.

    Uses the trainer's path (load_pairs -> encode_pairs -> cached_features), so the
    cache file is the one `rmserve train` on the same data would write or reuse.
    """
    import torch

    from rmserve.service.engine.backbone import cache_dir, load_backbone
    from rmserve.service.engine.tokenization import PromptEncoder
    from rmserve.training.data import load_pairs
    from rmserve.training.encoding import encode_pairs
    from rmserve.training.features import cached_features

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    backbone = load_backbone(BACKBONE, num_layers=NUM_LAYERS)
    encoder = PromptEncoder(backbone.tokenizer, min(1024, backbone.max_positions))
    out: dict[str, np.ndarray] = {}
    for split, path in (("train", train_path), ("dev", dev_path)):
        pairs, report = load_pairs(path)
        enc = encode_pairs(pairs, encoder, report)
        t0 = time.monotonic()
        feats, key, hit = cached_features(
            backbone, encoder, enc.seqs, cache_dir=cache_dir() / "features",
            progress=lambda d, n, s=split: print(f"  {s} features {d}/{n}", file=sys.stderr, flush=True),
        )
        print(f"{split}: {len(enc)} pairs, {len(enc.seqs)} sequences, features "
              f"{'cached' if hit else 'computed'} in {time.monotonic() - t0:.0f}s ({key})",
              file=sys.stderr, flush=True)
        out[f"{split}_x"] = feats.double().numpy()
        out[f"{split}_pairs"] = np.stack([enc.chosen, enc.rejected], axis=1)
    out["train_raw_x"] = out["train_x"]
    mu = out["train_x"].mean(0)
    sd = out["train_x"].std(0) + 1e-6
    for split in ("train", "dev"):
        out[f"{split}_x"] = (out[f"{split}_x"] - mu) / sd
    return out


L2 = 0.3   # the embedded default's L2 (5-fold CV NLL on all of train); fixed, the same for every rule


def fit_heads(dx: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K bootstrap Bradley-Terry heads [K, H] on labelled pair differences dx [n, H] (chosen - rejected)."""
    import torch

    from rmserve.training.linear_heads import fit_bt_head

    t = torch.from_numpy(dx)
    n = len(dx)
    heads = []
    for _ in range(k):
        counts = rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64)
        heads.append(fit_bt_head(t, torch.from_numpy(counts), l2=L2).numpy())
    return np.stack(heads)


def rewards(x: np.ndarray, heads: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-head rewards [N, K], normalised to std 1 (as serving does; the bias cancels in differences)."""
    return (x @ heads.T) / scale


def simulate(
    f: dict[str, np.ndarray], rule: str, seed: int, *, n_seed: int, batch: int, budget: int, k: int,
    min_distance: float | None,
) -> dict[str, list[float]]:
    """One learning curve: dev accuracy / NLL after each round, for one rule and one seed.

    Every rule of a seed gets the same initial labelled set and the same side order,
    so rule-minus-random differences are paired by seed.
    """
    from rmserve.service.data.acquisition import score_pairs, select

    rng = np.random.default_rng(seed)
    xt, pt = f["train_x"], f["train_pairs"]
    n = len(pt)
    swap = rng.random(n) < 0.5                               # each pool item shown in random order
    a = np.where(swap, pt[:, 1], pt[:, 0])
    b = np.where(swap, pt[:, 0], pt[:, 1])
    labelled = list(rng.permutation(n)[:n_seed])
    head_rng = np.random.default_rng([seed, 1])   # same for every rule: identical seed-round heads
    dev_c, dev_r = f["dev_x"][f["dev_pairs"][:, 0]], f["dev_x"][f["dev_pairs"][:, 1]]
    all_x = np.concatenate([xt, f["dev_x"]])
    pair_emb = xt[a] + xt[b]                                 # order-free pair embedding for diversity
    curve: dict[str, list[float]] = {"labels": [], "dev_accuracy": [], "dev_nll": []}
    while True:
        lab = np.array(labelled)
        heads = fit_heads(xt[pt[lab, 0]] - xt[pt[lab, 1]], k, head_rng)
        scale = (all_x @ heads.T).std(0) + 1e-12
        d = (rewards(dev_c, heads, scale) - rewards(dev_r, heads, scale)).mean(1)
        curve["labels"].append(len(lab))
        curve["dev_accuracy"].append(float((d > 0).mean()))
        curve["dev_nll"].append(float(np.logaddexp(0.0, -d).mean()))
        if len(lab) >= budget:
            return curve
        pool = np.setdiff1d(np.arange(n), lab)
        m = min(batch, budget - len(lab), len(pool))
        if rule == "random":
            pick = list(rng.choice(pool, size=m, replace=False))
        else:
            ra, rb = rewards(xt[a[pool]], heads, scale), rewards(xt[b[pool]], heads, scale)
            base = rule.split("+")[0]
            s = score_pairs(ra, rb, rule=base).score
            emb = pair_emb[pool] if rule.endswith("+diverse") else None
            pick = [int(pool[i]) for i in select(s, m, embeddings=emb, min_distance=min_distance)]
        labelled.extend(int(i) for i in pick)   # labels revealed: the pair's chosen side is known


def nn_cosine_distance(e: np.ndarray) -> np.ndarray:
    """Each row's cosine distance to its nearest other row."""
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return 1.0 - sim.max(1)


def summarise(curves: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    out = {}
    rnd = np.array([c["dev_accuracy"] for c in curves["random"]])
    for rule, cs in curves.items():
        acc = np.array([c["dev_accuracy"] for c in cs])
        nll = np.array([c["dev_nll"] for c in cs])
        diff = acc - rnd
        out[rule] = {
            "labels": cs[0]["labels"],
            "acc_mean": acc.mean(0).tolist(), "acc_std": acc.std(0, ddof=1).tolist(),
            "nll_mean": nll.mean(0).tolist(),
            "diff_mean": diff.mean(0).tolist(), "diff_std": diff.std(0, ddof=1).tolist(),
            # area under the curve after the seed round: mean accuracy over rounds 1..end, minus random
            "auc_diff": [float(x) for x in diff[:, 1:].mean(1)],
        }
    return out


def auc_stats(d: list[float]) -> dict[str, float]:
    a = np.asarray(d)
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    se = sd / np.sqrt(len(a))
    return {"mean": float(a.mean()), "std": sd, "se": se, "t": float(a.mean() / se) if se > 0 else 0.0,
            "wins": int((a > 0).sum())}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(summary: dict, rules: list[str]) -> str:
    head = "| labels | " + " | ".join(rules[:1] + [f"{r} (Δ vs random)" for r in rules[1:]]) + " |"
    rows = [head, "|" + " --- |" * (len(rules) + 1)]
    labels = summary[rules[0]]["labels"]
    for j, n in enumerate(labels):
        cells = []
        for r in rules:
            s = summary[r]
            cell = f"{s['acc_mean'][j]:.3f} ± {s['acc_std'][j]:.3f}"
            if r != "random":
                cell += f" ({s['diff_mean'][j]:+.3f} ± {s['diff_std'][j]:.3f})"
            cells.append(cell)
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_title(m: dict) -> str:
    return (f"HH-RLHF harmless, frozen SmolLM2-135M[:14] features, K={m['k']} bootstrap BT heads; "
            f"{m['seeds']} seeds, seed set {m['seed_labels']}, batch {m['batch']}")


def plot(summary: dict, rules: list[str], full: tuple[float, float], path: Path, title: str,
         min_distance: float | None = None) -> None:
    import matplotlib

    from rmserve.service.data.acquisition import DEFAULT_RULE

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = dict(zip(rules, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in rules:
        s = summary[r]
        x, m, sd = np.array(s["labels"]), np.array(s["acc_mean"]), np.array(s["acc_std"])
        name = f"{r} (min dist {min_distance:g})" if r.endswith("+diverse") and min_distance else r
        ax.plot(x, m, marker="o", ms=3, label=name, color=colors[r])
        if r in ("random", DEFAULT_RULE):   # two bands only: the plot stays readable
            ax.fill_between(x, m - sd, m + sd, alpha=0.12, color=colors[r])
        if r != "random":
            dm = np.array(s["diff_mean"])
            se = np.array(s["diff_std"]) / np.sqrt(len(s["auc_diff"]))
            ax2.plot(x, dm, marker="o", ms=3, label=name, color=colors[r])
            ax2.fill_between(x, dm - se, dm + se, alpha=0.12, color=colors[r])
    ax.axhline(full[0], color="gray", ls="--", lw=1, label=f"all {full[1]:.0f} train labels")
    ax.set_xlabel("labels spent")
    ax.set_ylabel(f"dev accuracy (mean; band ± std: random, {DEFAULT_RULE})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.axhline(0, color="gray", lw=1)
    ax2.set_xlabel("labels spent")
    ax2.set_ylabel("dev accuracy − random (paired; mean ± SE)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seed-labels", type=int, default=50, help="random labelled pairs to start from")
    ap.add_argument("--batch", type=int, default=50, help="pairs labelled per round")
    ap.add_argument("--budget", type=int, default=1000, help="stop at this many labels")
    ap.add_argument("-k", type=int, default=8, help="bootstrap heads")
    ap.add_argument("--rules", default="random,uncertainty,disagreement,combined,uncertainty+diverse")
    ap.add_argument("--min-distance", type=float, default=None,
                    help="cosine distance for the +diverse rule (default: acquisition.DEFAULT_MIN_DISTANCE)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, budget 200")
    ap.add_argument("--features-only", action="store_true", help="compute/cache the features and exit")
    ap.add_argument("--out", type=Path, help="markdown report (raw JSON beside it, .json)")
    ap.add_argument("--plot", type=Path, help="PNG of the learning curves")
    ap.add_argument("--replot", type=Path, help="redraw --plot from a raw JSON of an earlier run, and exit")
    args = ap.parse_args(argv)
    if args.replot:
        raw = json.loads(args.replot.read_text())
        m = raw["meta"]
        plot(raw["summary"], list(raw["summary"]), (m["full_train_dev_accuracy"]["mean"], m["train_pairs"]),
             args.plot or args.replot.with_suffix(".png"), plot_title(m), m["min_distance"])
        return 0
    if args.quick:
        args.seeds, args.budget = 2, 200
    rules = args.rules.split(",")
    if rules[0] != "random":
        rules = ["random", *[r for r in rules if r != "random"]]
    import torch

    torch.set_num_threads(1)   # the fits are small; 1 thread avoids oversubscribing a shared machine
    t0 = time.monotonic()
    f = load_features(DATA / "train.jsonl", DATA / "dev.jsonl")
    t_feat = time.monotonic() - t0
    if args.features_only:
        print({k: v.shape for k, v in f.items()})
        return 0

    from rmserve.service.data.acquisition import DEFAULT_MIN_DISTANCE

    xt, pt = f["train_x"], f["train_pairs"]
    nn_std = nn_cosine_distance(xt[pt[:, 0]] + xt[pt[:, 1]])
    raw = f["train_raw_x"][pt[:, 0]] + f["train_raw_x"][pt[:, 1]]
    nn_raw = nn_cosine_distance(raw)
    nn_centred = nn_cosine_distance(raw - raw.mean(0))
    t1 = time.monotonic()
    curves: dict[str, list[dict]] = {r: [] for r in rules}
    for seed in range(args.seeds):
        for r in rules:
            curves[r].append(simulate(f, r, seed, n_seed=args.seed_labels, batch=args.batch,
                                      budget=args.budget, k=args.k, min_distance=args.min_distance))
        print(f"seed {seed}: " + ", ".join(f"{r} {curves[r][-1]['dev_accuracy'][-1]:.3f}" for r in rules)
              + f"  ({time.monotonic() - t1:.0f}s)", file=sys.stderr, flush=True)
    # reference: every train label, same heads
    full = []
    for seed in range(args.seeds):
        heads = fit_heads(xt[pt[:, 0]] - xt[pt[:, 1]], args.k, np.random.default_rng([seed, 99]))
        dc, dr = f["dev_x"][f["dev_pairs"][:, 0]], f["dev_x"][f["dev_pairs"][:, 1]]
        full.append(float((((dc - dr) @ heads.T).mean(1) > 0).mean()))
    t_sim = time.monotonic() - t1
    summary = summarise(curves)
    cmd = "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/active_learning.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {
        "date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "command": cmd, "features_s": round(t_feat, 1), "simulation_s": round(t_sim, 1),
        "train_pairs": len(pt), "dev_pairs": len(f["dev_pairs"]), "seeds": args.seeds,
        "seed_labels": args.seed_labels, "batch": args.batch, "budget": args.budget, "k": args.k,
        "l2": L2, "backbone": BACKBONE, "num_layers": NUM_LAYERS,
        "min_distance": args.min_distance if args.min_distance is not None else DEFAULT_MIN_DISTANCE,
        "full_train_dev_accuracy": {"mean": float(np.mean(full)), "std": float(np.std(full, ddof=1))
                                    if len(full) > 1 else 0.0},
        "nn_cosine_distance_pairs": {
            "standardised": {q: float(np.quantile(nn_std, p)) for q, p in
                             (("p1", .01), ("p5", .05), ("p50", .5))},
            "raw": {q: float(np.quantile(nn_raw, p)) for q, p in (("p1", .01), ("p5", .05), ("p50", .5))},
            "raw_centred": {q: float(np.quantile(nn_centred, p)) for q, p in
                            (("p1", .01), ("p5", .05), ("p50", .5))},
        },
    }
    print(table(summary, rules))
    print(json.dumps(meta, indent=1))
    if args.plot:
        plot(summary, rules, (meta["full_train_dev_accuracy"]["mean"], len(pt)), args.plot,
             plot_title(meta), meta["min_distance"])
    if args.out:
        raw = {"meta": meta, "summary": summary, "curves": curves}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        auc = {r: auc_stats(summary[r]["auc_diff"]) for r in rules if r != "random"}
        target = summary["random"]["acc_mean"][-1]
        reach = {r: next((n for n, m in zip(summary[r]["labels"], summary[r]["acc_mean"], strict=True)
                          if m >= target), None) for r in rules}
        args.out.write_text(
            f"# Active learning on HH-RLHF harmless: acquisition rules vs random ({meta['date']})\n\n"
            f"- command: `{cmd}`\n- CPU: {meta['cpu']} ({meta['cores']} cores visible, shared, loaded)\n"
            f"- wall time: features {meta['features_s']} s, simulation {meta['simulation_s']} s\n"
            f"- setup: {len(pt)} train pairs as the pool (labels hidden), {meta['dev_pairs']} dev pairs "
            f"(evaluation only); seed set {args.seed_labels} random pairs, batch {args.batch}, up to "
            f"{args.budget} labels; K={args.k} bootstrap linear BT heads (L2 {L2}) on frozen "
            f"{BACKBONE} features (first {NUM_LAYERS} layers); {args.seeds} seeds, every rule paired "
            f"with random on the same seed set and side order\n"
            f"- all {len(pt)} train labels: dev accuracy {meta['full_train_dev_accuracy']['mean']:.3f} "
            f"± {meta['full_train_dev_accuracy']['std']:.3f}\n\n"
            f"Dev accuracy, mean ± std over seeds (Δ: rule − random, paired by seed):\n\n"
            f"{table(summary, rules)}\n\n"
            f"Mean Δ over all acquisition rounds (area between the curves / rounds): mean ± std over "
            f"seeds, standard error, share of seeds where the rule beats random:\n\n"
            + "\n".join(f"- {r}: {a['mean']:+.4f} ± {a['std']:.4f} (SE {a['se']:.4f}, t = {a['t']:.1f}; "
                        f"better on {a['wins']}/{args.seeds} seeds)" for r, a in auc.items())
            + f"\n\nFirst budget at which the mean curve reaches random's accuracy at {args.budget} "
            f"labels ({target:.3f}): " + ", ".join(f"{r} {n}" for r, n in reach.items())
            + f"\n\nNearest-neighbour cosine distance between pool pairs (x_a + x_b): standardised "
            f"{meta['nn_cosine_distance_pairs']['standardised']}, raw "
            f"{meta['nn_cosine_distance_pairs']['raw']}, raw centred "
            f"{meta['nn_cosine_distance_pairs']['raw_centred']}\n\nRaw curves: `{args.out.with_suffix('.json').name}`.\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
