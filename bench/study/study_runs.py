"""What the CPU study scripts share: timing variants in interleaved rounds, and their command line.

Each study (cpu_fusion.py, cpu_layer_fusion.py, cpu_attention_kernel.py) scores the same
workloads under several variants of the engine; rounds interleave the variants so a noisy
machine slows them alike, and the best time of each is kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

Key = tuple[str, str]   # (variant, workload name)


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of `reps` calls of fn, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def interleaved_best(work: dict[str, dict], score: Callable[[str, list[list[int]]], np.ndarray],
                     repeat: int) -> tuple[dict[Key, float], dict[Key, np.ndarray]]:
    """work: variant -> {workload name: workload}. A warm-up slice per variant (and compilation),
    then `repeat` rounds of every variant on every workload; best seconds and last scores per key."""
    for v, ws in work.items():
        for w in ws.values():
            score(v, w.seqs[:9])
    best: dict[Key, float] = {}
    out: dict[Key, np.ndarray] = {}
    for r in range(repeat):
        for v, ws in work.items():
            for name, w in ws.items():
                t = time.perf_counter()
                out[(v, name)] = score(v, w.seqs)
                s = time.perf_counter() - t
                best[(v, name)] = min(best.get((v, name), float("inf")), s)
                print(f"  round {r + 1}/{repeat} {v} {name}: {s:.2f} s", file=sys.stderr, flush=True)
    return best, out


def study_main(doc: str, run: Callable[[argparse.Namespace], str], argv: list[str] | None, *,
               n: int, repeat: int) -> int:
    """--n/--groups/--repeat/--out; prints the report and writes it to --out."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--n", type=int, default=n, help="PPO-like sequences")
    p.add_argument("--groups", type=int, default=4, help="GRPO-like groups of 8 completions")
    p.add_argument("--repeat", type=int, default=repeat)
    p.add_argument("--out")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.argv = sys.argv[1:] if argv is None else argv
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
