"""Members sharing a trunk (service/engine/trunk.py): one forward of the shared layers, each
member's own top layers, and scores equal to each member's run alone on its own backbone, on
every path the engine has (padded, packed, GRPO prefix sharing, bf16 on CPU), whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmserve.service.engine import invariant_attention as inv
from rmserve.service.engine.ensemble import (
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    save_member,
    write_manifest,
)
from rmserve.service.engine.model import load_model, native_bf16_cpu
from rmserve.service.engine.scoring import ScoringEngine, families

H = 32

# (name, cut, trained layers, trains the final norm): top layers of a 4-layer base, and other cuts
MEMBERS = [
    ("last2", None, [2, 3], True),
    ("last1", None, [3], False),
    ("cut2", 2, [], False),          # frozen, another depth: only its own norm
    ("cut3-last1", 3, [2], True),
]


def _deltas(backbone_dir) -> dict[str, dict[str, torch.Tensor]]:
    base = load_file(backbone_dir / "model.safetensors")
    g = torch.Generator().manual_seed(11)
    out = {}
    for name, _, layers, norm in MEMBERS:
        d = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()
             if any(k.startswith(f"layers.{i}.") for i in layers) or (norm and k == "norm.weight")}
        out[name] = d
    return out


def _write(out, backbone, members) -> None:
    specs = []
    for name, cut, delta in members:
        g = torch.Generator().manual_seed(sum(map(ord, name)))  # a member's heads, wherever it is written
        spec = MemberSpec(name=name, backbone=str(backbone), num_layers=cut)
        save_member(out, spec, MemberTensors(weight=torch.randn(3, H, generator=g), bias=torch.randn(3, generator=g),
                                             delta=delta or None, unc_factor=torch.randn(H, H, generator=g) / H))
        specs.append(spec)
    write_manifest(out, EnsembleManifest(name="members", version="v1", kind="members", members=specs, max_tokens=128))


@pytest.fixture(scope="module")
def ensembles(tiny_llama4_backbone, tmp_path_factory):
    deltas = _deltas(tiny_llama4_backbone)
    root = tmp_path_factory.mktemp("trunk")
    _write(root / "shared", tiny_llama4_backbone, [(n, c, deltas[n]) for n, c, _, _ in MEMBERS])
    alone = []
    for n, c, _, _ in MEMBERS:  # each member as an ensemble of its own: a backbone of its own
        _write(root / n, tiny_llama4_backbone, [(n, c, deltas[n])])
        alone.append(root / n)
    return root / "shared", alone


def _seqs(n: int = 9, prefix: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(3)
    head = rng.integers(5, 200, prefix).tolist()
    return [head + rng.integers(5, 200, int(rng.integers(3, 40))).tolist() for _ in range(n)]


def test_members_share_one_backbone_and_keep_their_own_layers(ensembles):
    shared, _ = ensembles
    model = load_model(shared)
    (fam,) = families(model)
    assert fam.shared and len(fam.members) == 4
    assert [m.top.start for m in model.members] == [2, 3, 2, 2]
    assert [len(m.top.layers) for m in model.members] == [2, 1, 0, 1]
    # the base runs to its deepest cut once; the members' layers are their own copies
    assert model.members[0].top.layers[0] is not model.members[3].top.layers[0]


@pytest.mark.parametrize("packing", ["off", "on"])
@pytest.mark.parametrize("prefix", [0, 24])
def test_shared_trunk_scores_equal_each_member_alone(ensembles, packing, prefix):
    shared, alone = ensembles
    seqs = _seqs(prefix=prefix)
    sharing = 16 if prefix else 0
    out = ScoringEngine(load_model(shared), packing=packing, min_shared_prefix=sharing).score(seqs)
    want = _alone_rewards(alone, seqs, packing, sharing)
    np.testing.assert_allclose(out.rewards, want, rtol=0, atol=2e-6)
    # and the statistics combine the members' heads
    np.testing.assert_allclose(out.mean, want.mean(1), atol=2e-6)
    np.testing.assert_allclose(out.var, want.var(1), atol=2e-6)


def _alone_rewards(alone, seqs, packing: str = "off", min_shared_prefix: int = 0) -> np.ndarray:
    """Each member as an ensemble of its own, on a backbone of its own: the reference."""
    return np.concatenate([ScoringEngine(load_model(p), packing=packing, min_shared_prefix=min_shared_prefix)
                           .score(seqs).rewards for p in alone], axis=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_member_is_batch_invariant_on_the_invariant_attention(ensembles, dtype):
    """As for one backbone (tests/test_invariant_attention.py): each member's features are
    bit-identical alone, padded, packed; scores agree to 1e-5 x std (the heads' fp32 matmul)."""
    shared, _ = ensembles
    model = load_model(shared, dtype=dtype)
    assert inv.enable(model.members[0].backbone.model)  # the members' layers share its config
    seqs = _seqs(6)
    for i in range(len(model.members)):
        alone = torch.cat([ScoringEngine(model, min_shared_prefix=0).features([s], member=i) for s in seqs])
        padded = ScoringEngine(model, packing="off", min_shared_prefix=0).features(seqs, member=i)
        packed = ScoringEngine(model, packing="on", min_shared_prefix=0).features(seqs, member=i)
        assert torch.equal(padded, alone) and torch.equal(packed, alone), model.members[i].name
    engine = ScoringEngine(model, packing="off", min_shared_prefix=0)
    together = engine.score(seqs).rewards
    one_by_one = np.concatenate([engine.score([s]).rewards for s in seqs])
    assert np.abs(together - one_by_one).max() <= 1e-5 * float(one_by_one.std())


@pytest.mark.skipif(not native_bf16_cpu(), reason="bf16 serves as float32 on a CPU without native bf16")
def test_bf16_on_cpu_shared_trunk_equals_each_member_alone(ensembles):
    shared, alone = ensembles
    seqs = _seqs(6)
    got = ScoringEngine(load_model(shared, dtype="bfloat16"), min_shared_prefix=0).score(seqs).rewards
    want = np.concatenate([ScoringEngine(load_model(p, dtype="bfloat16"), min_shared_prefix=0).score(seqs).rewards
                           for p in alone], axis=1)
    assert np.abs(got - want).max() <= 1e-5 * float(want.std())


def test_features_of_a_member_are_what_its_heads_read(ensembles):
    shared, alone = ensembles
    model = load_model(shared)
    seqs = _seqs(4)
    for i, path in enumerate(alone):
        got = ScoringEngine(model).features(seqs, member=i)
        want = ScoringEngine(load_model(path)).features(seqs)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
