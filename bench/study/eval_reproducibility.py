"""Study: how far the served dev margins move between valid serving paths of one dtype.

Run (2-core CPU, ~6 minutes):

    .venv/bin/python bench/study/eval_reproducibility.py --out bench/results/eval-reproducibility-$(date +%F).md

The embedded default scores the dev pairs through `rmserve eval`'s own path
(`score_pairs`) once per variant, each in a fresh process (the attention path is
chosen at load):

  bf16-kernel   bf16 as served where the fixed-order attention kernel is built
  bf16-grid     bf16 with RMSERVE_CPU_ATTENTION=0 (the 64-row sdpa grid)
  fp32-kernel   float32 with the kernel
  fp32-grid     float32 with RMSERVE_CPU_ATTENTION=0

Printed per variant: accuracy, ECE, Brier, NLL; the largest and 99th-percentile
|margin difference| from the other path of its dtype and from fp32-kernel; pairs
that changed side, with their margins; and the near ties at `MARGIN_NOISE`, the
band `rmserve eval` reports and the committed-report test allows. Different CPUs
(AMX, no AVX-512) move bf16 margins by other GEMM kernels too; this measures one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from bench_cpu import cpu_lines  # noqa: E402

from rmserve.training.evaluate import MARGIN_NOISE, score_pairs  # noqa: E402
from rmserve.training.metrics import accuracy, brier, ece, nll  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"
VARIANTS = {  # name -> (dtype, environment)
    "bf16-kernel": ("bfloat16", {}),
    "bf16-grid": ("bfloat16", {"RMSERVE_CPU_ATTENTION": "0"}),
    "fp32-kernel": ("float32", {}),
    "fp32-grid": ("float32", {"RMSERVE_CPU_ATTENTION": "0"}),
}
PARTNER = {"bf16-kernel": "bf16-grid", "bf16-grid": "bf16-kernel", "fp32-kernel": "fp32-grid", "fp32-grid": "fp32-kernel"}


def child(variant: str, out: Path, data: Path) -> None:
    from rmserve.kernels import cpu_attention
    from rmserve.service.engine.model import load_model
    from rmserve.service.server.config import DEFAULT_MODEL_DIR

    rm = load_model(DEFAULT_MODEL_DIR, dtype=VARIANTS[variant][0])
    pr = score_pairs(rm, data)
    np.savez(out, margins=pr.margins, weight=pr.weight, kernel=cpu_attention.available())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEV)
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_out, args.data)
        return

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, env) in VARIANTS.items():
            out = Path(tmp) / f"{name}.npz"
            print(f"scoring {name} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--data", str(args.data), "--child", name, "--child-out", str(out)],
                           env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, check=True)
            with np.load(out) as z:
                runs[name] = {k: z[k] for k in z.files}

    lines = [f"# Served dev margins across serving paths ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             *cpu_lines(), f"data: {args.data} ({len(runs['fp32-kernel']['margins'])} pairs)",
             f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", "",
             "| variant | kernel | accuracy | ECE | Brier | NLL | max / p99 \\|Δd\\| vs other path | "
             "max \\|Δd\\| vs fp32-kernel | changed side vs other path (d here / there) | near ties (\\|d\\| < noise) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        d, w, other, ref = r["margins"], r["weight"], runs[PARTNER[name]]["margins"], runs["fp32-kernel"]["margins"]
        diff = np.abs(d - other)
        flips = np.flatnonzero((d > 0) != (other > 0))
        noise = MARGIN_NOISE[VARIANTS[name][0]]
        lines.append(
            f"| {name} | {bool(r['kernel'])} | {accuracy(d, w):.4f} | {ece(d, w):.4f} | {brier(d, w):.5f} | "
            f"{nll(d, w):.5f} | {diff.max():.2e} / {np.quantile(diff, 0.99):.2e} | {np.abs(d - ref).max():.2e} | "
            f"{', '.join(f'#{i} ({d[i]:+.4f} / {other[i]:+.4f})' for i in flips) or 'none'} | "
            f"{int((np.abs(d) < noise).sum())} (< {noise:g}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
