"""bench/bench_onnx.py runs (tiny) and reports every variant, with ORT's scores equal to torch's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_onnx_tiny_runs_and_reports_every_variant(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_onnx", None)
    import bench_onnx

    assert bench_onnx.main(["--tiny", "--n", "6", "--repeat", "1", "--int8"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (\S+) \| [\d.]+ \| [\d,]+ \| [\d.]+ \| (\S+) \|$", out, re.M))
    assert {"torch-fp32", "torch-fp32-padded", "onnx-fp32", "onnx-int8"} <= set(rows)
    assert float(rows["torch-fp32"]) == 0.0
    assert float(rows["onnx-fp32"]) < 1e-4        # the same model, another runtime
    assert 0.0 < float(rows["onnx-int8"]) < 0.5   # int8 moves scores, but not past recognition
    assert re.search(r"(PASS|MISS) onnx-fp32 / torch-fp32 >= 1.3: [\d.]+", out)
