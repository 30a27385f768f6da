"""The GPU benchmark script runs end to end on CPU with tiny shapes, so it cannot rot without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_gpu_benchmark_prints_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},  # bench/ first on sys.path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| model | workload | variant | seconds | tok/s | completions/s | MFU | x baseline |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny |")]
    variants = [line.split(" | ")[2] for line in rows]
    assert len(rows) == 6 and sum(v.startswith("rmserve") for v in variants) == 2, proc.stdout
    assert "hf-padded (baseline)" in variants and "FAIL" not in proc.stdout
    assert out.read_text().strip() == proc.stdout.strip()
