"""The OOD score and flag: statistics fitted on training embeddings, a threshold that is the
documented quantile of held-out scores, the score as the engine serves it equal to an
independent float64 Mahalanobis distance, and no fields invented for models without statistics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rmserve.client import RewardClient
from rmserve.service.engine.ensemble import read_manifest
from rmserve.service.engine.model import load_model
from rmserve.service.engine.ood import OodStats
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.ood import calibrate_directory, fit_stats, split_pairs, threshold_of


def write_pairs(path, n=24):
    rows = []
    for i in range(n):
        prompt = f"question {i}: how do I bake bread number {i}?"
        rows.append({"prompt": prompt, "chosen": f"Mix flour and water, then knead {i} times.",
                     "rejected": f"I won't say {i}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stats_whiten_gaussian_data_and_score_is_mahalanobis_per_dimension():
    g = torch.Generator().manual_seed(0)
    h, n = 6, 4000
    a = torch.randn(h, h, generator=g, dtype=torch.float64)
    mu = torch.randn(h, generator=g, dtype=torch.float64)
    x = torch.randn(n, h, generator=g, dtype=torch.float64) @ a.T + mu
    stats, alpha = fit_stats(x, shrinkage=0.0)
    assert alpha == 0.0
    y = torch.randn(50, h, generator=g, dtype=torch.float64) * 3 + mu
    cov = torch.cov(x.T)
    d = y - x.mean(0)
    want = torch.sqrt(torch.einsum("nh,hk,nk->n", d, torch.linalg.inv(cov), d) / h)
    assert torch.allclose(stats.score(y).double(), want, rtol=1e-4)
    # in distribution the score is about 1 per dimension, whatever H
    assert abs(float((stats.score(x) ** 2).mean()) - 1.0) < 0.01


def test_shrinkage_is_chosen_by_held_out_likelihood():
    g = torch.Generator().manual_seed(1)
    few = torch.randn(40, 32, generator=g)  # N ~ H: the sample covariance is near-singular
    _, alpha_few = fit_stats(few)
    many = torch.randn(5000, 4, generator=g) @ torch.tensor([[3.0, 0, 0, 0], [1, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0.2]])
    _, alpha_many = fit_stats(many)
    assert alpha_few > alpha_many


def test_threshold_is_the_documented_quantile():
    rng = np.random.default_rng(2)
    s = rng.gamma(2.0, size=1001)
    t = threshold_of(s, 0.99)
    assert t == float(np.sort(s)[990])  # linear interpolation lands on the order statistic here
    assert (s > t).mean() == pytest.approx(0.01, abs=0.001)
    with pytest.raises(ValueError):
        threshold_of(s, 1.0)


def test_split_is_by_pair_and_held_out_sequences_never_fitted():
    chosen = np.array([0, 2, 4, 6, 8, 0])
    rejected = np.array([1, 3, 5, 7, 9, 10])
    fit, held = split_pairs(chosen, rejected, 0.5, seed=0)
    assert not set(fit) & set(held) and set(fit) | set(held) <= set(range(11))
    assert len(held) > 0


@pytest.fixture(scope="module")
def calibrated(tiny_ensemble, tmp_path_factory):
    out = tmp_path_factory.mktemp("ood") / "model"
    shutil.copytree(tiny_ensemble, out)
    data = write_pairs(out.parent / "train.jsonl")
    info = calibrate_directory(out, data, quantile=0.9, holdout=0.5, seed=0)
    return out, data, info


def test_calibration_writes_stats_and_a_threshold_that_is_the_quantile_of_held_out_scores(calibrated):
    out, data, _ = calibrated
    man = read_manifest(out)
    assert man.members[0].ood == "ood.safetensors" and man.ood["quantile"] == 0.9
    assert "train.jsonl" in man.ood["calibrated_on"]
    # recompute the held-out scores independently: float64 Mahalanobis from the saved statistics
    from rmserve.training.data import load_pairs
    from rmserve.training.encoding import encode_pairs

    rm = load_model(out)
    pairs, rep = load_pairs(data)
    enc = encode_pairs(pairs, rm.encoder, rep)
    _, held = split_pairs(enc.chosen, enc.rejected, 0.5, seed=0)
    feats = ScoringEngine(rm).features([enc.seqs[i] for i in held]).double()
    st = rm.members[0].ood
    d = feats - st.mean.double()
    prec = st.factor.double() @ st.factor.double().T
    scores = torch.sqrt(torch.einsum("nh,hk,nk->n", d, prec, d) / feats.shape[1]).numpy()
    assert man.ood["threshold"] == pytest.approx(float(np.quantile(scores, 0.9)), rel=1e-4)
    assert man.ood["num_calibration"] == len(held)


def test_served_results_carry_ood_and_model_info_the_threshold(calibrated, server_factory):
    out, _, _ = calibrated
    rm = load_model(out)
    server = server_factory(out)
    with RewardClient(server.address, timeout=60) as c:
        info = c.model_info()
        assert info.ood_threshold == pytest.approx(read_manifest(out).ood["threshold"])
        assert info.ood_quantile == 0.9 and "train.jsonl" in info.ood_calibrated_on
        samples = [{"prompt": "question 3: how do I bake bread number 3?", "response": "Mix flour."},
                   {"prompt": "zq xv", "response": "}}}}{{{{ ~~~~ ]]]] 0x7f 0x7f 0x7f"}]
        res = c.score(samples)
        enc = [rm.encoder.prompt_response(s["prompt"], s["response"]) for s in samples]
        want = rm.members[0].ood.score(ScoringEngine(rm).features([e.ids for e in enc]))
        for r, w in zip(res, want.tolist(), strict=True):
            assert r.ood_score == pytest.approx(w, rel=1e-4)
            assert r.ood == (r.ood_score > info.ood_threshold)
        arrays = res.arrays()
        assert arrays.ood_score is not None and arrays.ood is not None
        group = c.score_groups("zq xv", ["a", "b b"])
        assert all(r.ood_score is not None and r.ood is not None for r in group)
        cmp = c.compare("zq xv", "a", "b b")
        assert cmp.a.ood_score is not None and cmp.b.ood is not None


def test_models_without_statistics_get_no_invented_ood(tiny_server):
    with RewardClient(tiny_server.address, timeout=60) as c:
        assert c.model_info().ood_threshold is None
        (r,) = c.score([{"prompt": "hi", "response": "there"}])
        assert r.ood is None and r.ood_score is None
        assert c.score([{"prompt": "hi", "response": "there"}]).arrays().ood_score is None


def test_ood_stats_shape_is_checked():
    with pytest.raises(ValueError):
        OodStats(torch.zeros(3), torch.zeros(3, 2))
