"""How well does a served reward model tell out-of-distribution replies from HH-RLHF dev replies?

    HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1 .venv/bin/python bench/ood/evaluate.py --model service/default_model

Every dev response (both sides of every pair) is in-distribution, every row of
bench/ood/ood_set.jsonl (bench/ood/make_ood_set.py) is OOD; all are scored
through rmserve's own load_model + ScoringEngine.score, as the server scores them.

Reported, per OOD category and for all OOD rows together against the dev responses:
- AUROC (OOD = positive) of `ood_score` (models with OOD statistics), of the heads'
  std (sqrt(var)), of `epistemic` (models with an uncertainty factor) and of
  -reward (a bare reward model's only signal: OOD text tends to score low);
- the `ood` flag's rate (ood_score > manifest threshold): the true-positive rate
  per category, the false-positive rate on dev (by construction about
  1 - quantile if dev looks like the calibration data).
And on the dev pairs, whether the same signals predict a misranked pair
(reward_chosen <= reward_rejected), against the -|margin| baseline: pair-level
uncertainty is the mean of the two responses' values; over all pairs and over
the half with the smallest |margin|, where a ranking is least certain anyway.

AUROC is Mann-Whitney with ties counted one half (training/metrics.py `auroc`).
Writes a markdown report to --out and the raw numbers (and every sequence's
scores) to the same stem with .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.training.metrics import auroc

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"
OOD = Path(__file__).resolve().parent / "ood_set.jsonl"
SIGNALS = ("ood_score", "std", "epistemic", "neg_reward")  # AUROC columns, in order
CHUNK = 96  # sequences per score() call: progress lines, and dev pairs stay together for prefix sharing


def auroc_or_none(score: np.ndarray | None, positive: np.ndarray) -> float | None:
    """AUROC of `score` for `positive`, None when the model has no such score or a class is empty."""
    if score is None:
        return None
    return auroc(np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool))


def load_ood_rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if not isinstance(r.get("category"), str) or not isinstance(r.get("messages"), list):
            raise ValueError(f"{path}:{i + 1}: a row needs a category and a list of messages")
    return rows


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
        if name:
            return name
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def score_all(engine: Any, seqs: list[list[int]], chunk: int = CHUNK) -> dict[str, np.ndarray | None]:
    """reward / std / epistemic / ood_score of every sequence, in chunks that print progress."""
    parts: dict[str, list[np.ndarray]] = {"reward": [], "std": [], "epistemic": [], "ood_score": []}
    t0, done = time.perf_counter(), 0
    for start in range(0, len(seqs), chunk):
        out = engine.score(seqs[start:start + chunk])
        parts["reward"].append(out.mean)
        parts["std"].append(np.sqrt(np.maximum(out.var, 0.0)))
        if out.epistemic is not None:
            parts["epistemic"].append(out.epistemic)
        if out.ood_score is not None:
            parts["ood_score"].append(out.ood_score)
        done += len(out.mean)
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"  scored {done}/{len(seqs)} sequences ({rate:.1f}/s, ~{(len(seqs) - done) / rate:.0f} s left)",
              file=sys.stderr, flush=True)
    n_chunks = -(-len(seqs) // chunk)
    return {k: (np.concatenate(v).astype(np.float64) if len(v) == n_chunks else None) for k, v in parts.items()}


def ood_table(scores: dict[str, np.ndarray | None], is_ood: np.ndarray, categories: np.ndarray,
              threshold: float | None) -> dict[str, Any]:
    """Per category (and "all"): AUROC of each signal for OOD vs dev, flag rate, medians; plus dev's row."""
    signal = {"ood_score": scores["ood_score"], "std": scores["std"], "epistemic": scores["epistemic"],
              "neg_reward": -scores["reward"]}
    flag = None if threshold is None or scores["ood_score"] is None else scores["ood_score"] > threshold
    dev = ~is_ood

    def summary(mask: np.ndarray) -> dict[str, Any]:
        return {
            "n": int(mask.sum()),
            "flag_rate": None if flag is None else float(flag[mask].mean()),
            "median": {k: (None if v is None else float(np.median(v[mask])))
                       for k, v in scores.items()},
        }

    out: dict[str, Any] = {"dev": summary(dev), "categories": {}}
    for cat in [*dict.fromkeys(categories[is_ood].tolist()), "all"]:
        sel = is_ood if cat == "all" else is_ood & (categories == cat)
        both = sel | dev
        out["categories"][cat] = {**summary(sel),
                                  "auroc": {k: auroc_or_none(None if v is None else v[both], sel[both])
                                            for k, v in signal.items()}}
    return out


def misranking(scores: dict[str, np.ndarray | None], chosen: np.ndarray, rejected: np.ndarray) -> dict[str, Any]:
    """Accuracy, and AUROC of pair-level signals for predicting a misranked pair (margin <= 0)."""
    margin = scores["reward"][chosen] - scores["reward"][rejected]
    wrong = ~(margin > 0)
    pair = {k: (None if scores[k] is None else (scores[k][chosen] + scores[k][rejected]) / 2)
            for k in ("std", "epistemic", "ood_score")}
    pair["neg_abs_margin"] = -np.abs(margin)
    small = np.argsort(np.abs(margin), kind="stable")[: len(margin) // 2]

    def block(idx: np.ndarray) -> dict[str, Any]:
        return {"pairs": len(idx), "accuracy": float((~wrong[idx]).mean()) if len(idx) else None,
                "misranked": int(wrong[idx].sum()),
                "auroc": {k: auroc_or_none(None if v is None else v[idx], wrong[idx]) for k, v in pair.items()}}

    return {"all": block(np.arange(len(margin))), "small_margin_half": block(small)}


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    m, o, mr, skip = res["model"], res["ood"], res["misranking"], res["data"]["ood_skipped"]
    flag = (f"threshold {fmt(m['ood_threshold'], 4)} (quantile {m['ood_quantile']} of {m['ood_calibrated_on']})"
            if m["ood_threshold"] is not None else "none (no threshold in the manifest)")
    lines = [
        f"# OOD detection: {m['name']} {m['version']} ({res['date']})", "",
        f"- command: `{res['command']}`",
        f"- CPU: {res['cpu']} ({res['threads']} torch threads)",
        f"- model: {m['name']} version {m['version']} ({m['source']}), {m['kind']}, {m['members']} member(s), "
        f"{m['heads']} heads, {m['backbone']} ({m['layers']} layers), {m['dtype']}, max {m['max_tokens']} tokens",
        f"- OOD flag: {flag}; ood_score: {'yes' if m['has_ood_score'] else 'no'}; epistemic: {'yes' if m['has_epistemic'] else 'no'}",
        f"- in-distribution: {res['data']['dev']} ({res['data']['dev_pairs']} pairs, "
        f"{res['data']['dev_sequences']} distinct responses)",
        f"- OOD: {res['data']['ood']} ({res['data']['ood_rows']} rows scored"
        + (f"; {sum(skip.values())} skipped as longer than the model's limit: "
           + ", ".join(f"{c} {k}" for c, k in skip.items()) if skip else "") + ")",
        f"- wall time: load {res['timing']['load_s']:.1f} s, encode {res['timing']['encode_s']:.1f} s, "
        f"score {res['timing']['score_s']:.1f} s",
        "",
        "OOD (positive) vs dev responses: AUROC of each signal, the flag's rate (TPR on OOD rows, FPR on dev) "
        "and medians.",
        "",
        "| set | n | AUROC ood_score | AUROC std | AUROC epistemic | AUROC -reward | flag rate "
        "| median ood_score | median std | median reward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def medians(s: dict[str, Any]) -> str:
        md = s["median"]
        return f"{fmt(md['ood_score'])} | {fmt(md['std'])} | {fmt(md['reward'])}"

    for cat, s in o["categories"].items():
        a = s["auroc"]
        name = "**all OOD**" if cat == "all" else cat
        lines.append(f"| {name} | {s['n']} | " + " | ".join(fmt(a[k]) for k in SIGNALS)
                     + f" | {fmt(s['flag_rate'])} | {medians(s)} |")
    d = o["dev"]
    lines.append(f"| dev (in-distribution) | {d['n']} | — | — | — | — | {fmt(d['flag_rate'])} (FPR) | {medians(d)} |")
    lines += [
        "",
        "Dev pairs: does a signal predict a misranked pair (reward_chosen <= reward_rejected)? AUROC, misranked = "
        "positive; pair-level value = mean of the two responses'; -|margin| is the baseline to beat.",
        "",
        "| pairs | n | accuracy | misranked | AUROC std | AUROC epistemic | AUROC ood_score | AUROC -abs(margin) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, key in (("all", "all"), ("smallest-margin half", "small_margin_half")):
        b = mr[key]
        a = b["auroc"]
        lines.append(f"| {name} | {b['pairs']} | {fmt(b['accuracy'])} | {b['misranked']} | {fmt(a['std'])} | "
                     f"{fmt(a['epistemic'])} | {fmt(a['ood_score'])} | {fmt(a['neg_abs_margin'])} |")
    return "\n".join(lines) + "\n"


def _round(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else [round(float(x), 6) for x in a]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (an rmserve ensemble or a seq-cls checkpoint)")
    ap.add_argument("--dev", type=Path, default=DEV)
    ap.add_argument("--ood", type=Path, default=OOD)
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default bench/results/ood-<date>.md)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--token-budget", type=int, default=4096)
    args = ap.parse_args(argv)

    import torch

    from rmserve.service.engine.errors import InvalidInput
    from rmserve.service.engine.model import load_model
    from rmserve.service.engine.scoring import ScoringEngine
    from rmserve.training.data import load_pairs
    from rmserve.training.encoding import encode_pairs

    date = dt.date.today().isoformat()
    out_md = args.out or ROOT / "bench" / "results" / f"ood-{date}.md"
    t0 = time.perf_counter()
    rm = load_model(args.model, dtype=args.dtype, device=args.device)
    t_load = time.perf_counter() - t0
    print(f"loaded {rm.name} {rm.version} ({rm.dtype_name}) in {t_load:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    pairs, report = load_pairs(args.dev)
    enc = encode_pairs(pairs, rm.encoder, report)
    seqs = list(enc.seqs)
    categories: list[str] = []
    skipped: dict[str, int] = {}
    for i, r in enumerate(load_ood_rows(args.ood)):
        try:
            seqs.append(rm.encoder.conversation(r["messages"], where=f"{args.ood.name}:{i + 1}").ids)
            categories.append(r["category"])
        except InvalidInput as e:  # a reply longer than the model's token limit: counted, reported
            skipped[r["category"]] = skipped.get(r["category"], 0) + 1
            if sum(skipped.values()) <= 3:
                print(f"  skipped: {e}", file=sys.stderr)
    n_dev = len(enc.seqs)
    is_ood = np.r_[np.zeros(n_dev, bool), np.ones(len(categories), bool)]
    cats = np.array(["dev"] * n_dev + categories)
    t_enc = time.perf_counter() - t0
    print(f"{len(enc)} dev pairs ({n_dev} responses) + {len(categories)} OOD rows to score"
          + (f" ({sum(skipped.values())} skipped: {skipped})" if skipped else ""), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    scores = score_all(ScoringEngine(rm, token_budget=args.token_budget), seqs)
    t_score = time.perf_counter() - t0
    cal = rm.ood
    res: dict[str, Any] = {
        "date": date,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "command": shlex.join(["python", "bench/ood/evaluate.py", *argv]),
        "model": {
            "name": rm.name, "version": rm.version, "source": rm.source, "kind": rm.kind,
            "members": len(rm.members), "heads": rm.num_heads, "backbone": rm.backbone_name,
            "layers": rm.backbone_layers, "dtype": rm.dtype_name, "max_tokens": rm.max_tokens,
            "has_ood_score": rm.has_ood_score, "has_epistemic": rm.has_epistemic,
            "ood_threshold": None if cal is None else cal.threshold,
            "ood_quantile": None if cal is None else cal.quantile,
            "ood_calibrated_on": None if cal is None else cal.calibrated_on,
        },
        "data": {"dev": str(args.dev), "dev_pairs": len(enc), "dev_sequences": n_dev, "ood": str(args.ood),
                 "ood_rows": len(categories), "ood_skipped": skipped},
        "timing": {"load_s": t_load, "encode_s": t_enc, "score_s": t_score},
        "ood": ood_table(scores, is_ood, cats, None if cal is None else cal.threshold),
        "misranking": misranking(scores, enc.chosen, enc.rejected),
        "sequences": {"category": cats.tolist(), **{k: _round(v) for k, v in scores.items()}},
        "pairs": {"chosen": enc.chosen.tolist(), "rejected": enc.rejected.tolist()},
    }
    text = markdown(res)
    print(text)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text, encoding="utf-8")
    out_md.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_md} and {out_md.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
