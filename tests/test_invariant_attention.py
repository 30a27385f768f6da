"""Batch-invariant attention (service/engine/invariant_attention.py): right, and bit-for-bit the same
for a sequence whatever it is batched with, on both of its paths: the fixed-order CPU kernel
(rmserve.kernels.cpu_attention) and the grid of sdpa calls that serves where the kernel is not built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmserve.kernels import cpu_attention
from rmserve.service.engine import invariant_attention as inv
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine


def reference(q, k, v, q_pos, k_len, scaling, window=None):
    """Plain masked softmax attention in float64, one row group at a time."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for i in range(q.shape[0]):
        kk = k[i].double().repeat_interleave(rep, 0)
        vv = v[i].double().repeat_interleave(rep, 0)
        j = torch.arange(k.shape[2])[None, :]
        p = q_pos[i][:, None]
        mask = (j <= p) & (j < k_len[i])
        if window is not None:
            mask &= j > p - window
        s = (q[i].double() @ kk.transpose(-1, -2)) * scaling
        out[i] = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
    return out


@pytest.mark.parametrize(("tq", "tk", "offset", "window"), [(1, 1, 0, None), (37, 37, 0, None), (70, 70, 0, 20),
                                                             (5, 133, 128, None), (64, 200, 136, 50),
                                                             (130, 130, 0, None)])
def test_block_attention_matches_a_float64_reference(tq, tk, offset, window):
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    n, hq, hkv, d = 3, 6, 2, 16
    q = torch.randn(n, hq, tq, d, generator=g)
    k, v = torch.randn(n, hkv, tk, d, generator=g), torch.randn(n, hkv, tk, d, generator=g)
    k_len = torch.tensor([tk, max(1, tk - 3), max(1, tk // 2)])
    q_pos = (offset + torch.arange(tq)).expand(n, tq)
    out = inv.block_attention(q, k, v, offset, k_len, scaling=d**-0.5, window=window)
    want = reference(q, k, v, q_pos, k_len, d**-0.5, window)
    assert out.dtype == torch.float32 and out.shape == q.shape
    for i in range(n):  # rows past a row group's valid keys are padding: not compared
        rows = q_pos[i] < k_len[i]
        torch.testing.assert_close(out[i][:, rows].double(), want[i][:, rows], rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["kernel", "sdpa_grid"])
def path(request, monkeypatch):
    """Run the test on the CPU kernel, then on the sdpa grid (the kernel reported unavailable)."""
    if request.param == "kernel" and not cpu_attention.available():
        pytest.skip(f"kernel not built: {cpu_attention.unavailable_reason()}")
    if request.param == "sdpa_grid":
        monkeypatch.setattr(cpu_attention, "available", lambda: False)
    return request.param


def _switched(model):
    for m in model.members:
        assert inv.enable(m.backbone.model)
    return model


def test_the_model_scores_as_with_sdpa_in_float32(tiny_ensemble, path):
    seqs = [[5, 6, 7], list(range(10, 90)), list(range(3, 140)), [9] * 65]
    want = ScoringEngine(load_model(tiny_ensemble, fused=False), min_shared_prefix=0).score(seqs).rewards
    got = ScoringEngine(_switched(load_model(tiny_ensemble)), min_shared_prefix=0).score(seqs).rewards
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sequence_scores_the_same_in_every_batching(tiny_ensemble, dtype, path):
    """The backbone's output is bit-identical; the heads' small fp32 matmul may round its last bit
    differently for one row than for many, so scores are compared to 1e-5 x std (sdpa in bf16: ~5e-2)."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(1, 200, 70).tolist()
    seqs = [rng.integers(1, 200, int(n)).tolist() for n in (3, 64, 65, 100, 150)]
    seqs += [prompt + rng.integers(1, 200, int(n)).tolist() for n in (2, 9, 40)]  # one GRPO-like group
    model = _switched(load_model(tiny_ensemble, dtype=dtype))
    runs = {
        "alone": np.concatenate([ScoringEngine(model, min_shared_prefix=0).score([s]).rewards for s in seqs]),
        "padded": ScoringEngine(model, packing="off", min_shared_prefix=0).score(seqs).rewards,
        "packed": ScoringEngine(model, packing="on", min_shared_prefix=0).score(seqs).rewards,
        "grouped": ScoringEngine(model, packing="off", min_shared_prefix=16).score(seqs).rewards,
        "reversed": ScoringEngine(model, packing="off", min_shared_prefix=0).score(seqs[::-1]).rewards[::-1],
    }
    std = float(runs["alone"].std())
    for name, r in runs.items():
        assert np.abs(r - runs["alone"]).max() <= 1e-5 * std, name


def test_the_backbone_output_is_bit_identical_padded_packed_and_alone(tiny_ensemble, path):
    rng = np.random.default_rng(4)
    seqs = [rng.integers(1, 200, int(n)).tolist() for n in (1, 63, 64, 65, 129, 7)]
    model = _switched(load_model(tiny_ensemble, dtype="bfloat16"))
    alone = torch.cat([ScoringEngine(model).features([s]) for s in seqs])
    padded = ScoringEngine(model, packing="off").features(seqs)
    packed = ScoringEngine(model, packing="on").features(seqs)
    assert torch.equal(padded, alone) and torch.equal(packed, alone)


def test_an_encoder_keeps_its_own_bidirectional_attention(tiny_bert_seqcls):
    bb = load_model(tiny_bert_seqcls).members[0].backbone.model
    assert not inv.enable(bb) and bb.config._attn_implementation != inv.ATTN_NAME
