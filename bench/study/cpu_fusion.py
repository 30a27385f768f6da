"""Study: what fusing the work between the bf16 matmuls, and smaller attention query blocks, buy on CPU.

Run (2-core CPU, ~10 minutes):

    .venv/bin/python bench/study/cpu_fusion.py --out bench/results/cpu-fusion-study-$(date +%F).md

The embedded default served bf16 (service/engine/precision.py: bf16 matmuls over a
float32 stream, batch-invariant attention), in process, on bench_cpu.py's PPO-like
workload and a GRPO-like one, each variant timed in interleaved rounds (best kept):

  base               what the engine runs today
  cast-memo          q/k/v (and gate/up) share one bf16 cast of their common input instead of
                     casting it once each (the profile's casts/copies were ~20% of the time)
  mlp-eager          cast-memo, and the gated MLP as silu(gate) * up from the bf16 GEMM outputs
                     straight to bf16 (same roundings as today: the GEMM output is bf16 either way)
  mlp-compiled       the same with that elementwise step compiled by torch.compile (inductor's
                     C++ backend: one fused loop instead of four passes)
  block16, block32   invariant attention with 16- or 32-row query blocks instead of 64 (fewer
                     padding rows for a GRPO completion that starts mid-block, more sdpa calls)

Printed: seconds, throughput relative to base, the largest reward difference from base
over the reward std (0 for the fusions: they change no rounding), and whether a few
sequences scored alone equal themselves scored in the batch (batch invariance).
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
from bench_cpu import Sizes, cpu_model, grpo_workload, ppo_workload
from study_runs import interleaved_best, study_main

from rmserve.service.engine import invariant_attention as ia
from rmserve.service.engine.model import load_model
from rmserve.service.engine.precision import MixedLinear
from rmserve.service.engine.scoring import ScoringEngine

DEFAULT = Path(__file__).resolve().parents[2] / "service" / "default_model"


class _CastMemo:
    """The last input's bf16 copy, for sibling linears that read the same tensor."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.x is not x:
            self.x, self.y = x, x.to(dtype)
        return self.y


class _MemoLinear(MixedLinear):
    memo: _CastMemo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.memo.get(x, self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (F.silu(g.float()) * u.float()).to(torch.bfloat16)


class _GatedMLP(nn.Module):
    def __init__(self, mlp: nn.Module, fn):
        super().__init__()
        self.gate, self.up, self.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        return F.linear(self.fn(F.linear(xb, self.gate), F.linear(xb, self.up)), self.down).to(x.dtype)


def patched(variant: str):
    model = load_model(DEFAULT, dtype="bfloat16")
    if variant == "base" or variant.startswith("block"):
        return model
    compiled = torch.compile(_silu_mul, dynamic=True)
    for m in model.members:
        for layer in m.backbone.model.layers:
            memo = _CastMemo()
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.__class__, lin.memo = _MemoLinear, memo
            if variant.startswith("mlp"):
                layer.mlp = _GatedMLP(layer.mlp, compiled if variant == "mlp-compiled" else _silu_mul)
    return model


def run(args) -> str:
    variants = ["base", "cast-memo", "mlp-eager", "mlp-compiled", "block16", "block32"]
    blocks = {"block16": 16, "block32": 32}
    engines = {v: ScoringEngine(patched(v)) for v in variants}
    model = engines["base"].model
    ppo = ppo_workload(args.n, 32, 512, 49152)
    grpo = grpo_workload(model.encoder, model.encoder.tokenizer, args.groups, Sizes())
    work = {"ppo": ppo, "grpo": grpo}

    def score(v: str, seqs: list[list[int]]) -> np.ndarray:
        ia.BLOCK = blocks.get(v, 64)
        try:
            return engines[v].score(seqs).rewards
        finally:
            ia.BLOCK = 64

    best, out = interleaved_best({v: work for v in variants}, score, args.repeat)
    invariant = {}
    for v in variants:
        alone = np.concatenate([score(v, [s]) for s in ppo.seqs[:3]])
        invariant[v] = float(np.abs(alone - out[(v, "ppo")][:3]).max())
    lines = [
        "# CPU fusion and attention-block study (bf16, embedded default)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()} ({torch.get_num_threads()} threads); torch {torch.__version__}",
        f"- workloads: {ppo.title}; {grpo.title}; best of {args.repeat} interleaved rounds",
        f"- command: `python bench/study/cpu_fusion.py {' '.join(args.argv)}`",
        "",
        "| variant | workload | seconds | x base | max reward diff / std vs base | alone vs batched (PPO, 3 seqs) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        for name in work:
            ref = out[("base", name)]
            diff = float(np.abs(out[(v, name)] - ref).max() / max(float(ref.std()), 1e-12))
            lines.append(f"| {v} | {name} | {best[(v, name)]:.2f} | {best[('base', name)] / best[(v, name)]:.3f} | "
                         f"{diff:.2e} | {invariant[v]:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, run, argv, n=32, repeat=5)


if __name__ == "__main__":
    sys.exit(main())
