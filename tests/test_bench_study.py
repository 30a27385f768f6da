"""bench/study: only what something still cites stays, and it still runs.

The other studies were retired once their conclusions were recorded in bench/results/
(each result file names the commit whose script produced it). ece_noise_floor.py stays
because the README's ECE row cites it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "bench" / "study"


def load_study(name: str):
    """Import by path under a unique name: bench/study is no package."""
    spec = importlib.util.spec_from_file_location(f"rmserve_study_{name}", STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_study_script_left_is_cited_outside_bench_results():
    cited = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for script in STUDY.glob("*.py"):
        assert f"bench/study/{script.name}" in cited, f"{script.name}: nothing cites it; retire it (see bench/results/)"


def test_retired_studies_name_the_commit_that_produced_them():
    for result in (ROOT / "bench" / "results").glob("*.md"):
        text = result.read_text()
        for script in set(re.findall(r"bench/study/(\w+\.py)", text)):
            if (STUDY / script).exists():
                continue
            stem = script.removesuffix(".py")
            assert re.search(rf"{stem}(\.py)?\b[\s\S]{{0,300}}?commit\s+[0-9a-f]{{7}}", text), (
                f"{result.name} cites retired {script} without the commit that produced it")


def test_noise_floor_of_a_calibrated_model_contains_its_ece_and_not_an_overconfident_one():
    ece_noise_floor = load_study("ece_noise_floor")
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 1.0, 300)
    floor = ece_noise_floor.noise_floor(d, draws=200)
    assert floor.shape == (200,) and np.all((floor > 0) & (floor < 0.5))
    assert np.array_equal(floor, ece_noise_floor.noise_floor(d, draws=200))  # seeded: a rerun reproduces it
    calibrated = np.where(rng.random(300) < 1 / (1 + np.exp(-d)), d, -d)  # outcomes drawn from σ(d)
    assert np.mean(floor >= ece_noise_floor.pair_ece(calibrated)) > 0.05
    overconfident = 5 * np.where(rng.random(300) < 0.6, 1.0, -1.0)  # claims 99%, right 60% of the time
    assert ece_noise_floor.pair_ece(overconfident) > floor.max()


HH = "\n\nHuman: {q}\n\nAssistant: {a}"


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"chosen": HH.format(q=f"question {i}", a=f"a careful answer {i}"),
             "rejected": HH.format(q=f"question {i}", a="no")} for i in range(12)]
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ece_noise_floor_runs_on_a_model_and_prints_its_summary(tiny_ensemble, pairs_file, capsys):
    ece_noise_floor = load_study("ece_noise_floor")
    assert ece_noise_floor.main([str(tiny_ensemble), "--data", str(pairs_file), "--draws", "20"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"12 pairs; observed ECE ([\d.]+); a calibrated model's ECE: mean ([\d.]+), .*"
                  r"P\(ECE >= observed\) ([\d.]+), P\(ECE <= 0\.05\) ([\d.]+)", out)
    assert m, out
    assert all(0 <= float(v) <= 1 for v in m.groups())
    assert re.search(r"mean confidence 0\.\d+, accuracy [01]\.\d+", out), out
