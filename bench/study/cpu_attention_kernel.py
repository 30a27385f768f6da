"""Study: the fixed-order CPU attention kernel against the attention it replaces, in one process.

Run (2-core CPU, ~10 minutes, nothing else running):

    .venv/bin/python bench/study/cpu_attention_kernel.py --out bench/results/cpu-attention-kernel-$(date +%F).md

The embedded default, in process, bench_cpu.py's PPO-like and GRPO-like workloads,
each variant timed in interleaved rounds (best kept):

  fp32-sdpa          float32 as served before the kernel: packed batches, sdpa per
                     sequence slice (GRPO's completions over the prompt's cache: HF's sdpa)
  fp32-kernel        float32 as served now: the kernel on the packed stream and the cache
  bf16-grid          bf16 as served before: padded rows, the 64-row grid of sdpa calls
  bf16-kernel-padded bf16 with the kernel on padded rows (padding rows skipped)
  bf16-kernel        bf16 as served now: the kernel on the packed stream

and the attention alone at the default's layer shape (9 query heads, 3 key heads,
d = 64): a batch of causal sequences, and GRPO's 8 completions of 64 tokens over a
384-token prompt, kernel vs sdpa's causal kernel vs the 64-row grid.

Printed: seconds, throughput relative to the old path of the same dtype, the largest
reward difference from it, from fp32-sdpa and from the backbone run in float64 (GRPO's
32 sequences, PPO's first 16) over the reward std, and the largest difference of four
sequences scored alone from themselves in the batch.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cpu import Sizes, cpu_lines, grpo_workload, ppo_workload
from study_runs import best_seconds, interleaved_best, study_main

from rmserve.kernels import cpu_attention
from rmserve.service.engine import invariant_attention as ia
from rmserve.service.engine.heads import BatchStats, LastTokenIndex, engine_output, member_scores
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine

DEFAULT = Path(__file__).resolve().parents[2] / "service" / "default_model"
VARIANTS = {  # name: (dtype, kernel on, packing)
    "fp32-sdpa": ("float32", False, "auto"),
    "fp32-kernel": ("float32", True, "auto"),
    "bf16-grid": ("bfloat16", False, "auto"),
    "bf16-kernel-padded": ("bfloat16", True, "off"),
    "bf16-kernel": ("bfloat16", True, "auto"),
}
OLD = {"float32": "fp32-sdpa", "bfloat16": "bf16-grid"}


@contextlib.contextmanager
def kernel(on: bool):
    """The kernel as built, or reported unavailable (what a machine without a compiler runs)."""
    real = cpu_attention.available
    if not on:
        cpu_attention.available = lambda: False
    try:
        yield
    finally:
        cpu_attention.available = real


def _attention_row(label: str, q, k, v, offset: int, mask, reps: int) -> str:
    """kernel vs sdpa (causal, or `mask` after a cache) vs the 64-row grid on one call."""
    d = q.shape[-1]
    k_len = torch.full((q.shape[0],), k.shape[2])
    seqs = cpu_attention.padded_seqs(k_len, q.shape[2], offset)
    sdpa = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    tk = best_seconds(lambda: cpu_attention.attention(q, k, v, seqs, scale=d**-0.5), reps)
    ts = best_seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa), reps)
    tg = best_seconds(lambda: ia.block_attention(q, k, v, offset, k_len, scaling=d**-0.5), reps)
    return f"| {label} | {tk:.4f} | {ts:.4f} | {tg:.4f} | {ts / tk:.2f} | {tg / tk:.2f} |"


def attention_lines(reps: int = 10) -> list[str]:
    """The attention call alone, at the default's layer shape."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 9, 3, 64
    lines = ["| call | kernel s | sdpa s | 64-row grid s | kernel x sdpa | kernel x grid |",
             "| --- | --- | --- | --- | --- | --- |"]
    for b, t in ((8, 128), (8, 512), (1, 2048)):
        q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
        lines.append(_attention_row(f"{b} x {t} causal", q, k, v, 0, None, reps))
    n, prompt, tq = 8, 384, 64      # GRPO: completions over a shared prompt's cache
    q = torch.randn(n, hq, tq, d, generator=g)
    k, v = (torch.randn(n, hkv, prompt + tq, d, generator=g) for _ in range(2))
    mask = torch.ones(tq, prompt + tq, dtype=torch.bool).tril(prompt)
    lines.append(_attention_row(f"{n} x {tq} after {prompt} cached", q, k, v, prompt, mask, reps))
    return lines


def float64_rewards(seqs: list[list[int]]) -> np.ndarray:
    """The default's rewards with its backbone in float64 (plain HF, sdpa, each sequence alone, no
    cache): what both float32 paths approximate. The heads then run as the engine runs them."""
    model = load_model(DEFAULT, dtype="float32", fused=False)
    (m,) = model.members
    backbone = m.backbone.model.double()
    last = []
    with torch.inference_mode():
        for s in seqs:
            h = backbone(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
            last.append(h.float())
    hidden = torch.stack(last)[:, None, :]
    out = engine_output([member_scores(m, hidden, LastTokenIndex(lengths=torch.ones(len(seqs), dtype=torch.long)))],
                        BatchStats())
    return out.rewards


def run(args) -> str:
    engines = {}
    for name, (dtype, on, packing) in VARIANTS.items():
        with kernel(on):
            engines[name] = ScoringEngine(load_model(DEFAULT, dtype=dtype), packing=packing, token_budget=4096)
    model = engines["fp32-kernel"].model
    work = {"ppo": ppo_workload(args.n, 32, 512, 49152),
            "grpo": grpo_workload(model.encoder, model.encoder.tokenizer, args.groups, Sizes())}

    def score(v: str, seqs: list[list[int]]) -> np.ndarray:
        with kernel(VARIANTS[v][1]):
            return engines[v].score(seqs).rewards

    best, out = interleaved_best({v: work for v in VARIANTS}, score, args.repeat)
    ppo = work["ppo"].seqs
    exact = {"ppo": (slice(0, 16), float64_rewards(ppo[:16])), "grpo": (slice(None), float64_rewards(work["grpo"].seqs))}
    alone = {v: float(np.abs(np.concatenate([score(v, [s]) for s in ppo[:4]]) - out[(v, "ppo")][:4]).max())
             for v in VARIANTS}
    lines = [
        "# Fixed-order CPU attention kernel vs the attention it replaces (embedded default, in process)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        *cpu_lines(),
        f"- workloads: {work['ppo'].title}; {work['grpo'].title}; best of {args.repeat} interleaved rounds",
        f"- command: `python bench/study/cpu_attention_kernel.py {' '.join(args.argv)}`",
        "",
        "| variant | workload | seconds | x old path (same dtype) | max reward diff / std vs old path | vs fp32-sdpa "
        "| vs float64 | alone vs batched, 4 seqs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, (dtype, _, _) in VARIANTS.items():
        base = OLD[dtype]
        for name in work:
            ref, f32 = out[(base, name)], out[("fp32-sdpa", name)]
            diff = float(np.abs(out[(v, name)] - ref).max() / ref.std())
            vs32 = float(np.abs(out[(v, name)] - f32).max() / f32.std())
            rows, want = exact[name]
            vs64 = float(np.abs(out[(v, name)][rows] - want).max() / want.std())
            lines.append(f"| {v} | {name} | {best[(v, name)]:.2f} | {best[(base, name)] / best[(v, name)]:.3f} | "
                         f"{diff:.2e} | {vs32:.2e} | {vs64:.2e} | {alone[v]:.1e} |")
    lines += ["", "The attention call alone (float32, best of 10, seconds):", "", *attention_lines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if not cpu_attention.available():
        print(f"the kernel is not built here: {cpu_attention.unavailable_reason()}", file=sys.stderr)
        return 1
    return study_main(__doc__, run, argv, n=48, repeat=3)


if __name__ == "__main__":
    sys.exit(main())
