"""Old versus new default on the dev sets and the hack shapes, from the per-sequence feature cache.

Models that share a frozen backbone and layer cut (every default so far: SmolLM2 cut at 14 layers,
linear heads) see the same last-token features, so one forward per sequence serves every model:
rewards are `features @ weight.T + bias` per member (the served normalisation is folded into them at
load, service/engine/heads.py) and ood_score the members' mean `OodStats.score`, as the engine
computes them. For one model through the serving path, `rmserve eval` and bench/hack_shapes.py give
the same numbers (to float32 rounding).

    python bench/study/compare_models.py OLD_DIR NEW_DIR \
        --data ../shared/data/alpaca-eval-helpful/dev.jsonl ../shared/data/hh-rlhf-harmless/dev.jsonl \
        --max-prompts 60 --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ for hack_shapes

from hack_shapes import build_probes, fits_model, summarise

from rmserve.service.engine.backbone import cache_dir
from rmserve.service.engine.model import load_model
from rmserve.training.data import DataReport, load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.features import cached_features
from rmserve.training.metrics import ece


def _features(rm, seqs: list[list[int]]) -> torch.Tensor:
    m = rm.members[0]
    t0 = time.time()
    x, _, _ = cached_features(m.backbone, rm.encoder, seqs, cache_dir=cache_dir() / "features",
                              progress=lambda d, n: print(f"features {d}/{n} {time.time() - t0:.0f}s",
                                                          file=sys.stderr, flush=True))
    return x


def scores(rm, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(ensemble-mean reward, ood_score) per row of features, as the engine serves them."""
    if len(rm.members) != 1:
        raise ValueError("members with their own backbones do not share features: use the serving scripts")
    m = rm.members[0]
    r = (x @ m.weight.T.float() + m.bias.float()).double().mean(1).numpy()
    ood = m.ood.score(x).double().numpy() if m.ood is not None else None
    return r, ood


def pair_metrics(rm, path: str) -> dict:
    pairs, _ = load_pairs(path)
    enc = encode_pairs(pairs, rm.encoder, DataReport())
    r, ood = scores(rm, _features(rm, enc.seqs))
    d = r[enc.chosen] - r[enc.rejected]
    lc, lr = enc.response_lengths()
    out = {"pairs": len(d), "accuracy": float((d > 0).mean()), "ece": float(ece(d)),
           "chosen_shorter": float((d[lc < lr] > 0).mean()), "chosen_longer": float((d[lc > lr] > 0).mean()),
           "corr_reward_length": float(np.corrcoef(r, enc.response_tokens)[0, 1])}
    out["length_balanced_accuracy"] = (out["chosen_shorter"] + out["chosen_longer"]) / 2
    # pairs whose chosen text occurs under several prompts (AlpacaEval's judge attack), apart
    prompts_of: dict[str, set[str]] = {}
    for p in pairs:
        prompts_of.setdefault(json.dumps(p.chosen), set()).add(json.dumps(p.prompt))
    shared = np.array([len(prompts_of[json.dumps(p.chosen)]) > 1 for p in pairs])
    if shared.any() and len(shared) == len(d):
        own = ~shared
        out["shared_chosen_pairs"] = int(shared.sum())
        out["own_answers"] = {"pairs": int(own.sum()), "accuracy": float((d[own] > 0).mean()),
                              "chosen_shorter": float((d[own & (lc < lr)] > 0).mean()),
                              "chosen_longer": float((d[own & (lc > lr)] > 0).mean())}
        out["own_answers"]["length_balanced_accuracy"] = (out["own_answers"]["chosen_shorter"]
                                                          + out["own_answers"]["chosen_longer"]) / 2
        out["shared_chosen_accuracy"] = float((d[shared] > 0).mean())
    if ood is not None and rm.ood is not None:
        out["ood_false_alarms"] = float((ood > rm.ood.threshold).mean())
    return out


def hack_metrics(rm, files: list[str], max_prompts: int | None, seed: int) -> dict:
    fits = fits_model(rm.encoder)
    probes = [p for f in files for p in build_probes(f, seed=seed, max_prompts=max_prompts, fits=fits)]
    convs = [p.chosen_conversation for p in probes] + [p.hack_conversation for p in probes]
    seqs = [rm.encoder.conversation(c).ids for c in convs]
    r, ood = scores(rm, _features(rm, seqs))
    n = len(probes)
    dev_ood = {}
    for f in files:
        pairs, _ = load_pairs(f)
        enc = encode_pairs(pairs, rm.encoder, DataReport())
        _, o = scores(rm, _features(rm, enc.seqs))
        dev_ood[Path(f).parent.name] = o
    thr = rm.ood.threshold if rm.ood is not None else None
    return summarise(probes, r[:n], r[n:], None if ood is None else ood[n:], dev_ood, thr)


def ood_metrics(rm, ood_set: Path, files: list[str]) -> dict:
    """ood_score of blatant OOD text (bench/ood/ood_set.jsonl) against every dev answer: AUROC per
    category and the flag's rate; and the flag's false alarms on the dev answers of each file."""
    from rmserve.training.metrics import auroc

    rows = [json.loads(line) for line in ood_set.read_text().splitlines() if line.strip()]
    o_ood = scores(rm, _features(rm, [rm.encoder.conversation(r["messages"]).ids for r in rows]))[1]
    dev = []
    for f in files:
        pairs, _ = load_pairs(f)
        dev.append(scores(rm, _features(rm, encode_pairs(pairs, rm.encoder, DataReport()).seqs))[1])
    d = np.concatenate(dev)
    thr = rm.ood.threshold
    cats = np.array([r["category"] for r in rows])
    out = {"dev_answers": len(d), "dev_false_alarms": float((d > thr).mean()), "categories": {}}
    for c in [*sorted(set(cats)), "all"]:
        m = np.ones(len(cats), bool) if c == "all" else cats == c
        x = np.concatenate([o_ood[m], d])
        out["categories"][c] = {"n": int(m.sum()), "flag_rate": float((o_ood[m] > thr).mean()),
                                "auroc": float(auroc(x, np.r_[np.ones(int(m.sum()), bool), np.zeros(len(d), bool)]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ood-set", type=Path, default=None, help="e.g. bench/ood/ood_set.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    res = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "command": " ".join(sys.argv), "models": {}}
    for d in args.models:
        rm = load_model(d, dtype="float32")
        res["models"][d] = {"name": rm.name, "version": rm.version,
                            "dev": {Path(f).parent.name: pair_metrics(rm, f) for f in args.data},
                            "hacks": hack_metrics(rm, args.data, args.max_prompts, args.seed)}
        if args.ood_set is not None and rm.ood is not None:
            res["models"][d]["ood"] = ood_metrics(rm, args.ood_set, args.data)
        print(json.dumps(res["models"][d]["dev"], indent=1), file=sys.stderr)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
