"""Cross-validation on train of the default's recipe: augmentation kinds, shares and weights x length
debiasing x L2, exact (L-BFGS) heads on cached layer features. Dev is never read except for its
prompts, which augmentation must not touch (as the trainer does).

    python bench/study/robust_cv.py \
        --data ../shared/data/alpaca-eval-helpful/train.jsonl ../shared/data/hh-rlhf-harmless/train.jsonl \
        --dev ../shared/data/alpaca-eval-helpful/dev.jsonl ../shared/data/hh-rlhf-harmless/dev.jsonl \
        --augment off_topic:0.25,echo:0.25,padded:0.25,flattery:0.25,filler:0.25,scaffold:0.25 \
        --recipes recipes.json --out bench/results/robust-cv.json

`--recipes`: a JSON list of {kinds, share, aug_w, debias, l2}; debias one of none, balance,
decorrelate, balance+decorrelate, odin (ODIN's length head: trained beside the quality head, not
served). Folds are by prompt (every pair of a prompt, augmented ones included, in one fold); one head
per fold on all its pairs; the temperature is fitted on the out-of-fold margins of the real pairs.
Reported per data set: accuracy, ECE after that temperature, accuracy where the chosen answer is the
shorter / the longer, their mean (length-balanced), and the correlation of out-of-fold reward with
response length; per augmentation kind and data set, P(the non-answer wins) out of fold, for every
kind built, whether or not the recipe trained on it (a kind it did not train on stands in for a
generator it never saw). Features come from the trainer's per-sequence cache (training/features.py)
and are computed where missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from rmserve.service.data.train_config import parse_augment
from rmserve.service.engine.backbone import cache_dir, load_backbone
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training.augment import augment_pairs, is_augmented, prompt_key
from rmserve.training.data import DataReport, dataset_names, load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.features import cached_features
from rmserve.training.length import (
    balanced_weights,
    length_direction,
    project_out,
    uses_balance,
    uses_decorrelate,
)
from rmserve.training.linear_heads import fit_bt_head
from rmserve.training.metrics import ece

FOLDS = 5


class Study:
    def __init__(self, data: list[str], dev: list[str], augment: str, backbone: str, num_layers: int, seed: int):
        real = []
        for path, name in zip(data, dataset_names(data), strict=True):
            got, _ = load_pairs(path)
            for p in got:
                p.origin = name
            real += got
        held = {prompt_key(p.prompt) for f in dev for p in load_pairs(f)[0]}
        aug, self.augment_report = augment_pairs(real, parse_augment(augment), seed=seed, exclude=held)
        pairs = real + aug
        bb = load_backbone(backbone, num_layers=num_layers)
        enc = PromptEncoder(bb.tokenizer, 1024)
        self.enc = encode_pairs(pairs, enc, DataReport())
        t0 = time.time()
        x, _, _ = cached_features(bb, enc, self.enc.seqs, cache_dir=cache_dir() / "features",
                                  progress=lambda d, n: print(f"features {d}/{n} {time.time() - t0:.0f}s",
                                                              file=sys.stderr, flush=True))
        e = self.enc
        self.origin = np.array(e.origin)
        self.is_aug = np.array([is_augmented(o) for o in self.origin])
        # an augmented pair keeps the source row of its prompt's first pair: its data set and prompt
        row = {p.source: (p.origin, prompt_key(p.prompt)) for p in reversed(real)}
        self.dataset = np.array([row[s][0] for s in e.source])
        self.draw = np.array([random.Random(f"{seed}:{o.removeprefix('augment:')}:{row[s][1]}").random()
                              if is_augmented(o) else 0.0 for s, o in zip(e.source, self.origin, strict=True)])
        self.rlen = e.response_tokens.astype(np.float64)
        self.dlen = self.rlen[e.chosen] - self.rlen[e.rejected]
        self.real_seqs = np.unique(np.concatenate([e.chosen[~self.is_aug], e.rejected[~self.is_aug]]))
        mu, sd = x[self.real_seqs].mean(0), x[self.real_seqs].std(0)
        self.x = ((x - mu) / sd).double()
        self.u = length_direction(self.x[self.real_seqs], torch.as_tensor(self.rlen[self.real_seqs]))
        v = torch.log1p(torch.as_tensor(self.rlen))
        self.loglen = (v - v[self.real_seqs].mean()) / v[self.real_seqs].std()  # ODIN's length feature
        groups = [row[s][1] for s in e.source]
        keys = sorted(set(groups))
        order = np.random.default_rng(seed).permutation(len(keys))
        fold_of = {keys[j]: i % FOLDS for i, j in enumerate(order)}
        self.fold = np.array([fold_of[g] for g in groups])

    def run(self, kinds: list[str], aug_w: float, debias: str, l2: float, share: float = 1.0,
            aug_datasets: list[str] | None = None, dataset_w: dict[str, float] | None = None) -> dict:
        e, is_aug, origin = self.enc, self.is_aug, self.origin
        use = ~is_aug | (np.isin(origin, [f"augment:{k}" for k in kinds]) & (self.draw < share))
        if aug_datasets is not None:  # augment only these data sets' prompts
            use &= ~is_aug | np.isin(self.dataset, aug_datasets)
        w = np.where(is_aug, aug_w, 1.0)
        for ds, mult in (dataset_w or {}).items():  # every pair of a data set's prompts, real or augmented
            w[self.dataset == ds] *= mult
        if uses_balance(debias):
            w = balanced_weights(w, self.dlen, origin, ~is_aug)
        z = project_out(self.x, self.u) if uses_decorrelate(debias) else self.x
        c, r = torch.as_tensor(e.chosen), torch.as_tensor(e.rejected)
        dx = z[c] - z[r]
        dxf = torch.cat([dx, (self.loglen[c] - self.loglen[r])[:, None]], 1) if debias == "odin" else dx
        margins = np.zeros(len(e))
        rew = np.zeros((len(e), 2))
        wt = torch.as_tensor(w)
        for k in range(FOLDS):
            tr = torch.as_tensor(np.flatnonzero(use & (self.fold != k)))
            te = np.flatnonzero(self.fold == k)
            wq = fit_bt_head(dxf[tr], wt[tr], l2=l2)[: dx.shape[1]]  # odin: only the quality part scores
            margins[te] = (dx[torch.as_tensor(te)] @ wq).numpy()
            rr = (z @ wq).numpy()
            rew[te, 0], rew[te, 1] = rr[e.chosen[te]], rr[e.rejected[te]]
        real_m = margins[~is_aug]
        grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))
        nll = [float(np.mean(np.logaddexp(0, -real_m / t))) for t in grid]
        t = float(grid[int(np.argmin(nll))])
        out = {"kinds": kinds, "share": share, "aug_w": aug_w, "debias": debias, "l2": l2,
               "aug_datasets": aug_datasets, "dataset_w": dataset_w,
               "temperature": round(t, 3), "cv_nll": round(min(nll), 4)}
        for o in np.unique(origin[~is_aug]):
            m = origin == o
            d = margins[m] / t
            res = {"accuracy": float((d > 0).mean()), "ece": ece(d),
                   "chosen_shorter": float((d[self.dlen[m] < 0] > 0).mean()),
                   "chosen_longer": float((d[self.dlen[m] > 0] > 0).mean())}
            res["length_balanced"] = (res["chosen_shorter"] + res["chosen_longer"]) / 2
            rs = np.concatenate([rew[m, 0], rew[m, 1]])
            ls = np.concatenate([self.rlen[e.chosen[m]], self.rlen[e.rejected[m]]])
            res["corr_reward_length"] = float(np.corrcoef(rs, ls)[0, 1])
            out[str(o)] = {k: round(v, 4) for k, v in res.items()}
        hacks = {}
        for o in np.unique(origin[is_aug]):
            for ds in np.unique(self.dataset):
                m = (origin == o) & (self.dataset == ds)
                if m.any():
                    hacks.setdefault(o.removeprefix("augment:"), {})[str(ds)] = round(float((margins[m] <= 0).mean()), 4)
        out["p_hack_wins"] = hacks
        return out


def table(results: list[dict], datasets: list[str], kinds: list[str]) -> str:
    short = {d: d.split("-")[0] for d in datasets}
    head = ["kinds", "share", "w", "debias", "l2", "T"]
    for d in datasets:
        head += [f"{short[d]} acc", f"{short[d]} shorter", f"{short[d]} longer", f"{short[d]} bal", f"{short[d]} ECE"]
    head += [f"{k} win {short[d]}" for k in kinds for d in datasets]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        kinds_txt = ",".join(r["kinds"]) or "—"
        if r.get("aug_datasets"):
            kinds_txt += " on " + "+".join(d.split("-")[0] for d in r["aug_datasets"])
        if r.get("dataset_w"):
            kinds_txt += "; weights " + ",".join(f"{d.split('-')[0]}×{m:g}" for d, m in r["dataset_w"].items())
        row = [kinds_txt, f"{r['share']:g}", f"{r['aug_w']:g}", r["debias"], f"{r['l2']:g}",
               f"{r['temperature']:.2f}"]
        for d in datasets:
            m = r[d]
            row += [f"{m['accuracy']:.3f}", f"{m['chosen_shorter']:.3f}", f"{m['chosen_longer']:.3f}",
                    f"{m['length_balanced']:.3f}", f"{m['ece']:.3f}"]
        row += [f"{r['p_hack_wins'].get(k, {}).get(d, float('nan')):.2f}" for k in kinds for d in datasets]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--dev", nargs="*", default=[], help="only their prompts are read: never augmented")
    ap.add_argument("--augment", required=True, help="the kinds and the largest shares to build")
    ap.add_argument("--recipes", required=True, type=Path)
    ap.add_argument("--backbone", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--num-layers", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    study = Study(args.data, args.dev, args.augment, args.backbone, args.num_layers, args.seed)
    results = []
    for recipe in json.loads(args.recipes.read_text()):
        t0 = time.time()
        results.append(study.run(**recipe))
        print(json.dumps(results[-1]), f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    datasets = [str(o) for o in np.unique(study.origin[~study.is_aug])]
    kinds = sorted({o.removeprefix("augment:") for o in study.origin[study.is_aug]})
    md = table(results, datasets, kinds)
    header = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "augment": study.augment_report}
    args.out.write_text(json.dumps({**header, "results": results}, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
