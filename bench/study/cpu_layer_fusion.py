"""Study: what is left between the matmuls of a CPU forward, and what fusing it buys.

Run (2-core CPU, ~15 minutes, nothing else running):

    .venv/bin/python bench/study/cpu_layer_fusion.py --out bench/results/cpu-layer-fusion-study-$(date +%F).md

The embedded default, in process, on bench_cpu.py's PPO-like workload (and the
GRPO-like one for bf16), each variant timed in interleaved rounds (best kept):

  bf16-base          what `--dtype bfloat16` runs today (bf16 matmuls over a float32 stream,
                     invariant attention, the gated MLP's silu·mul compiled)
  bf16-norm-eager    each decoder layer's RMSNorm hands its output to q/k/v and gate/up as
                     bf16 (one cast instead of one per projection; same roundings, eager)
  bf16-norm-compiled the same RMSNorm + bf16 cast as one torch.compile'd loop (inductor's
                     C++ backend; its reduction order differs from eager's, so roundings move)
  bf16-attn-bf16     attention's q, k, v rounded to bf16 before the invariant attention
                     (sdpa's bf16 flash kernel, fp32 accumulation) instead of float32
  fp32-base          what `--dtype float32` runs today (packed batches, plain HF layers)
  fp32-mlp-compiled  float32 silu(gate)·up as one compiled loop
  fp32-norm-mlp      the same plus the RMSNorm as one compiled loop

and a GEMM microbenchmark: q/k/v as three GEMMs or one concatenated GEMM, gate/up as
two or one (a batch of 4096 rows of the default's width), bf16 and fp32; and whether
attention's building blocks (sdpa, the two bmms) give a row the same bits whatever
number of rows shares the call (what an attention without padding rows would need).

Printed: seconds, throughput relative to the base of the same dtype, the largest
reward difference from that base and from float32 over the reward std, and
whether sequences scored alone equal themselves scored in the batch.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cpu import Sizes, cpu_lines, grpo_workload, ppo_workload
from study_runs import best_seconds, interleaved_best, study_main

from rmserve.service.engine import invariant_attention as ia
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine

DEFAULT = Path(__file__).resolve().parents[2] / "service" / "default_model"


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _norm_bf16(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, w, eps).to(torch.bfloat16)


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class _Norm(nn.Module):
    """An RMSNorm computed by `fn` (x, weight, eps)."""

    def __init__(self, norm: nn.Module, fn):
        super().__init__()
        self.weight, self.eps, self.fn = norm.weight, norm.variance_epsilon, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.eps)


class _MLP(nn.Module):
    def __init__(self, mlp: nn.Module, fn):
        super().__init__()
        self.g, self.u, self.d, self.fn = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fn(F.linear(x, self.g), F.linear(x, self.u)), self.d)


_block_attention = ia.block_attention
_ATTN_BF16 = [False]


def _attention(q, k, v, q_offset, k_len, *, scaling, window=None):
    """ia.block_attention with q/k/v in one dtype: bf16 for the attn-bf16 variant, else q's
    (a norm that emits bf16 leaves v in bf16 while rotary promotes q and k to float32)."""
    dtype = torch.bfloat16 if _ATTN_BF16[0] else q.dtype
    return _block_attention(q.to(dtype), k.to(dtype), v.to(dtype), q_offset, k_len, scaling=scaling, window=window)


def build(variant: str):
    dtype = "bfloat16" if variant.startswith("bf16") else "float32"
    model = load_model(DEFAULT, dtype=dtype)
    compiled = {"norm_bf16": torch.compile(_norm_bf16, dynamic=True), "norm": torch.compile(_norm, dynamic=True),
                "silu_mul": torch.compile(_silu_mul, dynamic=True)}
    for member in model.members:
        for layer in member.backbone.model.layers:
            norm = {"bf16-norm-eager": _norm_bf16, "bf16-norm-compiled": compiled["norm_bf16"],
                    "fp32-norm-mlp": compiled["norm"]}.get(variant)
            if norm is not None:
                layer.input_layernorm = _Norm(layer.input_layernorm, norm)
                layer.post_attention_layernorm = _Norm(layer.post_attention_layernorm, norm)
            if variant in ("fp32-mlp-compiled", "fp32-norm-mlp"):
                layer.mlp = _MLP(layer.mlp, compiled["silu_mul"])
    return model


def gemm_lines(reps: int = 20) -> list[str]:
    out = ["| dtype | projections | separate GEMMs ms | one concatenated GEMM ms | one / separate |",
           "| --- | --- | --- | --- | --- |"]
    cases = {"q/k/v (576+192+192)": (576, 192, 192), "gate/up (1536+1536)": (1536, 1536)}
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4096, 576).to(dtype)
        for name, parts in cases.items():
            ws = [torch.randn(n, 576).to(dtype) for n in parts]
            whole = torch.cat(ws)
            sep = best_seconds(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], reps)
            one = best_seconds(lambda x=x, whole=whole: F.linear(x, whole), reps)
            out.append(f"| {str(dtype).removeprefix('torch.')} | {name} | {sep * 1e3:.2f} | {one * 1e3:.2f} | "
                       f"{one / sep:.3f} |")
    return out


def invariance_lines() -> list[str]:
    """Does a row's result depend on how many rows share the call? The question behind an
    attention without padding rows: a GRPO completion that starts mid-block could then run only
    its own rows. Each building block on a full 64-row block vs on row slices of it (1 to 63
    rows), fp32 and bf16, keys 64..1024; counted: slices not bit-identical to the full call."""
    torch.manual_seed(0)
    slices = ((0, 1), (5, 6), (63, 64), (0, 2), (0, 3), (0, 8), (0, 17), (20, 40), (1, 50), (10, 64), (31, 64))
    out = ["| building block | dtype | slices differing from the 64-row call | largest difference |",
           "| --- | --- | --- | --- |"]
    for dtype in (torch.float32, torch.bfloat16):
        counts = {"sdpa (flash, masked)": [0, 0, 0.0], "q @ k^T (bmm)": [0, 0, 0.0], "p @ v (bmm)": [0, 0, 0.0]}
        for end in (64, 128, 192, 384, 448, 512, 1024):
            q, k = torch.randn(2, 9, 64, 64).to(dtype), torch.randn(2, 9, end, 64).to(dtype)
            p = torch.rand(2, 9, 64, end).to(dtype)
            visible = (torch.arange(end).view(1, end) <= end - 64 + torch.arange(64).view(64, 1))[None, None]
            calls = {"sdpa (flash, masked)": lambda a, b, q=q, k=k, m=visible: F.scaled_dot_product_attention(
                         q[:, :, a:b], k, k, attn_mask=m[:, :, a:b], scale=0.125),
                     "q @ k^T (bmm)": lambda a, b, q=q, k=k: q[:, :, a:b] @ k.transpose(-1, -2),
                     "p @ v (bmm)": lambda a, b, p=p, k=k: p[:, :, a:b] @ k}
            for name, call in calls.items():
                full = call(0, 64)
                for a, b in slices:
                    part, c = call(a, b), counts[name]
                    c[1] += 1
                    if not torch.equal(part, full[:, :, a:b]):
                        c[0] += 1
                        c[2] = max(c[2], float((part.float() - full[:, :, a:b].float()).abs().max()))
        for name, (bad, total, diff) in counts.items():
            out.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {bad} of {total} | {diff:.1e} |")
    return out


def run(args) -> str:
    variants = ["bf16-base", "bf16-norm-eager", "bf16-norm-compiled", "bf16-attn-bf16",
                "fp32-base", "fp32-mlp-compiled", "fp32-norm-mlp"]
    ia.block_attention = _attention
    engines = {v: ScoringEngine(build(v), token_budget=4096) for v in variants}
    model = engines["bf16-base"].model
    ppo = ppo_workload(args.n, 32, 512, 49152)
    grpo = grpo_workload(model.encoder, model.encoder.tokenizer, args.groups, Sizes())
    both = {"ppo": ppo, "grpo": grpo}
    work = {v: (both if v.startswith("bf16") or v == "fp32-base" else {"ppo": ppo}) for v in variants}

    def score(v: str, seqs: list[list[int]]) -> np.ndarray:
        _ATTN_BF16[0] = v == "bf16-attn-bf16"
        return engines[v].score(seqs).rewards

    best, out = interleaved_best(work, score, args.repeat)
    alone = {v: float(np.abs(np.concatenate([score(v, [s]) for s in ppo.seqs[:4]]) - out[(v, "ppo")][:4]).max())
             for v in variants}
    lines = [
        "# CPU layer-fusion study (embedded default, in process)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        *cpu_lines(),
        f"- workloads: {ppo.title}; {grpo.title} (bf16 and fp32-base); best of {args.repeat} interleaved rounds",
        f"- command: `python bench/study/cpu_layer_fusion.py {' '.join(args.argv)}`",
        "",
        "| variant | workload | seconds | x base (same dtype) | max reward diff / std vs base | vs float32 | alone vs batched, 4 seqs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        base = "bf16-base" if v.startswith("bf16") else "fp32-base"
        for name in work[v]:
            ref, f32 = out[(base, name)], out.get(("fp32-base", name))
            diff = float(np.abs(out[(v, name)] - ref).max() / ref.std())
            vs32 = "—" if f32 is None else f"{float(np.abs(out[(v, name)] - f32).max() / f32.std()):.3f}"
            lines.append(f"| {v} | {name} | {best[(v, name)]:.2f} | {best[(base, name)] / best[(v, name)]:.3f} | "
                         f"{diff:.2e} | {vs32} | {alone[v]:.1e} |")
    lines += ["", "GEMMs (best of 20):", "", *gemm_lines(),
              "", "Row-count invariance of attention's building blocks:", "", *invariance_lines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, run, argv, n=32, repeat=3)


if __name__ == "__main__":
    sys.exit(main())
