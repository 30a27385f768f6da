"""The HTTP benchmark runs end to end with a tiny model and writes its table (no timing thresholds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_http.py"
CASES = ["grpc-batch", "http-batch", "http-concurrent", "grpc-concurrent"]


def table_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_quick_http_benchmark_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "http.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--n", "8", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},  # bench/ first on sys.path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.strip() in proc.stdout
    rows = table_rows(text)
    assert [r["case"] for r in rows] == CASES, text
    for r in rows:
        assert float(r["wall s (median)"]) > 0 and r["requests"] == ("1" if r["case"].endswith("batch") else "8"), r
        batches = float(r["engine batches (median, min-max)"].split()[0])
        assert 1 <= batches <= 8, r  # every sample scored, in at most one batch each
        assert float(r["max abs reward diff vs grpc-batch"]) < 1e-5, r  # HTTP scores what gRPC scores
    assert "command: `python bench/bench_http.py --quick --n 8 --rounds 1 --out" in text
    assert "CPU: " in text and "- one batch of 8: " in text and "coalescing: HTTP 8 requests ->" in text
