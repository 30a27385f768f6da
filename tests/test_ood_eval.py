"""bench/ood: the OOD evaluation set's generator and the evaluation's metrics, on tiny inputs.

The committed set and the report are only as good as these: rows of every category
in the requested number and the same for a seed, cut_mid_word really stopping inside
a word, the AUROC equal to counting pairs by hand (ties one half), and the report
written end to end for a tiny calibrated model.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from rmserve.service.engine.tokenization import ROLES

OOD_DIR = Path(__file__).resolve().parents[1] / "bench" / "ood"
TEMPLATE_CATEGORIES = ("code", "arithmetic", "other_language", "random_tokens", "repeated_phrase", "cut_mid_word")


def _load(name: str) -> ModuleType:
    """Import by path under a unique name: bench/ood is no package, and `evaluate` is a PyPI name."""
    spec = importlib.util.spec_from_file_location(f"bench_ood_{name}", OOD_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


make_set = _load("make_ood_set")
evaluate = _load("evaluate")


def write_hh(path: Path, n: int = 30) -> Path:
    rows = [{"chosen": f"\n\nHuman: how do I bake bread number {i}?\n\nAssistant: Mix flour and water, "
                       f"then knead the dough {i} times before baking.",
             "rejected": f"\n\nHuman: how do I bake bread number {i}?\n\nAssistant: No idea {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ctx(tiny_llama_backbone, tmp_path_factory):
    from transformers import AutoTokenizer

    dev = write_hh(tmp_path_factory.mktemp("ood_set") / "dev.jsonl")
    return make_set.load_context(dev, AutoTokenizer.from_pretrained(tiny_llama_backbone), tiny_llama_backbone)


def brute_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_counts_pairs_with_ties_as_half():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        score = rng.integers(0, 5, n).astype(float)  # few values: many ties
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            assert evaluate.auroc_or_none(score, positive) is None
            continue
        assert evaluate.auroc_or_none(score, positive) == pytest.approx(brute_auroc(score, positive))
    assert evaluate.auroc_or_none(None, np.array([True, False])) is None


@pytest.mark.parametrize("category", TEMPLATE_CATEGORIES)
def test_template_categories_have_the_count_and_are_deterministic(ctx, category):
    rows = make_set.make_rows(category, 12, 5, ctx)
    assert len(rows) == 12 and all(r["category"] == category for r in rows)
    for r in rows:
        msgs = r["messages"]
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"]
        assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in msgs)
    assert make_set.make_rows(category, 12, 5, ctx) == rows
    assert make_set.make_rows(category, 12, 6, ctx) != rows


def test_cut_mid_word_stops_inside_a_word(ctx):
    originals = {s: reply for s, _, reply in ctx.replies}
    for r in make_set.make_rows("cut_mid_word", 20, 0, ctx):
        full, cut = originals[r["source"]], r["messages"][-1]["content"]
        assert full.startswith(cut) and len(cut) < len(full)
        assert cut[-1].isalnum() and full[len(cut)].isalnum()


def test_arithmetic_answers_are_right():
    import random

    rng = random.Random(0)
    for _ in range(200):
        expr, answer = make_set.arithmetic_item(rng)
        if "%" in expr:
            p, x = (int(v) for v in expr.replace("% of", "").split())
            value = p * x // 100
        else:
            value = eval(expr.replace("×", "*").replace("÷", "//"))  # trusted: generated just above
        assert re.search(rf"= {value}(?!\d)", answer), (expr, answer)


def test_random_policy_ties_a_missing_lm_head_and_samples(ctx, tiny_llama_backbone):
    _, model = make_set.load_policy(tiny_llama_backbone)  # a bare LlamaModel checkpoint: no lm_head
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ctx.max_new_tokens, ctx.policy_batch = 4, 2
    rows = make_set.make_rows("random_policy", 3, 0, ctx)
    assert len(rows) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_evaluate_writes_the_report_for_a_calibrated_tiny_model(tiny_ensemble, tmp_path):
    from rmserve.training.ood import calibrate_directory

    model = tmp_path / "model"
    shutil.copytree(tiny_ensemble, model)
    dev = write_hh(tmp_path / "dev.jsonl", 16)
    calibrate_directory(model, dev, quantile=0.9, holdout=0.5, seed=0)
    ood = tmp_path / "ood.jsonl"
    rows = [{"category": c, "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": f"{c} {i} zz!?"}]}
            for c in ("code", "random_tokens") for i in range(4)]
    rows.append({"category": "code", "messages": [{"role": "assistant", "content": "x " * 400}]})  # too long
    ood.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.md"
    assert evaluate.main(["--model", str(model), "--dev", str(dev), "--ood", str(ood), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["data"]["ood_rows"] == 8 and res["data"]["ood_skipped"] == {"code": 1}
    cats = res["ood"]["categories"]
    assert set(cats) == {"code", "random_tokens", "all"} and cats["all"]["n"] == 8
    assert all(0 <= cats["all"]["auroc"][k] <= 1 for k in ("ood_score", "std", "epistemic", "neg_reward"))
    assert res["ood"]["dev"]["flag_rate"] is not None and res["model"]["ood_threshold"] is not None
    assert res["misranking"]["all"]["pairs"] == 16 and res["misranking"]["small_margin_half"]["pairs"] == 8
    text = out.read_text()
    assert "| **all OOD** | 8 |" in text and "smallest-margin half" in text
