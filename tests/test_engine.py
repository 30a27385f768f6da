"""The engine against independent computations: plain HF forwards, heads in float64."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from rmserve.service.engine import heads
from rmserve.service.engine.contract import plan_batches
from rmserve.service.engine.ensemble import (
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    read_manifest,
    save_member,
    write_manifest,
)
from rmserve.service.engine.heads import combine_member_stats
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine


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


# -- several members: the kernel's per-member statistics, combined ------------------------------

MEMBER_HEADS = (3, 1, 4)   # K_m, one member with a single head (variance 0 on its own)


@pytest.fixture(scope="module")
def members_ensemble(tmp_path_factory, tiny_llama_backbone):
    """A 'members' ensemble over the tiny Llama: members differ in heads, K_m, bias offset
    (so the between-member term of the variance matters) and, for member1, a backbone delta."""
    out = tmp_path_factory.mktemp("members_ensemble")
    g = torch.Generator().manual_seed(11)
    h = 32
    layer = "layers.1.mlp.down_proj.weight"
    base = AutoModel.from_pretrained(tiny_llama_backbone).state_dict()[layer]
    specs = []
    for i, k in enumerate(MEMBER_HEADS):
        spec = MemberSpec(name=f"member{i}", backbone=str(tiny_llama_backbone))
        save_member(out, spec, MemberTensors(
            weight=torch.randn(k, h, generator=g), bias=torch.randn(k, generator=g) + 3.0 * i,
            delta={layer: base + 0.1 * torch.randn(base.shape, generator=g)} if i == 1 else None,
            unc_factor=torch.randn(h, h, generator=g) / h if i != 1 else None,
        ))
        specs.append(spec)
    k = sum(MEMBER_HEADS)
    write_manifest(out, EnsembleManifest(
        name="tiny-members", version="v1", kind="members", members=specs,
        shift=torch.linspace(-1, 1, k).tolist(), scale=torch.linspace(0.5, 2, k).tolist(), max_tokens=64,
    ))
    return out


@pytest.mark.parametrize("path", ["reference", "triton-interpreter"])
def test_members_statistics_equal_float64_stats_over_all_heads(members_ensemble, path, monkeypatch):
    """mean/var/min of a multi-member ensemble: the kernel's per member, combined by the law of
    total variance, equal float64 statistics over the concatenated per-head rewards."""
    if path == "triton-interpreter":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = load_model(members_ensemble)
    assert [m.weight.shape[0] for m in model.members] == list(MEMBER_HEADS)
    out = ScoringEngine(model, token_budget=96).score(random_seqs(13, 300, seed=5))
    r = torch.from_numpy(out.rewards).double()
    assert r.shape == (13, sum(MEMBER_HEADS))
    for got, want in ((out.mean, r.mean(1)), (out.var, r.var(1, unbiased=False)), (out.min, r.min(1).values)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    # the between-member term is not negligible here, so a wrong combination would show
    cuts = np.cumsum((0, *MEMBER_HEADS))
    within = sum(k * r[:, a:b].var(1, unbiased=False) for k, a, b in zip(MEMBER_HEADS, cuts[:-1], cuts[1:], strict=True))
    assert (out.var - within.numpy() / cuts[-1] > 0.1).all()
    assert out.epistemic is not None and out.epistemic.shape == (13,)


def test_the_engine_reports_the_kernels_statistics(members_ensemble, monkeypatch):
    """One source of truth: shift every member's kernel mean by c, and the ensemble mean moves by c
    while its variance stays (the engine does not recompute them from the rewards)."""
    model = load_model(members_ensemble)
    seqs = random_seqs(5, 300, seed=6)
    before = ScoringEngine(model).score(seqs)
    real = heads.last_token_scores

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        out.mean += 100.0
        return out

    monkeypatch.setattr(heads, "last_token_scores", shifted)
    after = ScoringEngine(model).score(seqs)
    np.testing.assert_array_equal(after.rewards, before.rewards)
    np.testing.assert_allclose(after.mean, before.mean + 100.0, rtol=1e-6)
    np.testing.assert_allclose(after.var, before.var, rtol=1e-5, atol=1e-6)


def test_combine_member_stats_equals_numpy_on_random_splits():
    """Seeded random cases: rewards [N, K] cut into members of random sizes K_m >= 1; the combined
    statistics equal numpy's over all K columns, also with |mean| >> std (no cancellation)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, k = int(rng.integers(1, 6)), int(rng.integers(1, 17))
        loc, std = (1e6, 1.0) if trial % 3 == 0 else (rng.normal(0, 10), float(rng.uniform(0.01, 10)))
        x = rng.normal(loc, std, size=(n, k))
        cuts = np.sort(rng.choice(np.arange(1, k), size=int(rng.integers(0, k)), replace=False))
        parts = [torch.from_numpy(p) for p in np.split(x, cuts, axis=1)]
        mean, var, low = combine_member_stats(
            [p.shape[1] for p in parts], [p.mean(1) for p in parts],
            [p.var(1, unbiased=False) for p in parts], [p.amin(1) for p in parts],
        )
        np.testing.assert_allclose(mean.numpy(), x.mean(1), rtol=1e-12, err_msg=f"trial {trial}")
        np.testing.assert_allclose(var.numpy(), x.var(1), rtol=1e-7, atol=1e-12 * loc**2, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(low.numpy(), x.min(1))
    one = [torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 0.0])], [torch.tensor([0.0, 2.0])]
    assert all(a is b[0] for a, b in zip(combine_member_stats([3], *one), one, strict=True))
