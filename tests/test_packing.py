"""Padding-free (packed) batches, OOM splitting and budget sizing, all on CPU.

The packed path is what the engine runs on CUDA; on CPU the same code runs with
per-sequence sdpa in place of FlashAttention varlen, so the checks here are
exact (fp32): no attention crosses a sequence boundary, positions restart per
sequence, and each packed score equals the sequence's score alone.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rmserve.service.engine import varlen
from rmserve.service.engine.backbone import wrap_backbone
from rmserve.service.engine.contract import is_oom, plan_batches
from rmserve.service.engine.errors import EngineOutOfMemory
from rmserve.service.engine.model import Member, RewardModel, load_model
from rmserve.service.engine.scoring import ScoringEngine, budget_from_memory

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
)


def _llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(**COMMON))


def _qwen2():
    from transformers import Qwen2Config, Qwen2Model

    return Qwen2Model(Qwen2Config(**COMMON))


def _mistral():
    from transformers import MistralConfig, MistralModel

    # a window shorter than the longest test sequence, so the window is exercised
    return MistralModel(MistralConfig(**COMMON, sliding_window=16))


def _gemma():
    from transformers import GemmaConfig, GemmaModel

    return GemmaModel(GemmaConfig(**COMMON, head_dim=8))


ARCHS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma": _gemma}


def tiny_model(arch: str = "llama", heads: int = 3, seed: int = 0, epistemic: bool = True) -> RewardModel:
    """A RewardModel over a random tiny decoder; token ids only (a stub tokenizer gives the pad id)."""
    torch.manual_seed(seed)
    backbone = wrap_backbone(ARCHS[arch](), SimpleNamespace(pad_token_id=0), f"tiny-{arch}")
    g = torch.Generator().manual_seed(seed)
    h = backbone.hidden_size
    member = Member(
        "member0", backbone, torch.randn(heads, h, generator=g), torch.randn(heads, generator=g),
        torch.randn(h, h, generator=g) / h if epistemic else None,
    )
    return RewardModel(
        name=arch, version="t", kind="heads", members=[member], encoder=None, dtype=torch.float32,
        max_tokens=512, uncertainty_penalty=0.0, shift=[0.0] * heads, scale=[1.0] * heads, source="test",
    )


def random_seqs(n: int, lo: int = 1, hi: int = 40, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(model: RewardModel, seqs: list[list[int]]) -> np.ndarray:
    engine = ScoringEngine(model, packing="off", min_shared_prefix=0)
    return np.stack([engine.score([s]).rewards[0] for s in seqs])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_packed_score_equals_its_score_alone(arch):
    model = tiny_model(arch)
    seqs = [*random_seqs(19, seed=1), [7]]  # a one-token sequence too
    packed = ScoringEngine(model, packing="on", token_budget=160, min_shared_prefix=0).score(seqs)
    assert model.members[0].backbone.model.config._attn_implementation == varlen.ATTN_NAME
    assert packed.stats.padded_tokens == packed.stats.real_tokens == sum(map(len, seqs))
    assert packed.stats.batches > 1
    np.testing.assert_allclose(packed.rewards, alone(model, seqs), rtol=1e-4, atol=1e-4)
    # the switched model still serves padded batches exactly as sdpa does
    padded = ScoringEngine(model, packing="off", token_budget=160, min_shared_prefix=0).score(seqs)
    np.testing.assert_allclose(padded.rewards, packed.rewards, rtol=1e-4, atol=1e-4)
    assert np.allclose(packed.epistemic, padded.epistemic, rtol=1e-4, atol=1e-4)


def test_no_attention_crosses_a_sequence_boundary():
    """Changing one sequence of a pack leaves its neighbours' scores bit-for-bit alone."""
    model = tiny_model("llama")
    seqs = random_seqs(6, lo=5, hi=20, seed=2)
    engine = ScoringEngine(model, packing="on", token_budget=4096, min_shared_prefix=0)
    before = engine.score(seqs)
    assert before.stats.batches == 1
    changed = [list(s) for s in seqs]
    changed[2] = [(t * 7 + 3) % VOCAB for t in changed[2]]
    after = engine.score(changed)
    others = [i for i in range(len(seqs)) if i != 2]
    np.testing.assert_allclose(after.rewards[others], before.rewards[others], rtol=0, atol=1e-6)
    assert not np.allclose(after.rewards[2], before.rewards[2])


@pytest.mark.parametrize("kernel", [True, False])
def test_packing_auto_packs_on_cpu_unless_bf16_attention_needs_rows_and_on_rejects_encoders(
        tiny_bert_seqcls, tiny_ensemble, kernel, monkeypatch):
    """bf16 on CPU packs when the fixed-order kernel attends the stream in place; on the sdpa grid,
    which gathers a stream back into padded rows, it pads."""
    from rmserve.kernels import cpu_attention

    if kernel and not cpu_attention.available():
        pytest.skip(f"kernel not built: {cpu_attention.unavailable_reason()}")
    if not kernel:
        monkeypatch.setattr(cpu_attention, "available", lambda: False)
    model = tiny_model("llama")
    engine = ScoringEngine(model)
    assert engine.device.type == "cpu" and engine.packs(model.members[0])
    out = engine.score(random_seqs(8, seed=3))
    assert out.stats.padded_tokens == out.stats.real_tokens
    bf16 = load_model(tiny_ensemble, dtype="bfloat16")
    out = ScoringEngine(bf16, min_shared_prefix=0).score(random_seqs(8, seed=3))
    assert ScoringEngine(bf16).packs(bf16.members[0]) == kernel
    assert (out.stats.padded_tokens > out.stats.real_tokens) != kernel
    encoder = load_model(tiny_bert_seqcls)
    assert not ScoringEngine(encoder).packs(encoder.members[0])
    with pytest.raises(ValueError, match="packing"):
        ScoringEngine(encoder, packing="on")
    with pytest.raises(ValueError, match="auto, on or off"):
        ScoringEngine(model, packing="yes")


def test_packed_features_and_prefix_groups_equal_the_padded_path():
    model = tiny_model("qwen2")
    rng = random.Random(4)
    prompt = [rng.randrange(1, VOCAB) for _ in range(24)]
    seqs = [prompt + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))] for _ in range(5)]
    seqs += random_seqs(5, seed=5)
    packed = ScoringEngine(model, packing="on", token_budget=64, min_shared_prefix=16)
    padded = ScoringEngine(model, packing="off", token_budget=64, min_shared_prefix=0)
    torch.testing.assert_close(packed.features(seqs), padded.features(seqs), rtol=1e-4, atol=1e-4)
    out = packed.score(seqs)
    assert out.stats.real_tokens == sum(map(len, seqs)) - 4 * 24  # the prompt encoded once
    np.testing.assert_allclose(out.rewards, padded.score(seqs).rewards, rtol=1e-4, atol=1e-4)


def test_plan_packed_fills_the_real_token_budget():
    lengths = [5, 100, 7, 30, 31, 2, 64, 64, 300]
    batches = plan_batches(lengths, token_budget=128, max_batch=3, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        if len(b) > 1:
            assert sum(lengths[i] for i in b) <= 128
    assert [8] in batches  # longer than the budget: a batch of its own
    assert len(plan_batches([10] * 12, token_budget=40, max_batch=100, packed=True)) == 3  # no padding counted


def _fail_above(monkeypatch, model: RewardModel, max_tokens: int, err: Exception) -> list[int]:
    """Make the backbone raise `err` for forwards over max_tokens tokens; returns the sizes it ran."""
    net = model.members[0].backbone.model
    forward = net.forward
    seen: list[int] = []

    def fake(*args, **kwargs):
        n = kwargs["input_ids"].numel()
        if n > max_tokens:
            raise err
        seen.append(n)
        return forward(*args, **kwargs)

    monkeypatch.setattr(net, "forward", fake)
    return seen


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("err", [torch.OutOfMemoryError("CUDA out of memory (fake)"),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory (fake)")])
def test_out_of_memory_splits_the_batch_and_every_score_comes_back(monkeypatch, packing, err):
    model = tiny_model("llama")
    seqs = random_seqs(16, lo=4, hi=24, seed=6)
    want = alone(model, seqs)
    seen = _fail_above(monkeypatch, model, 48, err)
    out = ScoringEngine(model, packing=packing, token_budget=4096, min_shared_prefix=0).score(seqs)
    assert out.stats.oom_splits > 0 and max(seen) <= 48
    np.testing.assert_allclose(out.rewards, want, rtol=1e-4, atol=1e-4)


def test_one_sequence_that_does_not_fit_fails_clearly(monkeypatch):
    model = tiny_model("llama")
    _fail_above(monkeypatch, model, 10, torch.OutOfMemoryError("CUDA out of memory (fake)"))
    with pytest.raises(EngineOutOfMemory, match="even alone"):
        ScoringEngine(model, packing="on", min_shared_prefix=0).score([[1] * 5, [2] * 30])


def test_other_errors_are_not_mistaken_for_out_of_memory(monkeypatch):
    model = tiny_model("llama")
    _fail_above(monkeypatch, model, 0, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ScoringEngine(model, min_shared_prefix=0).score(random_seqs(4))
    assert is_oom(torch.OutOfMemoryError("x")) and not is_oom(ValueError("out of memory"))


def test_budget_from_memory_arithmetic():
    gib = 1 << 30
    # 2 KiB of activations per token, 10 GiB free, 90% of it: 4.72M tokens -> capped at the ceiling
    assert budget_from_memory(10 * gib, 4096, 4096 * 2048, fraction=0.9) == 1 << 20
    # 1 MiB per token, 1 GiB free at 50%: 512 tokens
    assert budget_from_memory(gib, 100, 100 << 20, fraction=0.5) == 512
    # rounded down to the granularity, never under the floor
    assert budget_from_memory(gib, 1, 1 << 20, fraction=0.7, granularity=256) == 512  # 716.8 -> 512
    assert budget_from_memory(1 << 20, 1, 1 << 20) == 256
    with pytest.raises(ValueError):
        budget_from_memory(gib, 0, 1)
    with pytest.raises(ValueError):
        budget_from_memory(gib, 1, 1, fraction=1.5)


def test_cpu_keeps_the_configured_budget():
    model = tiny_model("llama")
    engine = ScoringEngine(model, token_budget=777)
    engine.score(random_seqs(3))
    assert engine.token_budget == 777


def test_packing_on_the_embedded_backbone(smollm2_ensemble):
    """SmolLM2 (the default's backbone): packed scores equal padded ones in fp32."""
    model = load_model(smollm2_ensemble)
    seqs = random_seqs(5, lo=3, hi=24, seed=7)
    padded = ScoringEngine(model, packing="off", min_shared_prefix=0).score(seqs)
    packed = ScoringEngine(model, packing="on", min_shared_prefix=0).score(seqs)
    scale = max(float(padded.mean.std()), 1e-3)
    assert np.abs(packed.rewards - padded.rewards).max() <= 1e-3 * scale + 1e-5


def _documented_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn as its docstring specifies it ([T, H, D], int32 cu_seq,
    window (left, right) with (-1, 0) causal), on CPU: checks what the CUDA branch hands FlashAttention."""
    assert q.ndim == k.ndim == 3 and q.is_contiguous() and cu_q.dtype == torch.int32
    assert max_q == int(cu_q.diff().max()) and torch.equal(cu_q, cu_k)
    assert enable_gqa == (q.shape[1] != k.shape[1])
    out = torch.empty_like(q)
    left, right = window_size
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        i, j = torch.arange(e - s)[:, None], torch.arange(e - s)[None, :]
        mask = torch.ones(e - s, e - s, dtype=torch.bool)
        if right >= 0:
            mask &= j <= i + right
        if left >= 0:
            mask &= j >= i - left
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=enable_gqa,
        ).transpose(0, 1)
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma"])
def test_the_cuda_branch_calls_varlen_attn_as_documented(monkeypatch, arch):
    """The FlashAttention branch (layout, causal/window convention, GQA) driven on CPU through a
    reference varlen_attn: no GPU here, so this is what guards the code the GPU runs."""
    import torch.nn.attention.varlen as torch_varlen

    model = tiny_model(arch)
    seqs = random_seqs(9, seed=8)
    want = alone(model, seqs)
    monkeypatch.setattr(torch_varlen, "varlen_attn", _documented_varlen_attn)
    monkeypatch.setattr(varlen, "_use_flash", lambda q: True)
    out = ScoringEngine(model, packing="on", min_shared_prefix=0).score(seqs)
    np.testing.assert_allclose(out.rewards, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_switched_model_serves_unpacked_calls_exactly_like_sdpa(arch):
    """Padded batches, a KV cache with and without a mask, a window longer than the sequence."""
    from rmserve.service.engine.scoring import _cache_kwarg

    net = tiny_model(arch).members[0].backbone.model
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            padded = net(input_ids=ids, attention_mask=mask).last_hidden_state
            first = net(input_ids=ids[:1, :25], use_cache=True)
            cache = first.cache if "cache" in first else first.past_key_values
            cached = net(input_ids=ids[:1, 25:], **{_cache_kwarg(net): cache}).last_hidden_state
            single = net(input_ids=ids[:1]).last_hidden_state
        return [padded[0], padded[1, :30], cached, single]

    before = run()
    assert varlen.enable_packing(net)
    for a, b in zip(before, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mixed_bf16_serves_every_architecture_over_a_float32_stream(arch):
    """bf16 linears over a float32 residual stream with the invariant attention, on every
    architecture: the stream stays float32, and scores stay near float32 and batch-free."""
    from rmserve.service.engine import invariant_attention
    from rmserve.service.engine.precision import mixed_bf16

    seqs = random_seqs(12, hi=90, seed=5)
    exact = alone(tiny_model(arch), seqs)
    model = tiny_model(arch)
    net = model.members[0].backbone.model
    assert mixed_bf16(net) == 7 * COMMON["num_hidden_layers"] and invariant_attention.enable(net)
    with torch.inference_mode():
        hidden = net(input_ids=torch.tensor([seqs[0]]), output_hidden_states=True).hidden_states
    assert all(h.dtype == torch.float32 for h in hidden)
    mixed = alone(model, seqs)
    assert np.isfinite(mixed).all() and 0 < np.abs(mixed - exact).max() < 0.05 * exact.std()
    for packing in ("on", "off"):
        batched = ScoringEngine(model, packing=packing, token_budget=300, min_shared_prefix=0).score(seqs)
        assert np.abs(batched.rewards - mixed).max() <= 1e-5 * mixed.std(), packing
