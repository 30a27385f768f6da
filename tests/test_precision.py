"""Served precision: `--dtype bfloat16` on CPU is bf16 matmuls over a float32 residual stream,
and a sample's score must not depend on what it is batched with (GRPO's group-relative
advantages would inherit that noise)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rmserve.service.engine.model import load_model
from rmserve.service.engine.precision import MixedLinear
from rmserve.service.engine.scoring import ScoringEngine
from tests.helpers import cpu_flags


def batchings(model, seqs: list[list[int]]) -> dict[str, np.ndarray]:
    """Rewards [N, K] of the same sequences: alone, padded batches, one packed stream, prefix-shared groups."""
    out = {"alone": np.concatenate([ScoringEngine(model, min_shared_prefix=0).score([s]).rewards for s in seqs])}
    out["padded"] = ScoringEngine(model, packing="off", min_shared_prefix=0).score(seqs).rewards
    out["packed"] = ScoringEngine(model, packing="on", min_shared_prefix=0).score(seqs).rewards
    out["grouped"] = ScoringEngine(model, packing="off", min_shared_prefix=16).score(seqs).rewards
    return out


def workload(vocab: int, seed: int) -> list[list[int]]:
    """Loose sequences of mixed lengths plus two GRPO-like groups (one prompt, several completions)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    seqs = [tok(rng.randint(4, 120)) for _ in range(8)]
    for _ in range(2):
        prompt = tok(rng.randint(40, 90))
        seqs += [prompt + tok(rng.randint(3, 30)) for _ in range(4)]
    rng.shuffle(seqs)
    return seqs


def test_bfloat16_on_cpu_is_bf16_matmuls_over_a_float32_stream(tiny_ensemble):
    model = load_model(tiny_ensemble, dtype="bfloat16")
    net = model.members[0].backbone.model
    linears = [m for m in net.modules() if isinstance(m, MixedLinear)]
    assert model.dtype_name == "bfloat16" and len(linears) == 2 * 7  # q k v o gate up down, 2 layers
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert not any(type(m) is torch.nn.Linear for m in net.modules())
    assert net.embed_tokens.weight.dtype == torch.float32 and net.norm.weight.dtype == torch.float32
    seqs = workload(200, seed=1)
    exact = ScoringEngine(load_model(tiny_ensemble, dtype="float32")).score(seqs).rewards
    mixed = ScoringEngine(model).score(seqs).rewards
    std = float(exact.std())
    assert 0 < np.abs(mixed - exact).max() < 0.05 * std  # really bf16 (not equal), and close


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scores_do_not_depend_on_the_batch_on_the_embedded_backbone(smollm2_ensemble, dtype):
    model = load_model(smollm2_ensemble, dtype=dtype)
    seqs = workload(len(model.encoder.tokenizer), seed=2)
    out = batchings(model, seqs)
    std = float(out["padded"].std(0).mean())
    worst = max(float(np.abs(out[a] - out[b]).max()) for a in out for b in out)
    assert worst < (1e-4 if dtype == "float32" else 0.02) * std, (worst, std)


def test_auto_serves_a_bf16_manifest_in_bf16_only_on_a_cpu_with_native_bf16(tiny_ensemble, tmp_path, monkeypatch):
    import json
    import shutil

    from rmserve.service.engine import model as model_mod

    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_ensemble, bf16_dir)
    manifest = json.loads((bf16_dir / "manifest.json").read_text())
    (bf16_dir / "manifest.json").write_text(json.dumps({**manifest, "dtype": "bfloat16"}))
    monkeypatch.setattr(model_mod, "native_bf16_cpu", lambda: False)
    assert load_model(bf16_dir).dtype_name == "float32"                     # emulated bf16 would be slower
    assert load_model(bf16_dir, dtype="bfloat16").dtype_name == "bfloat16"  # an explicit choice stands
    monkeypatch.setattr(model_mod, "native_bf16_cpu", lambda: True)
    rm = load_model(bf16_dir)
    assert rm.dtype_name == "bfloat16"
    assert any(isinstance(m, MixedLinear) for m in rm.members[0].backbone.model.modules())


@pytest.mark.parametrize(("cap", "native"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", None),
                                             ("AVX512_CORE_AMX", None), ("", None)])
def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16(monkeypatch, cap, native):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN emulates bf16, so `auto` must not pick it; a cap that
    keeps the bf16 instructions (or none) leaves the answer to the CPU's own flags (None)."""
    from rmserve.service.engine.model import native_bf16_cpu

    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    flags = cpu_flags()  # the kernel's list, not torch's private probes
    if native is None and not flags:
        pytest.skip("the CPU's own flags are read from /proc/cpuinfo (Linux)")
    cpu_has_it = bool({"avx512_bf16", "amx_tile"} & flags)
    assert native_bf16_cpu() is (cpu_has_it if native is None else native)


def test_the_fused_gated_mlp_computes_the_unfused_bits(tiny_ensemble):
    """fuse_gated_mlps changes how silu(gate) * up runs, not what it rounds: the backbone's hidden
    states are bit-identical to mixed_bf16's unfused MLPs, for any batch."""
    from rmserve.service.engine import invariant_attention
    from rmserve.service.engine.precision import MixedGatedMLP, fuse_gated_mlps, mixed_bf16

    fused = load_model(tiny_ensemble, dtype="bfloat16").members[0].backbone.model
    assert sum(isinstance(m, MixedGatedMLP) for m in fused.modules()) == 2  # one per layer, applied at load
    plain = load_model(tiny_ensemble, dtype="float32", fused=False).members[0].backbone.model
    assert mixed_bf16(plain) == 14 and fuse_gated_mlps(torch.nn.Module()) == 0
    assert invariant_attention.enable(plain)  # the same attention on both sides: only the MLPs differ
    for layer in plain.layers:  # the unfused mixed path: MixedLinears under the original MLP
        assert isinstance(layer.mlp.gate_proj, MixedLinear) and not isinstance(layer.mlp, MixedGatedMLP)
    g = torch.Generator().manual_seed(4)
    for b, t in ((1, 1), (3, 17), (5, 64)):
        ids = torch.randint(1, 200, (b, t), generator=g)
        with torch.no_grad():
            for lf, lp in zip(fused.layers, plain.layers, strict=True):
                x = torch.randn(b, t, lf.mlp.gate_proj.in_features, generator=g)
                assert torch.equal(lf.mlp(x), lp.mlp(x))
            assert torch.equal(fused(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state)


def test_prepacked_bf16_weights_give_f_linear_bits(tiny_ensemble, monkeypatch):
    """With RMSERVE_PREPACK=1 every bf16 projection runs on oneDNN weights packed at load; each computes F.linear's bits
    on fresh inputs of any row count and rank, and the backbone's hidden states equal those of
    a model loaded without packing."""
    import torch.nn.functional as F

    from rmserve.service.engine import precision

    if not precision._prepack_probe():
        pytest.skip("this torch has no oneDNN prepacked linear")
    monkeypatch.setenv("RMSERVE_PREPACK", "1")
    packed = load_model(tiny_ensemble, dtype="bfloat16").members[0].backbone.model
    linears = [m for m in packed.modules() if isinstance(m, MixedLinear)]
    assert len(linears) == 14 and all(m.packed is not None for m in linears)
    g = torch.Generator().manual_seed(6)
    for lin in linears:
        for shape in ((1,), (5,), (63,), (300,), (3, 17)):
            x = torch.randn(*shape, lin.in_features, generator=g).bfloat16()
            assert torch.equal(lin.mm(x), F.linear(x, lin.weight)), shape
    monkeypatch.delenv("RMSERVE_PREPACK")   # the default: F.linear
    plain = load_model(tiny_ensemble, dtype="bfloat16").members[0].backbone.model
    assert all(m.packed is None for m in plain.modules() if isinstance(m, MixedLinear))
    for b, t in ((1, 1), (3, 17), (2, 90)):
        ids = torch.randint(1, 200, (b, t), generator=g)
        with torch.no_grad():
            assert torch.equal(packed(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state)


def test_the_compiled_loop_equals_the_eager_function_on_odd_sizes():
    """Inductor's vector loop and its tail must round as the eager ops do, whatever the length."""
    from rmserve.service.engine.precision import _fused_silu_mul, _silu_mul

    fn = _fused_silu_mul()
    g = torch.Generator().manual_seed(5)
    for shape in ((1, 1), (7, 1537), (2, 3, 33), (130, 1536)):
        a = (3 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        b = (3 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        assert torch.equal(fn(a, b), _silu_mul(a, b)), shape


def test_float32_on_cpu_fuses_mlps_and_scores_as_the_checkpoint(tiny_ensemble):
    """load_model(float32) on CPU swaps the gated MLPs for compiled loops; scores stay within
    1e-5 x std of the checkpoint's own modules (fused=False), for every batching, and each fused
    MLP computes what it replaced on fresh inputs of odd sizes."""
    from rmserve.service.engine.precision import FusedGatedMLP

    fused = load_model(tiny_ensemble, dtype="float32")
    plain = load_model(tiny_ensemble, dtype="float32", fused=False)
    fm, pm = fused.members[0].backbone.model, plain.members[0].backbone.model
    assert sum(isinstance(m, FusedGatedMLP) for m in fm.modules()) == 2
    assert not any(isinstance(m, FusedGatedMLP) for m in pm.modules())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for lf, lp in zip(fm.layers, pm.layers, strict=True):
            for shape in ((1, 1), (3, 17), (1, 130)):
                x = torch.randn(*shape, lf.mlp.gate_proj.in_features, generator=g)
                torch.testing.assert_close(lf.mlp(x), lp.mlp(x), rtol=1e-5, atol=1e-6)
    seqs = workload(200, seed=7)
    got, want = batchings(fused, seqs), batchings(plain, seqs)
    std = float(want["alone"].std())
    for how in got:
        assert np.abs(got[how] - want[how]).max() <= 1e-5 * std, how
        assert np.abs(got[how] - got["alone"]).max() <= 1e-5 * std, how


def test_the_float32_loop_compiles_where_the_bf16_one_does_and_matches_eager():
    """A probe that is too strict silently sends a loop back to eager (it did: fp32 silu differs
    from eager's in the last bit); where this machine compiles at all, the float32 loop must
    compile too, and match its eager function to float32 rounding on odd sizes."""
    from rmserve.service.engine.precision import _compiled, _silu_mul, _silu_mul_fp32

    if _compiled(_silu_mul) is _silu_mul:
        pytest.skip("torch.compile is unavailable here (no C++ compiler or RMSERVE_COMPILE=0)")
    g = torch.Generator().manual_seed(8)
    silu = _compiled(_silu_mul_fp32)
    assert silu is not _silu_mul_fp32
    for shape in ((1, 1), (7, 1537), (2, 3, 33), (1, 130, 576)):
        a, b = 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
        torch.testing.assert_close(silu(a, b), _silu_mul_fp32(a, b), rtol=1e-5, atol=1e-6)
