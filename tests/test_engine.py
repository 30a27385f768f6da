"""The engine against independent computations: plain HF forwards, heads in float64."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from rmserve.service.engine.ensemble import read_manifest
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine, plan_batches


def random_seqs(n: int, vocab: int, lo: int = 1, hi: int = 40, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def expected_ensemble(directory, seqs):
    """Each sequence alone through the bare backbone, heads and statistics in float64."""
    man = read_manifest(directory)
    heads = load_file(directory / "member0" / "heads.safetensors")
    factor = load_file(directory / "member0" / "uncertainty.safetensors")["factor"].double()
    w, b = heads["weight"].double(), heads["bias"].double()
    shift, scale = torch.tensor(man.shift).double(), torch.tensor(man.scale).double()
    backbone = AutoModel.from_pretrained(directory / "backbone").eval()
    rows = []
    with torch.no_grad():
        for s in seqs:
            e = backbone(input_ids=torch.tensor([s])).last_hidden_state[0, -1].double()
            r = (e @ w.T + b - shift) / scale
            rows.append((r, (e @ factor).norm()))
    rewards = torch.stack([r for r, _ in rows])
    return rewards, torch.stack([x for _, x in rows])


def test_ensemble_scores_equal_the_independent_computation(tiny_ensemble):
    model = load_model(tiny_ensemble)
    seqs = random_seqs(23, 300, seed=1)
    out = ScoringEngine(model, token_budget=96).score(seqs)
    rewards, epistemic = expected_ensemble(tiny_ensemble, seqs)
    np.testing.assert_allclose(out.rewards, rewards.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.mean, rewards.mean(1).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.var, rewards.var(1, unbiased=False).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.min, rewards.min(1).values.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.epistemic, epistemic.numpy(), rtol=1e-4, atol=1e-4)
    assert out.stats.real_tokens == sum(map(len, seqs))
    assert out.stats.padded_tokens >= out.stats.real_tokens


def test_a_score_does_not_depend_on_its_batch(tiny_ensemble):
    model = load_model(tiny_ensemble)
    seqs = random_seqs(17, 300, seed=2)
    batched = ScoringEngine(model, token_budget=4096).score(seqs).mean
    alone = np.array([ScoringEngine(model).score([s]).mean[0] for s in seqs])
    assert np.abs(batched - alone).max() <= 1e-4 * max(1.0, alone.std())


@pytest.mark.parametrize("fixture", ["tiny_llama_seqcls", "tiny_bert_seqcls"])
def test_plain_hf_seqcls_checkpoint_is_a_one_head_ensemble(request, fixture):
    path = request.getfixturevalue(fixture)
    model = load_model(path)
    assert model.num_heads == 1 and len(model.members) == 1
    seqs = random_seqs(9, 300, lo=2, seed=3)
    out = ScoringEngine(model, token_budget=64).score(seqs)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        want = np.array([hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])
    np.testing.assert_allclose(out.mean, want, rtol=1e-4, atol=1e-5)
    assert np.all(out.var == 0) and out.epistemic is None


def test_pad_equal_to_eos_does_not_move_the_last_token(tiny_ensemble):
    """Sequences that end in the pad id are still read at their true last token."""
    model = load_model(tiny_ensemble)
    pad = model.members[0].backbone.tokenizer.pad_token_id
    seqs = [[5, 6, pad], [5, 6, pad, pad], [7, 8, 9, 10, 11, 12]]
    batched = ScoringEngine(model).score(seqs).rewards
    rewards, _ = expected_ensemble(tiny_ensemble, seqs)
    np.testing.assert_allclose(batched, rewards.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[0], batched[1])


def test_plan_batches_sorts_and_respects_the_padded_budget():
    lengths = [5, 100, 7, 30, 31, 2, 64, 64, 300]
    batches = plan_batches(lengths, token_budget=128, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        if len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= 128
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    assert [8] in batches  # longer than the budget: a batch of its own
