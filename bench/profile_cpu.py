"""Where does a CPU scoring forward spend its time? torch.profiler over the engine, by op family.

    .venv/bin/python bench/profile_cpu.py --dtype bfloat16 --out bench/results/cpu-profile-<date>.md

Runs the PPO-like workload of bench_cpu.py (96 sequences, lengths U[32, 512],
SmolLM2-135M backbone, random heads) once through ScoringEngine under
torch.profiler and groups the self CPU time of every aten op into families:
matmuls (what the matmul-rate ceiling counts), attention's non-matmul work,
dtype casts, norms and elementwise ops, and the rest. The matmul family over
the total is how close the forward is to its ceiling; the other rows are
what is left to win.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

FAMILIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_mkl", "mkldnn",
               "aten::baddbmm", "onednn"),
    "attention (sdpa or rmserve's CPU kernel)": ("aten::_scaled_dot_product", "aten::scaled_dot_product",
                                                  "rmserve_cpu::"),
    "softmax/exp/max/mask": ("aten::exp", "aten::amax", "aten::maximum", "aten::masked_fill", "aten::sub",
                             "aten::softmax", "aten::_softmax", "aten::sum", "aten::eq", "aten::le", "aten::lt",
                             "aten::gt", "aten::bitwise", "aten::logical", "aten::div"),
    "casts/copies": ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat",
                     "aten::repeat_interleave", "aten::index", "aten::stack", "aten::pad", "aten::constant_pad"),
    "norm/activation/elementwise": ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu",
                                    "aten::neg", "aten::cos", "aten::sin", "aten::embedding"),
}


def family(name: str) -> str:
    for fam, prefixes in FAMILIES.items():
        if name.startswith(prefixes) or any(p in name for p in prefixes if not p.startswith("aten::")):
            return fam
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--workload", default="ppo", choices=["ppo", "grpo"],
                    help="bench_cpu.py's PPO-like sequences or its GRPO-like groups (prefix shared)")
    ap.add_argument("--n", type=int, default=96, help="PPO-like sequences")
    ap.add_argument("--groups", type=int, default=4, help="GRPO-like groups")
    ap.add_argument("--out")
    a = ap.parse_args()

    from bench_cpu import (  # the benchmark's model and data
        Sizes,
        build_model_dir,
        grpo_workload,
        ppo_workload,
    )

    from rmserve.service.engine.model import load_model
    from rmserve.service.engine.scoring import ScoringEngine

    model_dir = build_model_dir(Path(tempfile.mkdtemp(prefix="rmserve-profile-")) / "model", tiny=False)
    rm = load_model(model_dir, dtype=a.dtype)
    tok = rm.members[0].backbone.tokenizer
    if a.workload == "ppo":
        w = ppo_workload(a.n, 32, 512, len(tok))
    else:
        w = grpo_workload(rm.encoder, tok, a.groups, Sizes())
    seqs = w.seqs
    engine = ScoringEngine(rm, token_budget=4096)
    engine.score(seqs[:8])  # warm-up
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.score(seqs)
    wall = time.perf_counter() - t0
    by_family: dict[str, float] = defaultdict(float)
    top: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        if ev.key.startswith(("aten::", "rmserve_cpu::")) or "mkldnn" in ev.key or "onednn" in ev.key:
            by_family[family(ev.key)] += ev.self_cpu_time_total / 1e6
            top.append((ev.self_cpu_time_total / 1e6, ev.key))
    total = sum(by_family.values())
    tokens = sum(map(len, seqs))
    lines = [
        f"# CPU forward profile, {a.dtype} ({date.today()})",
        "",
        f"- machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"SmolLM2-135M backbone (30 layers), {w.title}; {tokens} tokens sent",
        f"- command: `python bench/profile_cpu.py --dtype {a.dtype} --workload {a.workload}`",
        f"- wall time under the profiler: {wall:.1f} s ({tokens / wall:.0f} tok/s sent, {w.useful_tokens / wall:.0f} "
        f"useful); op self time (aten and rmserve_cpu ops) {total:.1f} s",
        "",
        "| op family | seconds | share |",
        "| --- | --- | --- |",
    ]
    for fam, secs in sorted(by_family.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {fam} | {secs:.2f} | {secs / total:.1%} |")
    lines += ["", "| top ops (self time) | seconds |", "| --- | --- |"]
    for secs, name in sorted(top, reverse=True)[:12]:
        lines.append(f"| `{name}` | {secs:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
