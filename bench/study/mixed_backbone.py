"""Study: does an ensemble whose members sit on DIFFERENT pretrained backbones carry useful disagreement?

Two frozen feature sets for the same preference pairs:

- A: the embedded default's backbone (SmolLM2-135M-Instruct cut at 14 layers), last-token
  features exactly as served (`ScoringEngine.features` on `PromptEncoder` ids, fp32);
- B: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, a sentence embedder): the conversation as
  plain "User: ...\\n\\nAssistant: ..." text, truncated from the LEFT to 256 tokens (the
  response end is kept), mean-pooled over the attention mask and L2-normalised, as
  sentence-transformers pools and normalises it.

Both are computed once and cached in <dir>/<split>_{A,B}.safetensors (reruns read the cache).

Heads are the trainer's own exact fits (training/linear_heads.py): features whitened over the
train sequences, one L2 logistic Bradley-Terry head per (feature set, bootstrap row), the L2
chosen per feature set by `choose_l2` (5-fold CV NLL on train, as `rmserve train
--head-solver lbfgs` chooses it). Out-of-fold rewards come from `cross_fitted_rewards` (5
folds by pair, seed 0: the folds of probe_layers.py / layer_ensemble.py, the same for every
recipe), each head normalised to mean 0 / std 1 over the train sequences, as serving does; a
mixed ensemble is the mean over its heads' normalised rewards, as serving averages members.
Metrics per recipe: out-of-fold accuracy, NLL and ECE after a temperature fitted on the
out-of-fold margins, AUROC of the heads' disagreement (std over heads of r_c - r_r) for
predicting a misranked pair, the same among the half of pairs with the smallest |margin|,
and AUROC of -|margin| (the baseline any uncertainty should beat). Pair-bootstrap 95%
intervals for the disagreement AUROC and for accuracy / NLL differences against recipe 1.
The L2 is chosen once on all of train and then used inside the CV, as the trainer's own
out-of-fold report does: a mild optimism, the same for every recipe.

`--dev` then fits the named recipes on all of train and scores dev once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rmserve.training.data import load_pairs
from rmserve.training.linear_heads import choose_l2, cross_fitted_rewards, fit_bt_head
from rmserve.training.metrics import auroc, pair_report
from rmserve.training.schedule import bootstrap_counts, derive_seed
from rmserve.training.stats import fit_normalisation, fit_temperature

SPLITS = ("train", "dev")
MINILM_MAX_TOKENS = 256  # the model's sentence_bert_config max_seq_length


# ---------------------------------------------------------------- features


def conversations(pairs) -> tuple[list[list[dict]], np.ndarray, np.ndarray]:
    """Unique conversations in first-appearance order (encode_pairs' order) and each pair's indices."""
    index: dict[str, int] = {}
    convs: list[list[dict]] = []

    def sid(msgs: list[dict]) -> int:
        key = json.dumps(msgs, ensure_ascii=False)
        if key not in index:
            index[key] = len(convs)
            convs.append(msgs)
        return index[key]

    chosen, rejected = [], []
    for p in pairs:
        chosen.append(sid(p.chosen_conversation))
        rejected.append(sid(p.rejected_conversation))
    return convs, np.array(chosen), np.array(rejected)


def convs_key(convs: list[list[dict]]) -> str:
    return hashlib.sha256(json.dumps(convs, ensure_ascii=False).encode()).hexdigest()[:16]


def features_a(convs, chosen, rejected, pairs, model_dir: str) -> torch.Tensor:
    """The default's served features: PromptEncoder ids -> ScoringEngine.features (fp32)."""
    from rmserve.service.engine.model import load_model
    from rmserve.service.engine.scoring import ScoringEngine
    from rmserve.training.data import DataReport
    from rmserve.training.encoding import encode_pairs
    from rmserve.training.features import compute_features

    rm = load_model(model_dir, dtype="float32")
    data = encode_pairs(pairs, rm.encoder, DataReport())
    # every pair encodes, so encode_pairs' sequence table is exactly `convs`, in the same order
    assert len(data) == len(pairs) and len(data.seqs) == len(convs), (len(data), len(data.seqs), len(convs))
    assert (data.chosen == chosen).all() and (data.rejected == rejected).all()
    lens = [len(s) for s in data.seqs]
    print(f"  A: {len(data.seqs)} sequences, {sum(lens)} tokens (max {max(lens)}), prompt cut in {data.truncated}",
          flush=True)
    t0 = time.monotonic()

    def progress(done: int, total: int) -> None:
        print(f"  A: {done}/{total} sequences, {time.monotonic() - t0:.0f}s", flush=True)

    return compute_features(ScoringEngine(rm), data.seqs, progress=progress)


def render_plain(msgs: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs)


@torch.inference_mode()
def features_b(convs, minilm_dir: str, batch: int = 32) -> tuple[torch.Tensor, int]:
    """all-MiniLM-L6-v2 sentence embeddings: left-truncated to 256 tokens, masked mean pool, L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.truncation_side = "left"  # keep the end of the conversation: the response being judged
    model = AutoModel.from_pretrained(minilm_dir).eval().float()
    texts = [render_plain(c) for c in convs]
    full = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    cut = sum(n > MINILM_MAX_TOKENS for n in full)
    order = sorted(range(len(texts)), key=lambda i: full[i])
    out = torch.empty(len(texts), model.config.hidden_size)
    t0 = time.monotonic()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MINILM_MAX_TOKENS,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1)
        if (s // batch) % 20 == 0:
            print(f"  B: {s + len(idx)}/{len(texts)} sequences, {time.monotonic() - t0:.0f}s", flush=True)
    print(f"  B: {len(texts)} sequences, {cut} longer than {MINILM_MAX_TOKENS} tokens (left-truncated), "
          f"{time.monotonic() - t0:.0f}s", flush=True)
    return out, cut


def load_split(a, split: str) -> dict[str, torch.Tensor]:
    """{"A", "B", "chosen", "rejected", "weight"}, from the cache when its conversations match."""
    pairs, rep = load_pairs(Path(a.data_dir) / f"{split}.jsonl")
    convs, chosen, rejected = conversations(pairs)
    key = convs_key(convs)
    out = {"chosen": torch.as_tensor(chosen), "rejected": torch.as_tensor(rejected),
           "weight": torch.tensor([p.weight for p in pairs], dtype=torch.float64)}
    print(f"{split}: {len(pairs)} pairs, {len(convs)} unique conversations (skipped: {rep.summary()!r:.80})",
          flush=True)
    for name in ("A", "B"):
        path = Path(a.dir) / f"{split}_{name}.safetensors"
        if path.is_file():
            t = load_file(path)
            if t.get("key") is not None and bytes(t["key"].tolist()).decode() == key:
                out[name] = t["features"]
                continue
        t0 = time.monotonic()
        if name == "A":
            f = features_a(convs, chosen, rejected, pairs, a.model)
        else:
            f, _ = features_b(convs, a.minilm)
        print(f"  {name}: {tuple(f.shape)} in {time.monotonic() - t0:.0f}s -> {path}", flush=True)
        save_file({"features": f.contiguous(), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)},
                  str(path))
        out[name] = f
    return out


# ---------------------------------------------------------------- heads


def whiten(train_feats: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """As the trainer does: mean/std over the train sequences; a constant dimension is zeroed."""
    f = train_feats.double()
    mu, sd = f.mean(0), f.std(0)
    sd = torch.where(sd > 1e-6 * float(sd.max()), sd, torch.full_like(sd, float("inf")))
    return [(t.double() - mu) / sd for t in (train_feats, *others)]


# a recipe: list of (feature set, bootstrap row or None = all data, equal weights)
RECIPES: dict[str, list[tuple[str, int | None]]] = {
    "1. A, 8 bootstrap heads": [("A", b) for b in range(8)],
    "2. B, 8 bootstrap heads": [("B", b) for b in range(8)],
    "3a. A + B, 1 head each (all data)": [("A", None), ("B", None)],
    "3b. A + B, 4 + 4 bootstrap heads": [("A", b) for b in range(4)] + [("B", b) for b in range(4, 8)],
    "3c. A + B, 8 + 8 bootstrap heads": [("A", b) for b in range(8)] + [("B", b) for b in range(8)],
    "4. [A;B] concatenated, 1 head": [("AB", None)],
    "4b. [A;B] concatenated, 8 bootstrap heads": [("AB", b) for b in range(8)],
    "A, 1 head (all data)": [("A", None)],
    "B, 1 head (all data)": [("B", None)],
}


def small_half(d: np.ndarray) -> np.ndarray:
    return np.argsort(np.abs(d), kind="stable")[: len(d) // 2]


def summarise(rc: np.ndarray, rr: np.ndarray, w: np.ndarray, t: float) -> dict:
    rep = pair_report(rc / t, rr / t, w)
    d = (rc - rr).mean(1)
    small = small_half(d)
    wrong = ~(d > 0)
    k = rc.shape[1]
    std = (rc - rr).std(1)
    rep["auroc_std_small"] = auroc(std[small], wrong[small], w[small]) if k > 1 else None
    rep["temperature"] = t
    rep["mean_head_accuracy"] = float(np.mean(list(rep["accuracy_per_head"].values())))
    return rep


def boot_ci(fn, *arrays: np.ndarray, draws: int, seed: int = 0) -> tuple[float, float]:
    """95% pair-bootstrap interval of fn(*arrays), every array resampled with the same pairs."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    vals = []
    for _ in range(draws):
        i = rng.integers(0, n, n)
        v = fn(*(x[i] for x in arrays))
        if v is not None:
            vals.append(v)
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def auroc_of_std(std: np.ndarray, d: np.ndarray, w: np.ndarray) -> float | None:
    return auroc(std, ~(d > 0), w)


def acc_diff(d: np.ndarray, d1: np.ndarray) -> float:
    return float(np.mean(d > 0) - np.mean(d1 > 0))


def nll_diff(d: np.ndarray, d1: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, -d)) - np.mean(np.logaddexp(0, -d1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/mixed_study", help="feature cache")
    ap.add_argument("--data-dir", default="/work/shared/data/hh-rlhf-harmless")
    ap.add_argument("--model", default="/work/main/service/default_model")
    ap.add_argument("--minilm", default="/tmp/minilm", help="all-MiniLM-L6-v2, extracted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--l2", type=float, default=None, help="one L2 for every feature set (default: CV per set)")
    ap.add_argument("--boot-seed", type=int, default=None,
                    help="seed of the heads' bootstrap resamples (default: the trainer's, member 0 of --seed 0)")
    ap.add_argument("--boot-draws", type=int, default=1000, help="pair-bootstrap draws for the 95%% intervals")
    ap.add_argument("--features-only", action="store_true")
    ap.add_argument("--dev", nargs="*", default=None,
                    help="recipes (their leading numbers, e.g. 1 3b 4) to fit on all of train and score on dev once")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    tr = load_split(a, "train")
    dv = load_split(a, "dev") if a.dev is not None or a.features_only else None
    if a.features_only:
        return

    # whitened features (train statistics), and the concatenation of the whitened sets
    xs, xd = {}, {}
    for name in ("A", "B"):
        xs[name], xd[name] = whiten(tr[name], dv[name] if dv is not None else tr[name])
    xs["AB"], xd["AB"] = torch.cat([xs["A"], xs["B"]], 1), torch.cat([xd["A"], xd["B"]], 1)
    c, r, w = tr["chosen"], tr["rejected"], tr["weight"]
    n = len(c)

    l2 = {}
    for name in ("A", "B", "AB"):
        if a.l2 is not None:
            l2[name] = a.l2
            continue
        ch = choose_l2(xs[name][c] - xs[name][r], w, seed=0)
        l2[name] = ch.l2
        print(f"L2 for {name}: {ch.l2:g} (5-fold CV NLL {ch.cv_nll[ch.l2]:.4f}, acc {ch.cv_accuracy[ch.l2]:.3f}; "
              f"grid acc {', '.join(f'{g:g}:{v:.3f}' for g, v in ch.cv_accuracy.items())})", flush=True)

    # the trainer's resamples (member 0 of `rmserve train --seed 0`): recipe 1 refitted on all of train is
    # exactly the served default's heads
    boot_seed = derive_seed(0, "member", 0) if a.boot_seed is None else a.boot_seed
    counts = bootstrap_counts(8, n, boot_seed, True).double()
    # out-of-fold normalised rewards per (feature set, bootstrap row): each head fitted once, shared by recipes
    oof: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]] = {}
    t0 = time.monotonic()
    for heads in RECIPES.values():
        for fs, b in heads:
            if (fs, b) in oof:
                continue
            hw = (counts[b] if b is not None else torch.ones(n, dtype=torch.float64)) * w
            rc_, rr_ = cross_fitted_rewards(xs[fs], c, r, hw[None], l2=l2[fs], seed=0)
            oof[(fs, b)] = (rc_[:, 0].numpy(), rr_[:, 0].numpy())
    print(f"out-of-fold heads: {len(oof)} in {time.monotonic() - t0:.0f}s", flush=True)

    wn = w.numpy()
    reps, stacks = {}, {}
    for name, heads in RECIPES.items():
        rc = np.stack([oof[h][0] for h in heads], 1)
        rr = np.stack([oof[h][1] for h in heads], 1)
        t = fit_temperature((rc - rr).mean(1), wn)
        rep = summarise(rc, rr, wn, t)
        if rc.shape[1] > 1:
            std, d = (rc - rr).std(1), (rc - rr).mean(1)
            rep["auroc_std_ci"] = boot_ci(auroc_of_std, std, d, wn, draws=a.boot_draws)
        reps[name], stacks[name] = rep, (rc, rr)

    base = "1. A, 8 bootstrap heads"
    d1 = (stacks[base][0] - stacks[base][1]).mean(1)
    print("\n| recipe | heads | CV acc | Δacc vs 1 (95% CI) | mean head acc | CV NLL | ΔNLL vs 1 (95% CI) | ECE | T | "
          "AUROC std → misranked (95% CI) | same, small-margin half | AUROC −\\|margin\\| |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rep in reps.items():
        rc, rr = stacks[name]
        d = (rc - rr).mean(1)
        if name == base:
            delta = dnll = "—"
        else:
            lo, hi = boot_ci(acc_diff, d, d1, draws=a.boot_draws)
            delta = f"{rep['accuracy'] - reps[base]['accuracy']:+.3f} ({lo:+.3f}, {hi:+.3f})"
            lo, hi = boot_ci(nll_diff, d / rep["temperature"], d1 / reps[base]["temperature"], draws=a.boot_draws)
            dnll = f"{rep['nll'] - reps[base]['nll']:+.4f} ({lo:+.4f}, {hi:+.4f})"
        s = "—" if rep["auroc_std"] is None else \
            f"{rep['auroc_std']:.3f} ({rep['auroc_std_ci'][0]:.3f}, {rep['auroc_std_ci'][1]:.3f})"
        ss = "—" if rep["auroc_std_small"] is None else f"{rep['auroc_std_small']:.3f}"
        print(f"| {name} | {rc.shape[1]} | {rep['accuracy']:.3f} | {delta} | {rep['mean_head_accuracy']:.3f} | "
              f"{rep['nll']:.4f} | {dnll} | {rep['ece']:.3f} | {rep['temperature']:.2f} | {s} | {ss} | "
              f"{rep['auroc_margin']:.3f} |", flush=True)

    # does disagreement add anything to the margin? z = |mean margin| / std over heads (small z: the
    # heads' spread is large against the margin), and, for mixed ensembles, whether the A heads' mean
    # and the B heads' mean pick different winners
    print("\n| recipe | AUROC −\\|margin\\| / std | same, small-margin half | AUROC A/B pick different winners "
          "| same, small-margin half | misranked when A/B agree / differ |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, heads in RECIPES.items():
        rc, rr = stacks[name]
        if rc.shape[1] < 2:
            continue
        m = rc - rr
        d, std = m.mean(1), m.std(1)
        wrong, small = ~(d > 0), small_half(d)
        z = -np.abs(d) / np.maximum(std, 1e-12)
        cells = [f"{auroc(z, wrong, wn):.3f}", f"{auroc(z[small], wrong[small], wn[small]):.3f}"]
        fs = np.array([h[0] for h in heads])
        if {"A", "B"} <= set(fs):
            differ = (m[:, fs == "A"].mean(1) > 0) != (m[:, fs == "B"].mean(1) > 0)
            cells += [f"{auroc(differ.astype(float), wrong, wn):.3f}",
                      f"{auroc(differ[small].astype(float), wrong[small], wn[small]):.3f}",
                      f"{wrong[~differ].mean():.3f} / {wrong[differ].mean():.3f} (differ on {differ.mean():.3f})"]
        else:
            cells += ["—", "—", "—"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    # how differently do the two backbones err? (full-data heads, out of fold)
    ma = oof[("A", None)][0] - oof[("A", None)][1]
    mb = oof[("B", None)][0] - oof[("B", None)][1]
    wa, wb = ~(ma > 0), ~(mb > 0)
    print(f"\nA vs B full-data heads, out of fold: margin correlation {np.corrcoef(ma, mb)[0, 1]:.3f}, "
          f"same winner on {np.mean(wa == wb):.3f} of pairs; both wrong {np.mean(wa & wb):.3f}, "
          f"only A wrong {np.mean(wa & ~wb):.3f}, only B wrong {np.mean(~wa & wb):.3f}")
    # disagreement of the 3a pair = |mA - mB| / 2: does it flag A's own mistakes?
    dis = np.abs(ma - mb)
    print(f"|m_A - m_B| as a predictor of A's mistakes: AUROC {auroc(dis, wa):.3f} "
          f"(-|m_A|: {auroc(-np.abs(ma), wa):.3f}); of the 3a ensemble's: see the table")

    if a.dev is None:
        return
    chosen_recipes = [name for name in RECIPES if name.split(" ")[0].rstrip(".") in (a.dev or ["1"])]
    dc, dr, dw = dv["chosen"], dv["rejected"], dv["weight"].numpy()
    print(f"\nDEV ({len(dc)} pairs), heads fitted on all of train, scored once:")
    print("| recipe | dev acc | NLL | ECE | AUROC std → misranked | same, small-margin half | AUROC −\\|margin\\| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    dev_d = {}
    for name in chosen_recipes:
        heads = RECIPES[name]
        rt, rd = [], []
        for fs, b in heads:
            hw = (counts[b] if b is not None else torch.ones(n, dtype=torch.float64)) * w
            wt = fit_bt_head(xs[fs][c] - xs[fs][r], hw, l2=l2[fs])
            rt.append((xs[fs] @ wt).numpy())
            rd.append((xd[fs] @ wt).numpy())
        shift, scale = fit_normalisation(np.stack(rt, 1))  # over the train sequences, as serving
        rd = (np.stack(rd, 1) - shift) / np.array(scale)
        rc_oof, rr_oof = stacks[name]
        t = fit_temperature((rc_oof - rr_oof).mean(1), wn)  # the trainer's temperature: out-of-fold margins
        rep = summarise(rd[dc.numpy()], rd[dr.numpy()], dw, t)
        dev_d[name] = (rd[dc.numpy()] - rd[dr.numpy()]).mean(1) / t
        s = "—" if rep["auroc_std"] is None else f"{rep['auroc_std']:.3f}"
        ss = "—" if rep["auroc_std_small"] is None else f"{rep['auroc_std_small']:.3f}"
        print(f"| {name} | {rep['accuracy']:.3f} | {rep['nll']:.4f} | {rep['ece']:.3f} | {s} | {ss} | "
              f"{rep['auroc_margin']:.3f} |", flush=True)

    if base in dev_d:
        d1 = dev_d[base]
        for name, d in dev_d.items():
            if name == base:
                continue
            acc = boot_ci(acc_diff, d, d1, draws=a.boot_draws)
            nl = boot_ci(nll_diff, d, d1, draws=a.boot_draws)
            print(f"dev, {name} minus recipe 1 (paired pair-bootstrap 95% CI): "
                  f"accuracy {acc_diff(d, d1):+.3f} ({acc[0]:+.3f}, {acc[1]:+.3f}), "
                  f"NLL {nll_diff(d, d1):+.4f} "
                  f"({nl[0]:+.4f}, {nl[1]:+.4f}); winners differ on {np.mean((d > 0) != (d1 > 0)):.3f}")


if __name__ == "__main__":
    main()
