"""bench/bench_members.py runs (tiny) and its shared-trunk members score as each member alone."""

from __future__ import annotations

import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_members_tiny_runs_and_reports_every_variant(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_members", None)
    import bench_members

    assert bench_members.main(["--tiny", "--n", "6", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("default", "default-no-ood", "members-shared", "members-alone"):
        assert re.search(rf"\| {name} \| \d+ \| [\d.]+ \|", out), name
    diff = float(re.search(r"max \|reward difference\| on 4 sequences: (\S+)", out).group(1))
    assert diff < 1e-4
