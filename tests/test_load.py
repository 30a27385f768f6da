"""The load test, tiny: 8 clients for 5 s against a tiny model behind a queue of 16.

Every answer is checked against the same model scored alone in the load test's own process:
nothing lost, duplicated or wrong, and the excess load refused with RESOURCE_EXHAUSTED (no
timing thresholds: the figures themselves are bench/results/load-test-*.md's business).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "load_test.py"


@pytest.mark.slow
def test_tiny_load_test_loses_nothing_and_refuses_the_excess(tmp_path: Path) -> None:
    out, figures = tmp_path / "load.md", tmp_path / "load.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--clients", "8", "--processes", "2", "--seconds", "5",
           "--max-queue", "16", "--timeout", "60", "--samples", "64", "--out", str(out), "--json", str(figures)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads(figures.read_text())
    assert s["results"] > 0 and s["calls"] > 0, s
    assert s["lost"] == s["duplicated"] == s["unexpected"] == s["mismatched"] == 0, s
    assert s["errors"] == 0, s["outcomes"]  # only OK, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED
    assert s["outcomes"].get("probe/RESOURCE_EXHAUSTED", 0) > 0 and s["server"]["refused"] > 0, s["outcomes"]
    assert s["outcomes"].get("retry/OK", 0) > 0, s["outcomes"]  # retrying clients get through
    text = out.read_text()
    assert "| lost / duplicated / unexpected / mismatched | 0 / 0 / 0 / 0 |" in text
    assert "CPU: " in text and "server peak RSS" in text
