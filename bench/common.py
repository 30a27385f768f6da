"""What the benchmarks share: one FLOP count for bench_cpu.py ("of ceiling") and bench_gpu.py
(MFU), and the report-writing `main` (`run_and_report`).

Both scripts divide the useful FLOPs of a workload by its time and by a matmul
rate measured in the same run, so the two percentages mean the same thing only
if the FLOPs are counted the same way. They are counted here, once.

Useful FLOPs of a decoder forward (matmul FLOPs only, what an ideal engine
computes; a multiply-add is 2 FLOPs):

- linear layers: 2 x (weights of every linear layer) per token computed. Linear
  layers are the leaf modules with integer `in_features` and `out_features`
  (nn.Linear, rmserve's bf16 MixedLinear), counted as in x out. Embedding
  lookups, biases, norms, activations, rotary embeddings and softmax are not
  matmuls and are not counted; neither is an LM head (the benchmarks run a bare
  backbone) nor the reward heads (K x H per sequence, negligible).
- attention: per layer and per (query, key) pair that a causal decoder needs,
  2 x d_attn for QK^T plus 2 x d_attn for PV, d_attn = attention heads x
  head_dim (not hidden_size: they differ in e.g. Qwen3 and Gemma). Grouped KV
  heads do not change this (every query head still scores every key).
- pairs: causal attention, a query attends to itself and every earlier key, so
  n tokens after `past` cached keys make n x past + n(n + 1)/2 pairs (no sliding
  window, no full-attention square). Padding, and the masked-out upper triangle
  that a dense kernel may compute anyway, are waste, not useful FLOPs.

For a GRPO group the prompt is computed once: the prompt's causal pairs plus,
for each completion of C tokens, causal_pairs(C, past=P).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch


def causal_pairs(n: int, past: int = 0) -> int:
    """(query, key) pairs of n causal queries after `past` cached keys: n x past + n(n + 1)/2."""
    return n * past + n * (n + 1) // 2


def linear_params(model: torch.nn.Module) -> int:
    """Weights of every linear layer (in x out): the parameters that cost 2 FLOPs per token.

    Leaf modules only, so a wrapper that exposes its inner layer's sizes is not counted twice.
    """
    return sum(
        m.in_features * m.out_features
        for m in model.modules()
        if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
        and next(m.children(), None) is None
    )


def attention_width(config) -> int:
    """d_attn = attention heads x head_dim (head_dim from the config when it sets one)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def forward_flops(linear: int, d_attn: int, layers: int, tokens: int, pairs: int | float) -> float:
    """2 x linear x tokens + (2 + 2) x d_attn x layers x pairs (QK^T and PV), see the module docstring."""
    return 2.0 * linear * tokens + 4.0 * d_attn * layers * pairs


def decoder_flops(model: torch.nn.Module, tokens: int, pairs: int | float) -> float:
    """Useful FLOPs of `tokens` tokens through the bare decoder `model`, attending `pairs`
    causal (query, key) pairs (sum of causal_pairs over the sequences)."""
    c = model.config
    return forward_flops(linear_params(model), attention_width(c), c.num_hidden_layers, tokens, pairs)


def run_and_report(argv: list[str] | None, parse_args, run_all, prefix: str) -> int:
    """The benchmarks' `main`: parse, run in a temporary directory, print the report and
    write it to `--out` when given."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        text = run_all(args, argv, Path(tmp), t_start)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
