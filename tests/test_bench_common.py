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


def test_the_grpo_ideal_is_the_baseline_efficiency_on_useful_flops(bench) -> None:
    """bench_cpu's "share of its ideal": equal-length sequences give the baseline nothing to waste
    (ideal speed-up 1 at the fp32 rate); a group sharing a prompt is computed whole by the baseline,
    so its ideal is baseline FLOPs / useful FLOPs, and a faster dtype scales it by the rate ratio."""
    cpu = bench("bench_cpu")
    model = tiny_llama()
    same = cpu.ppo_workload(5, 12, 12, 10)
    same.flops = cpu.decoder_flops(model, same.useful_tokens, same.attn_pairs)
    assert cpu.baseline_flops(model, same) == same.flops

    # one group: a 20-token prompt + 4 completions of 4..7 tokens; the baseline pads to 27 and
    # recomputes the prompt for every row, an ideal engine computes it once
    seqs = [[1] * 20 + [2] * c for c in (4, 5, 6, 7)]
    useful = 20 + sum((4, 5, 6, 7))
    pairs = cpu.causal_pairs(20) + sum(cpu.causal_pairs(c, 20) for c in (4, 5, 6, 7))
    w = cpu.Workload("grpo", "t", seqs, [object()], useful, pairs)
    w.flops = cpu.decoder_flops(model, useful, pairs)
    w.baseline_flops = cpu.baseline_flops(model, w)
    assert w.baseline_flops == cpu.decoder_flops(model, 4 * 27, 4 * cpu.causal_pairs(27))
    b = cpu.Bench([w], {cpu.BASELINE, "grpc-fp32", "grpc-bf16"}, 1)
    row = lambda key, dtype, s: cpu.Row("grpo", key, key, dtype, s, None)  # noqa: E731
    b.rows = {("grpo", cpu.BASELINE): row(cpu.BASELINE, "fp32", 8.0), ("grpo", "grpc-fp32"): row("grpc-fp32", "fp32", 4.0),
              ("grpo", "grpc-bf16"): row("grpc-bf16", "bf16", 1.0)}
    rates = {"fp32": 1.0, "bf16": 2.0}
    ideal = w.baseline_flops / w.flops
    assert cpu.of_ideal(b, rates, "grpo", "grpc-fp32") == pytest.approx(2.0 / ideal)
    assert cpu.of_ideal(b, rates, "grpo", "grpc-bf16") == pytest.approx(8.0 / (2 * ideal))
    assert cpu.of_ideal(b, rates, "ppo", "grpc-fp32") is None
