"""The two reward models of the synthetic setup (Gao et al. 2022; Coste et al. 2023).

gold   stands in for human preferences: rmserve's embedded default (SmolLM2-135M
       cut after 14 layers, 8 bootstrap heads, trained on all 1510 HH-harmless train
       pairs with human labels). It is only ever run in process, never served: the
       optimiser must not see it except through the labels below.
proxy  what an RLHF run would be rewarded by: 8 bootstrap heads on the backbone cut
       after a *different* layer (8), trained on a few hundred train pairs whose
       labels are the gold's (chosen = higher gold reward), a quarter of them flipped
       (Coste et al.'s 25% label noise). It is served by a real rmserve server, so
       the run monitor sees exactly what a trainer would send.

Different layers give the two models different features, so the proxy cannot
reproduce the gold exactly however much data it sees; the small, noisy subset is
what makes it exploitable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.service.server.config import DEFAULT_MODEL_DIR
from rmserve.training.data import Pair, load_pairs

Message = dict[str, str]


def conversation(prompt: Sequence[Message], response: str) -> list[Message]:
    """The prompt's turns followed by `response` as the assistant's last turn."""
    return [*({"role": m["role"], "content": m["content"]} for m in prompt), {"role": "assistant", "content": response}]


class GoldScorer:
    """The gold reward: rmserve's engine in process on the embedded default model.

    Scores are cached by (prompt key, response): an optimiser keeps parents across
    steps and re-proposes the same edits, and the gold forward is the costliest
    thing in the loop (14 layers against the proxy's 8).
    """

    def __init__(self, model_dir: str | Path = DEFAULT_MODEL_DIR, dtype: str = "auto"):
        from rmserve.service.engine.model import load_model
        from rmserve.service.engine.scoring import ScoringEngine

        self.model = load_model(model_dir, dtype=dtype)
        self.engine = ScoringEngine(self.model)
        self.cache: dict[tuple[str, str], float] = {}
        self.scored = 0

    def describe(self) -> dict[str, Any]:
        cfg = (self.model.training or {}).get("config", {})
        return {"source": str(self.model.source), "name": self.model.name, "version": self.model.version,
                "layers": cfg.get("num_layers"), "heads": self.model.num_heads, "dtype": self.model.dtype_name,
                "train_data": cfg.get("data")}

    def score(self, items: Sequence[tuple[str, Sequence[Message], str]]) -> np.ndarray:
        """Gold mean reward of each (prompt key, prompt messages, response)."""
        todo: dict[tuple[str, str], list[Message]] = {}
        for key, prompt, response in items:
            k = (key, response)
            if k not in self.cache and k not in todo:
                todo[k] = conversation(prompt, response)
        if todo:
            keys = list(todo)
            seqs = [self.model.encoder.conversation(todo[k]).ids for k in keys]
            out = self.engine.score(seqs)
            self.scored += len(keys)
            for k, v in zip(keys, out.mean.tolist(), strict=True):
                self.cache[k] = float(v)
        return np.array([self.cache[(key, r)] for key, _, r in items], dtype=np.float64)

    def score_conversations(self, convs: Sequence[Sequence[Message]]) -> np.ndarray:
        """Gold mean reward of whole conversations (no cache: used once, for relabelling)."""
        seqs = [self.model.encoder.conversation(list(c)).ids for c in convs]
        return self.engine.score(seqs).mean.astype(np.float64)


@dataclass
class ProxySpec:
    pairs: int = 300          # train pairs the proxy sees
    flip: float = 0.25        # share of its (gold) labels flipped
    layers: int = 8           # backbone cut: not the gold's 14
    heads: int = 8
    seed: int = 0
    labels: str = "gold"      # gold: relabelled by the gold (Gao et al.); human: the data's own labels


def write_proxy_data(gold: GoldScorer, train_path: str | Path, out_path: Path, spec: ProxySpec) -> dict[str, Any]:
    """Draw `spec.pairs` train pairs, label each by the gold (the higher-scored side
    becomes `chosen`) or keep the human label, flip a `spec.flip` share, and write them as
    prompt/chosen/rejected rows.

    Returns what happened (agreement of gold labels with the human ones, flips), for the report.
    """
    pairs, _ = load_pairs(train_path)
    rng = random.Random(spec.seed)
    subset: list[Pair] = rng.sample(pairs, spec.pairs)
    if spec.labels == "gold":
        convs = [p.chosen_conversation for p in subset] + [p.rejected_conversation for p in subset]
        g = gold.score_conversations(convs)
        gc, gr = g[: len(subset)], g[len(subset):]
    else:  # the human label: "gold agrees" everywhere by construction of this branch
        gc, gr = np.ones(len(subset)), np.zeros(len(subset))
    flips = set(rng.sample(range(len(subset)), round(spec.flip * len(subset))))
    rows = []
    for i, p in enumerate(subset):
        human_first = gc[i] >= gr[i]        # gold agrees with the human label
        gold_first = human_first != (i in flips)
        a, b = (p.chosen, p.rejected) if gold_first else (p.rejected, p.chosen)
        rows.append({"prompt": p.prompt, "chosen": a, "rejected": b})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if spec.labels != "gold":
        return {"pairs": len(rows), "flipped": len(flips), "labels": spec.labels}
    return {"pairs": len(rows), "flipped": len(flips), "labels": spec.labels,
            "gold_agrees_with_human": float(np.mean(gc >= gr)),
            "gold_margin_abs_mean": float(np.mean(np.abs(gc - gr)))}


def train_proxy(data_path: Path, out_dir: Path, spec: ProxySpec) -> dict[str, Any]:
    """Fit the proxy ensemble with rmserve's own trainer; returns the parts of its report we cite."""
    from rmserve.service.data.train_config import TrainConfig
    from rmserve.training.trainer import train

    cfg = TrainConfig(
        data=str(data_path), out=str(out_dir), kind="heads", num_heads=spec.heads, num_layers=spec.layers,
        head_solver="lbfgs", calib_frac=0.0, serve_dtype="bfloat16", seed=spec.seed, overwrite=True,
        name=f"proxy-l{spec.layers}-{spec.pairs}p-{spec.labels}-flip{round(100 * spec.flip)}",
    )
    result = train(cfg)
    rep = result.report
    return {"dir": str(out_dir), "config": {k: getattr(cfg, k) for k in
                                            ("num_layers", "num_heads", "head_solver", "calib_frac", "seed")},
            "heads": rep.get("heads"), "cross_fitted": rep.get("cross_fitted"),
            "train_metrics": rep.get("train")}
