"""`rmserve train --augment` and `--length-debias` through the whole trainer, on tiny models."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.ensemble import read_manifest
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import DataReport, load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.length import balanced_weights
from rmserve.training.trainer import TrainingStopped, train
from tests.test_training_trainer import WORDS, synthetic_rows, write_jsonl


def _cfg(tmp_path, backbone, data, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(tmp_path / "out"), backbone=str(backbone), kind="heads", num_heads=2,
                head_solver="lbfgs", head_l2=0.1, calib_frac=0.0, feature_cache=str(tmp_path / "cache"),
                ood_quantile=None, max_tokens=64)
    base.update(kw)
    return TrainConfig(**base)


def test_augmented_pairs_train_but_never_touch_dev_prompts_or_the_real_statistics(tiny_llama_backbone, tmp_path):
    rows = synthetic_rows(40, seed=11)
    dev_rows = [*synthetic_rows(6, seed=12), rows[0], rows[1]]  # two training prompts also in dev
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    dev_file = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
    res = train(_cfg(tmp_path, tiny_llama_backbone, train_file, dev=str(dev_file),
                     augment="off_topic,echo,flattery:0.5", ood_quantile=0.99, max_tokens=512))
    aug = res.report["data"]["augment"]
    prompts = {r["prompt"] for r in rows}
    held = {r["prompt"] for r in dev_rows}
    eligible = len(prompts - held)
    # prompts whose every chosen answer also occurs under another prompt have no answer of their own
    assert aug["excluded_prompts"] == len(held)
    assert aug["prompts"] + aug["prompts_without_own_answer"] == eligible and aug["prompts"] > eligible // 2
    assert aug["kinds"]["off_topic"]["pairs"] == aug["kinds"]["echo"]["pairs"] == aug["prompts"]
    assert 0 < aug["kinds"]["flattery"]["pairs"] < aug["prompts"]
    assert res.report["data"]["real_pairs"] == len(rows)
    assert aug["pairs"] == sum(k["pairs"] for k in aug["kinds"].values())
    # the headline metrics describe real pairs; the augmented ones are reported apart, per kind
    assert res.report["train"]["pairs"] == len(rows)
    assert res.report["train_augmented"]["pairs"] == aug["pairs"]
    man = read_manifest(res.out)
    assert man.training["config"]["augment"] == "off_topic,echo,flattery:0.5"
    assert man.training["augment"]["kinds"]["echo"]["pairs"] == aug["prompts"]
    assert man.training["length_debias"] == "none"
    # normalisation over the real answers only: served rewards of those have mean 0, std 1/T
    rm = load_model(res.out, dtype="float32")
    pairs, _ = load_pairs(train_file)
    enc = encode_pairs(pairs, rm.encoder, DataReport())
    r = ScoringEngine(rm).score(enc.seqs).rewards
    t = man.training["temperature"]
    np.testing.assert_allclose(r.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(r.std(0), 1 / t, rtol=1e-3)


def _length_planted(n: int, seed: int) -> list[dict]:
    """The chosen answer is always the longer: length alone ranks every pair."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        short = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        long = short + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        rows.append({"prompt": prompt, "chosen": long, "rejected": short})
    return rows


@pytest.mark.parametrize("method", ["none", "decorrelate", "balance+decorrelate"])
def test_decorrelate_removes_the_reward_length_relation_that_plain_training_learns(
        tiny_llama_backbone, tmp_path, method):
    data = write_jsonl(tmp_path / "len.jsonl", _length_planted(60, seed=5))
    res = train(_cfg(tmp_path, tiny_llama_backbone, data, length_debias=method, num_heads=1))
    rm = load_model(res.out, dtype="float32")
    pairs, _ = load_pairs(data)
    enc = encode_pairs(pairs, rm.encoder, DataReport())
    reward = ScoringEngine(rm).score(enc.seqs).rewards[:, 0]
    corr = np.corrcoef(reward, np.log1p(enc.response_tokens))[0, 1]
    if method == "none":
        assert corr > 0.5 and res.report["train"]["accuracy"] > 0.9  # length learned
    else:  # zero covariance with (log) length on the training answers, up to float32 serving
        assert abs(corr) < 1e-3
        assert read_manifest(res.out).training["length_debias"] == method


def test_balanced_weights_make_length_uninformative_per_dataset():
    w = np.array([1.0, 1, 1, 2, 1, 1, 5, 1])
    dlen = np.array([3, 4, -1, 2, 0, -5, 7, 2])
    groups = np.array(["a", "a", "a", "a", "a", "b", "b", "b"])
    real = np.array([True] * 7 + [False])
    got = balanced_weights(w, dlen, groups, real)
    for g in ("a", "b"):
        m = real & (groups == g)
        assert got[m & (dlen > 0)].sum() == pytest.approx(got[m & (dlen < 0)].sum())
        assert got[m].sum() == pytest.approx(w[m].sum())  # each dataset keeps its total
    assert got[4] == w[4] and got[7] == w[7]  # equal length and augmented pairs untouched
    # a dataset with one side only is left alone
    assert (balanced_weights(w[:2], dlen[:2], groups[:2], real[:2]) == w[:2]).all()


@pytest.mark.parametrize("kind", ["heads", "members"])
def test_gradient_trained_heads_and_fine_tuned_members_train_with_augmentation_and_balance(
        tiny_llama_backbone, tmp_path, kind):
    rows = synthetic_rows(32, seed=21)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    kw = dict(kind="members", finetune_layers=1, lora_rank=4) if kind == "members" else dict(kind="heads")
    res = train(_cfg(tmp_path, tiny_llama_backbone, data, head_solver="adamw", head_l2=None, epochs=1,
                     batch_size=16, lr=1e-2, backbone_lr=2e-3, augment="off_topic,echo,flattery",
                     length_debias="balance", max_tokens=128, **kw))
    aug = res.report["data"]["augment"]
    assert aug["pairs"] > 0 and res.report["train_augmented"]["pairs"] == aug["pairs"]
    assert res.report["train"]["pairs"] == res.report["data"]["real_pairs"] == len(rows)
    man = read_manifest(res.out)
    assert len(man.members) == (2 if kind == "members" else 1)
    assert man.training["length_debias"] == "balance" and man.training["augment"]["pairs"] == aug["pairs"]
    # normalised over the real answers only, as with exact heads (members: served through base + delta)
    rm = load_model(res.out, dtype="float32")
    pairs, _ = load_pairs(data)
    r = ScoringEngine(rm).score(encode_pairs(pairs, rm.encoder, DataReport()).seqs).rewards
    np.testing.assert_allclose(r.mean(0), 0, atol=2e-3)
    np.testing.assert_allclose(r.std(0), 1 / man.training["temperature"], rtol=2e-3)


def test_resume_with_augmentation_after_the_data_file_moved(tiny_llama_backbone, tmp_path):
    rows = synthetic_rows(32, seed=22)
    for folder in ("old", "new"):  # the dataset's name is its folder's
        (tmp_path / folder).mkdir()
    old, new = (write_jsonl(tmp_path / folder / "train.jsonl", rows) for folder in ("old", "new"))
    kw = dict(head_solver="adamw", head_l2=None, epochs=2, batch_size=16, lr=1e-2, augment="echo,flattery:0.5")
    full = train(_cfg(tmp_path / "a", tiny_llama_backbone, old, **kw))
    cfg = _cfg(tmp_path / "b", tiny_llama_backbone, old, **kw)
    seen = []
    with pytest.raises(TrainingStopped):
        train(cfg, progress=seen.append,
              should_stop=lambda: any(e.phase == "train" and e.event == "step" and e.step >= 3 for e in seen))
    # the same rows in another folder: the data (and its augmentation) is the same, so the resume goes on
    resumed = train(_cfg(tmp_path / "b", tiny_llama_backbone, new, **kw, resume=True))
    assert resumed.report["data"]["augment"] == full.report["data"]["augment"]
    ma, mb = read_manifest(full.out), read_manifest(resumed.out)
    assert ma.shift == pytest.approx(mb.shift, abs=1e-5) and ma.scale == pytest.approx(mb.scale, abs=1e-5)
