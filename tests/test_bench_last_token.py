"""The last-token benchmark script runs end to end (CPU, tiny shapes, Triton interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_prints_and_writes_the_tables(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    out = tmp_path / "table.md"
    # --max-gib 1e-5 (10.7 kB) lets [17, 8, 37] bf16 through and skips [17, 8, 64]: both paths run.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_last_token.py"), "--tiny", "--max-gib", "1e-5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},  # bench/ first on sys.path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "| B | H | K | T | kernel µs | kernel GB/s | of copy BW |" in proc.stdout
    assert "| B | H | L dtype | kernel µs | TFLOP/s (2·B·H²) |" in proc.stdout
    timed = [line for line in lines if line.startswith("| 17 | 37 | 8 | 8 |")]
    skipped = [line for line in lines if line.startswith("| 17 | 64 | 8 | 4 |")]
    assert len(timed) == 1 and "skipped" not in timed[0], proc.stdout
    assert len(skipped) == 1 and "skipped" in skipped[0], proc.stdout
    data_rows = [line for line in lines if line.startswith("| ") and not line.startswith("| B |")]
    assert len(data_rows) == 8 + 8   # 2 B x 2 H x 2 K heads rows, 2 B x 2 H x 2 L dtypes epistemic rows
    assert out.read_text() == proc.stdout
