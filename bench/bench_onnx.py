"""onnxruntime against torch for the embedded default, same process, same workload.

Run (2-core CPU, ~10 minutes with the export):

    .venv/bin/python bench/bench_onnx.py --out bench/results/onnx-$(date +%F).md

The workload is bench_cpu.py's PPO-like one (random token ids, lengths U[32, 512]),
scored in process by each backend's engine (`score(seqs)`, what the server's worker
calls), timed in interleaved rounds with the best round kept (this machine's speed
drifts). Variants:

  torch-fp32         ScoringEngine, float32 (packed batches: what --dtype float32 serves)
  torch-fp32-padded  ScoringEngine, float32, padded length-sorted batches (ORT's batching)
  torch-bf16         ScoringEngine, bf16 matmuls (only where the CPU has native bf16: what auto serves)
  onnx-fp32          OnnxEngine over `rmserve export-onnx`'s graph (ORT_ENABLE_ALL, CPU provider)
  onnx-int8          `export-onnx --quantize int8`: 8-bit matmul weights, int8 compute (--int8 only)

Printed: tokens/s, throughput relative to torch-fp32, the largest reward difference
from torch-fp32 over the reward std, and with `--pairs FILE` each variant's accuracy on
those preference pairs (the first `--pairs-n`) and how often it orders a pair as
torch-fp32 does: what a precision change costs where it matters. `--tiny` runs a tiny
random Llama in seconds (tests/test_bench_onnx.py).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from bench_cpu import _save_tiny_backbone, cpu_model, ppo_workload
from common import run_and_report

from rmserve.service.engine.ensemble import (
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    save_member,
    write_manifest,
)
from rmserve.service.engine.model import load_model, native_bf16_cpu
from rmserve.service.engine.onnx_export import export_onnx, quantize_int8
from rmserve.service.engine.onnx_runtime import GRAPH, OnnxEngine, load_onnx_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import load_pairs
from rmserve.training.encoding import EncodedPairs, encode_pairs

DEFAULT = Path(__file__).resolve().parent.parent / "service" / "default_model"
TARGET = 1.3  # the deployment issue's goal: ORT >= 1.3x torch fp32


def _tiny_model(tmp: Path) -> Path:
    _save_tiny_backbone(tmp / "backbone", 64)
    spec = MemberSpec(name="member0", backbone=str(tmp / "backbone"))
    save_member(tmp / "tiny", spec, MemberTensors(torch.randn(8, 64) / 8, torch.zeros(8)))
    write_manifest(tmp / "tiny", EnsembleManifest(name="tiny", version="t", kind="heads", members=[spec], max_tokens=1024))
    return tmp / "tiny"


def _int8(export: Path, out: Path) -> Path:
    """The exported directory with its graph quantised as `export-onnx --quantize int8` does."""
    shutil.copytree(export, out)
    quantize_int8(out / GRAPH, lambda m: print(f"  {m}", file=sys.stderr))
    return out


def pair_sequences(path: str, n: int, encoder) -> EncodedPairs:
    """The first n pairs of a preference file, encoded as the trainer encodes them."""
    pairs, report = load_pairs(path)
    return encode_pairs(pairs[:n], encoder, report)


def run_all(args, argv: list[str], tmp: Path, t_start: float) -> str:
    torch.manual_seed(0)
    source = _tiny_model(tmp) if args.tiny else DEFAULT
    vocab = 1000 if args.tiny else 49152
    t0 = time.perf_counter()
    export_onnx(source, tmp / "onnx", samples=8, progress=lambda m: print(f"  {m}", file=sys.stderr))
    export_s = time.perf_counter() - t0
    w = ppo_workload(args.n, 32, 128 if args.tiny else 512, vocab)
    engines = {
        "torch-fp32": ScoringEngine(load_model(source, dtype="float32")),
        "torch-fp32-padded": ScoringEngine(load_model(source, dtype="float32"), packing="off"),
    }
    if native_bf16_cpu():
        engines["torch-bf16"] = ScoringEngine(load_model(source, dtype="bfloat16"))
    engines["onnx-fp32"] = OnnxEngine(load_onnx_model(tmp / "onnx"))
    if args.int8:
        engines["onnx-int8"] = OnnxEngine(load_onnx_model(_int8(tmp / "onnx", tmp / "onnx-int8")))
    for e in engines.values():  # warm-up: thread pools, oneDNN primitives, ORT's allocator arenas
        e.score(w.seqs[:8])
    best = {name: float("inf") for name in engines}
    scores: dict[str, np.ndarray] = {}
    for r in range(args.repeat):
        for name, e in engines.items():
            t = time.perf_counter()
            scores[name] = e.score(w.seqs).rewards
            best[name] = min(best[name], time.perf_counter() - t)
            print(f"  round {r + 1}/{args.repeat} {name}: {time.perf_counter() - t:.2f} s", file=sys.stderr, flush=True)
    pair_rows = []
    if args.pairs:
        enc = pair_sequences(args.pairs, args.pairs_n, engines["torch-fp32"].model.encoder)
        n = len(enc.chosen)
        margins = {name: (lambda m: m[enc.chosen] - m[enc.rejected])(e.score(enc.seqs).mean)
                   for name, e in engines.items()}
        for name, m in margins.items():
            agree = float(np.mean(np.sign(m) == np.sign(margins["torch-fp32"])))
            pair_rows.append(f"| {name} | {float(np.mean(m > 0)):.3f} | {agree:.3f} |")
    tokens = sum(map(len, w.seqs))
    ref = scores["torch-fp32"]
    std = max(float(ref.std()), 1e-12)
    lines = [
        "# onnxruntime vs torch on the embedded default (CPU)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()} ({torch.get_num_threads()} threads, native bf16: {native_bf16_cpu()}); "
        f"torch {torch.__version__}; onnxruntime {__import__('onnxruntime').__version__}; python {platform.python_version()}",
        f"- model: {'tiny random Llama (2 layers, hidden 64)' if args.tiny else 'the embedded default (SmolLM2 cut at 14 layers, 8 heads)'}; "
        f"export + check {export_s:.0f} s",
        f"- workload: {w.title} ({tokens} tokens); best of {args.repeat} interleaved rounds after a warm-up",
        f"- command: `python bench/bench_onnx.py {' '.join(argv)}`",
        "",
        "| variant | seconds | tokens/s | x torch-fp32 | max abs reward diff / std |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in best.items():
        diff = float(np.abs(scores[name] - ref).max()) / std
        lines.append(f"| {name} | {s:.2f} | {tokens / s:,.0f} | {best['torch-fp32'] / s:.2f} | {diff:.2e} |")
    if pair_rows:
        lines += ["", f"Preference pairs: the first {n} of `{args.pairs}` (chosen must outscore rejected)", "",
                  "| variant | accuracy | same order as torch-fp32 |", "| --- | --- | --- |", *pair_rows]
    ratio = best["torch-fp32"] / best["onnx-fp32"]
    lines += ["", f"- {'PASS' if ratio >= TARGET else 'MISS'} onnx-fp32 / torch-fp32 >= {TARGET}: {ratio:.2f}"]
    if "torch-bf16" in best:
        lines.append(f"- onnx-fp32 / torch-bf16 (what `--dtype auto` serves on this CPU): "
                     f"{best['torch-bf16'] / best['onnx-fp32']:.2f}")
    lines.append(f"- wall time {time.perf_counter() - t_start:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="sequences in the PPO-like workload")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best is kept")
    p.add_argument("--int8", action="store_true", help="also time the graph as `export-onnx --quantize int8` writes it")
    p.add_argument("--pairs", metavar="JSONL", help="preference pairs to measure each variant's accuracy on")
    p.add_argument("--pairs-n", type=int, default=100, help="how many of --pairs to score")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; for tests)")
    p.add_argument("--out", help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_and_report(argv, parse_args, run_all, "rmserve-bench-onnx-")


if __name__ == "__main__":
    sys.exit(main())
