"""Study: bf16 GEMMs on oneDNN weights packed once at load (RMSERVE_PREPACK=1), against F.linear.

Run (2-core CPU, ~8 minutes, nothing else running):

    .venv/bin/python bench/study/cpu_prepacked_gemm.py --out bench/results/cpu-prepacked-gemm-$(date +%F).md

Why: the bf16 profile puts the GEMMs at ~74% of the 2048³ rate inside the forward
(bench/results/cpu-limits-2026-12-06.md). If F.linear reordered the bf16 weight into
oneDNN's blocked layout on every call, packing it once (what inductor's freezing does:
`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`) would close part of that.

Printed: the default's GEMM shapes alone, F.linear vs prepacked, GFLOP/s and whether the
outputs are bit-identical; then the embedded default in process on bench_cpu.py's
PPO-like and GRPO-like workloads, bf16 with every projection on prepacked weights
(RMSERVE_PREPACK=1, service/engine/precision.py) against bf16 as served, on F.linear (interleaved
rounds, best kept), their largest score difference, and four sequences alone against
themselves in the batch (the heads' fp32 matmul may move the last bit; the backbone's
hidden states are bit-identical, tests/test_precision.py).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cpu import Sizes, cpu_lines, grpo_workload, ppo_workload
from study_runs import best_seconds, interleaved_best, study_main

from rmserve.service.engine import precision
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.server.config import DEFAULT_MODEL_DIR


def load_bf16(prepack: bool):
    """The embedded default in bf16, its projections on prepacked weights or on F.linear."""
    with mock.patch.dict(os.environ, {"RMSERVE_PREPACK": "1" if prepack else "0"}):
        return load_model(DEFAULT_MODEL_DIR, dtype="bfloat16")


def gemm_lines() -> list[str]:
    lines = ["| K × N (default's projection) | rows | F.linear GFLOP/s | prepacked GFLOP/s | × | bit-identical |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    g = torch.Generator().manual_seed(0)
    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        lin = precision.MixedLinear(nn.Linear(k, n, bias=False), torch.bfloat16)
        lin.packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), precision.PREPACK_ROWS)
        w, mm = lin.weight.detach(), lin.mm
        for m in (4096, 1024, 256, 64):
            x = torch.randn(m, k, generator=g).bfloat16()
            t0, t1 = best_seconds(lambda: F.linear(x, w), 15), best_seconds(lambda: mm(x), 15)  # noqa: B023
            flop = 2 * m * k * n
            lines.append(f"| {k} × {n} | {m} | {flop / t0 / 1e9:.0f} | {flop / t1 / 1e9:.0f} | {t0 / t1:.2f} | "
                         f"{torch.equal(F.linear(x, w), mm(x))} |")
    return lines


def run(args) -> str:
    if not precision._prepack_probe():
        return "oneDNN's prepacked linear is not available in this torch: nothing to compare"
    base, packed = load_bf16(prepack=False), load_bf16(prepack=True)
    swapped = sum(m.packed is not None for member in packed.members for m in member.backbone.model.modules()
                  if isinstance(m, precision.MixedLinear))
    engines = {"bf16-F.linear": ScoringEngine(base, token_budget=4096),
               "bf16-prepacked": ScoringEngine(packed, token_budget=4096)}
    ppo = ppo_workload(args.n, 32, 512, 49152)
    grpo = grpo_workload(base.encoder, base.encoder.tokenizer, args.groups, Sizes())
    work = {v: {"ppo": ppo, "grpo": grpo} for v in engines}
    best, out = interleaved_best(work, lambda v, seqs: engines[v].score(seqs).rewards, args.repeat)
    lines = [
        "# bf16 GEMMs on prepacked oneDNN weights (embedded default, in process)", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}", *cpu_lines(),
        f"- workloads: {ppo.title}; {grpo.title}; best of {args.repeat} interleaved rounds; {swapped} projections prepacked",
        f"- command: `python bench/study/cpu_prepacked_gemm.py {' '.join(args.argv)}`", "",
        "| workload | F.linear s | prepacked s | × F.linear | max score diff | alone vs batched (F.linear / prepacked) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for w, wl in (("ppo", ppo), ("grpo", grpo)):
        a, b = out[("bf16-F.linear", w)], out[("bf16-prepacked", w)]
        alone = [float(np.abs(np.concatenate([engines[v].score([s]).rewards for s in wl.seqs[:4]]) - out[(v, w)][:4]).max())
                 for v in engines]
        lines.append(f"| {w} | {best[('bf16-F.linear', w)]:.2f} | {best[('bf16-prepacked', w)]:.2f} | "
                     f"{best[('bf16-F.linear', w)] / best[('bf16-prepacked', w)]:.3f} | {float(np.abs(a - b).max()):.1e} | "
                     f"{alone[0]:.1e} / {alone[1]:.1e} |")
    return "\n".join([*lines, "", "GEMMs alone (best of 15):", "", *gemm_lines()])


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, run, argv, n=48, repeat=4)


if __name__ == "__main__":
    sys.exit(main())
