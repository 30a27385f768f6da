"""Prefix sharing: group detection, and scores equal to the unshared path."""

from __future__ import annotations

import random

import numpy as np

from rmserve.service.engine.model import load_model
from rmserve.service.engine.prefix import find_prefix_groups
from rmserve.service.engine.scoring import ScoringEngine


def grpo_batch(n_prompts: int, n_completions: int, prompt_len: int, seed: int, system: list[int] | None = None):
    rng = random.Random(seed)
    seqs, prompts = [], []
    for _ in range(n_prompts):
        prompt = (system or []) + [rng.randrange(7, 300) for _ in range(prompt_len)]
        prompts.append(prompt)
        for _ in range(n_completions):
            seqs.append(prompt + [rng.randrange(7, 300) for _ in range(rng.randint(1, 12))])
    rng.shuffle(seqs)
    return seqs, prompts


def test_groups_are_the_prompts_even_under_a_shared_system_prompt():
    seqs, prompts = grpo_batch(3, 4, 40, seed=0, system=list(range(7, 37)))
    groups, alone = find_prefix_groups(seqs, min_prefix=16)
    assert alone == []
    assert sorted(len(g.members) for g in groups) == [4, 4, 4]
    for g in groups:
        members = [seqs[i] for i in g.members]
        assert any(m[: len(p)] == p for p in prompts for m in members[:1])
        assert g.prefix_len >= 70  # system (30) + prompt (40), not just the system prompt
        assert all(m[: g.prefix_len] == members[0][: g.prefix_len] for m in members)
        assert all(len(m) > g.prefix_len for m in members)


def test_short_or_unshared_sequences_are_left_alone():
    seqs = [[1, 2, 3], [1, 2, 3], [9] * 20, [8] * 20]
    groups, alone = find_prefix_groups(seqs, min_prefix=2)
    assert [sorted(g.members) for g in groups] == [[0, 1]]
    assert groups[0].prefix_len == 2  # identical sequences keep their last token to score
    assert sorted(alone) == [2, 3]


def test_shared_prefix_scores_equal_the_unshared_path(tiny_ensemble):
    model = load_model(tiny_ensemble)
    seqs, _ = grpo_batch(3, 5, 30, seed=1)
    seqs += [[random.Random(i).randrange(7, 300) for _ in range(25)] for i in range(3)]  # unrelated
    shared = ScoringEngine(model, token_budget=128, min_shared_prefix=16).score(seqs)
    plain = ScoringEngine(model, token_budget=128, min_shared_prefix=0).score(seqs)
    alone = np.stack([ScoringEngine(model, min_shared_prefix=0).score([s]).rewards[0] for s in seqs])
    for out in (shared, plain):
        np.testing.assert_allclose(out.rewards, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shared.epistemic, plain.epistemic, rtol=1e-4, atol=1e-5)
    assert plain.stats.real_tokens == sum(map(len, seqs))
    assert shared.stats.real_tokens == sum(map(len, seqs)) - 3 * 4 * 30  # each prompt encoded once


def test_shared_prefix_on_the_embedded_backbone(smollm2_ensemble):
    """SmolLM2 (the default's backbone, fetched and converted once) with random heads."""
    model = load_model(smollm2_ensemble)
    enc = model.encoder
    prompts = ["How do I bake bread at home? Give me the steps.", "What is the capital of France?"]
    completions = ["Mix flour and water.", "Knead, rest, bake at 220C.", "I don't know."]
    seqs = [enc.prompt_response(p, c).ids for p in prompts for c in completions]
    groups, _ = find_prefix_groups(seqs, 16)
    assert sorted(len(g.members) for g in groups) == [3, 3]
    shared = ScoringEngine(model, min_shared_prefix=16).score(seqs)
    plain = ScoringEngine(model, min_shared_prefix=0).score(seqs)
    scale = max(float(plain.mean.std()), 1e-3)
    assert np.abs(shared.rewards - plain.rewards).max() <= 1e-3 * scale + 1e-5
