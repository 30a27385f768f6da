"""bench/bench_onnx.py runs (tiny) and reports every variant, with ORT's scores equal to torch's."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_onnx_tiny_runs_and_reports_every_variant(capsys, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_onnx", None)
    import bench_onnx

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}",
                                         "rejected": f"no {i}"}) + "\n" for i in range(5)))
    assert bench_onnx.main(["--tiny", "--n", "6", "--repeat", "1", "--int8", "--pairs", str(pairs)]) == 0
    out = capsys.readouterr().out
    acc = {name: (float(a), float(same)) for name, a, same in re.findall(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)}
    assert "first 5 of" in out and set(acc) >= {"torch-fp32", "onnx-fp32", "onnx-int8"}
    # a random tiny model's margins are rounding-sized, so only the reference's agreement with itself is fixed
    assert acc["torch-fp32"][1] == 1.0 and all(0 <= a <= 1 and 0 <= same <= 1 for a, same in acc.values())
    rows = dict(re.findall(r"^\| (\S+) \| [\d.]+ \| [\d,]+ \| [\d.]+ \| (\S+) \|$", out, re.M))
    assert {"torch-fp32", "torch-fp32-padded", "onnx-fp32", "onnx-int8"} <= set(rows)
    assert float(rows["torch-fp32"]) == 0.0
    assert float(rows["onnx-fp32"]) < 1e-4        # the same model, another runtime
    assert 0.0 < float(rows["onnx-int8"]) < 0.5   # int8 moves scores, but not past recognition
    assert re.search(r"(PASS|MISS) onnx-fp32 / torch-fp32 >= 1.3: [\d.]+", out)
