"""Study: the bf16 gated MLP run over row tiles, so its activations stay in cache between GEMMs.

Run (2-core CPU, ~5 minutes, nothing else running):

    .venv/bin/python bench/study/cpu_row_tiles.py --out bench/results/cpu-row-tiles-$(date +%F).md

The cheapest form of the whole-layer fusion lever (bench/results/cpu-limits-2026-12-06.md):
if the forward's GEMMs run below their isolated rate because the MLP's [tokens, 1536]
activations leave the cache between gate/up, silu·mul and down, feeding the MLP a tile of
rows at a time keeps them resident. GEMM rows do not depend on how many rows share the call
on this path, so the scores must not move. Variants: the served MixedGatedMLP on the whole
packed batch, and on tiles of 256 and 1024 rows; bench_cpu.py's PPO-like and GRPO-like
workloads, interleaved rounds, best kept.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cpu import Sizes, cpu_lines, grpo_workload, ppo_workload
from study_runs import interleaved_best, study_main

from rmserve.service.engine import precision
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.server.config import DEFAULT_MODEL_DIR

TILES = {"whole": None, "tiles-256": 256, "tiles-1024": 1024}


class RowTiled(nn.Module):
    """An MLP applied to `rows` rows of the flattened batch at a time."""

    def __init__(self, mlp: nn.Module, rows: int):
        super().__init__()
        self.mlp, self.rows = mlp, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([self.mlp(flat[i:i + self.rows]) for i in range(0, flat.shape[0], self.rows)])
        return out.reshape(*x.shape[:-1], out.shape[-1])


def load(rows: int | None):
    model = load_model(DEFAULT_MODEL_DIR, dtype="bfloat16")
    if rows is not None:
        net = model.members[0].backbone.model
        for name, mod in list(net.named_modules()):
            if isinstance(mod, precision.MixedGatedMLP):
                precision._swap(net, name, RowTiled(mod, rows))
    return model


def run(args) -> str:
    engines = {v: ScoringEngine(load(rows), token_budget=4096) for v, rows in TILES.items()}
    model = engines["whole"].model
    ppo = ppo_workload(args.n, 32, 512, 49152)
    grpo = grpo_workload(model.encoder, model.encoder.tokenizer, args.groups, Sizes())
    work = {v: {"ppo": ppo, "grpo": grpo} for v in engines}
    best, out = interleaved_best(work, lambda v, seqs: engines[v].score(seqs).rewards, args.repeat)
    lines = ["# bf16 gated MLP over row tiles (embedded default, in process)", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}", *cpu_lines(),
             f"- workloads: {ppo.title}; {grpo.title}; best of {args.repeat} interleaved rounds",
             f"- command: `python bench/study/cpu_row_tiles.py {' '.join(args.argv)}`", "",
             "| variant | workload | seconds | × whole | max score diff vs whole |", "| --- | --- | ---: | ---: | ---: |"]
    for v in engines:
        for w in ("ppo", "grpo"):
            lines.append(f"| {v} | {w} | {best[(v, w)]:.2f} | {best[('whole', w)] / best[(v, w)]:.3f} | "
                         f"{float(np.abs(out[(v, w)] - out[('whole', w)]).max()):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, run, argv, n=48, repeat=4)


if __name__ == "__main__":
    sys.exit(main())
