"""bench/common.py: the one FLOP count behind bench_cpu.py's "of ceiling" and bench_gpu.py's MFU,
against counts done by hand for tiny Llama configs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import bench scripts as `python bench/<script>.py` does: bench/ first on sys.path."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def tiny_llama(**kw) -> LlamaModel:
    cfg = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(**{**cfg, **kw}))


def test_causal_pairs_count_the_diagonal_and_the_cached_keys(bench) -> None:
    common = bench("common")
    assert [common.causal_pairs(n) for n in (0, 1, 2, 3, 5)] == [0, 1, 3, 6, 15]
    assert common.causal_pairs(3, past=4) == 3 * 4 + 6   # every query sees the 4 cached keys


def test_decoder_flops_equal_a_hand_count(bench) -> None:
    common = bench("common")
    # hidden 8, 2 heads of head_dim 4, 1 KV head, MLP 16, per layer:
    #   q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate 8x16 + up 8x16 + down 16x8 = 576 weights; 2 layers: 1152
    # (embeddings 10x8 and the RMSNorm weights are not matmuls)
    model = tiny_llama()
    assert common.linear_params(model) == 1152
    assert common.attention_width(model.config) == 8
    # PPO: sequences of 3 and 5 tokens: 8 tokens, 6 + 15 = 21 causal pairs
    #   2 x 1152 x 8 + (2 + 2) x 8 x 2 layers x 21 = 18432 + 1344
    assert common.decoder_flops(model, 8, common.causal_pairs(3) + common.causal_pairs(5)) == 19776
    # GRPO: a 4-token prompt once, completions of 2 and 3 tokens after it: 9 tokens,
    #   10 + (2x4 + 3) + (3x4 + 6) = 39 pairs -> 2 x 1152 x 9 + 4 x 8 x 2 x 39 = 20736 + 2496
    pairs = common.causal_pairs(4) + common.causal_pairs(2, past=4) + common.causal_pairs(3, past=4)
    assert common.decoder_flops(model, 9, pairs) == 23232


def test_head_dim_and_mixed_linear_layers(bench) -> None:
    """d_attn is heads x head_dim, not hidden_size; bf16 MixedLinear layers count as the Linears they replace."""
    from rmserve.service.engine.precision import mixed_bf16

    common = bench("common")
    model = tiny_llama(head_dim=6)
    # q 8x12 + k 8x6 + v 8x6 + o 12x8 + MLP 3 x 128 = 672 per layer; d_attn = 2 x 6
    assert common.linear_params(model) == 2 * 672
    assert common.attention_width(model.config) == 12
    assert common.decoder_flops(model, 1, 1) == 2 * 1344 + 4 * 12 * 2
    mixed_bf16(model)
    assert common.linear_params(model) == 2 * 672


def test_both_benchmarks_count_with_the_common_functions(bench) -> None:
    common = bench("common")
    for script in ("bench_cpu", "bench_gpu"):
        mod = bench(script)
        assert mod.decoder_flops is common.decoder_flops and mod.causal_pairs is common.causal_pairs, script
    cpu = bench("bench_cpu").ppo_workload(4, 3, 9, vocab=10, seed=0)
    assert cpu.attn_pairs == sum(common.causal_pairs(len(s)) for s in cpu.seqs)
    model = tiny_llama()
    gpu = bench("bench_gpu").ppo_workload(model, 4, 3, 9, vocab=10, seed=0)
    assert gpu.useful_flops == common.decoder_flops(
        model, sum(map(len, gpu.seqs)), sum(common.causal_pairs(len(s)) for s in gpu.seqs))
