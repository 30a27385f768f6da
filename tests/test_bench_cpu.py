"""The CPU benchmark runs end to end with a tiny model, and its variants agree on the scores.

Every variant scores the same token ids (GRPO through text, which the server
tokenises itself), so in fp32 the scores must match the baseline: a wrong last
token, a misplaced prefix cache or other ids would show here as differences of
the order of the score std.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_cpu.py"
VARIANTS = {"hf-padded", "hf-best-fp32", "hf-best-bf16", "engine-fp32", "engine-bf16", "grpc-fp32", "grpc-bf16"}


def run_bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},  # bench/ first on sys.path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def table_rows(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]


def test_tiny_cpu_benchmark_runs_every_variant_and_fp32_scores_agree(tmp_path: Path) -> None:
    out = tmp_path / "cpu.md"
    stdout = run_bench("--out", str(out))
    rows = table_rows(stdout)
    for workload in ("ppo", "grpo"):
        got = [r for r in rows if r["workload"] == workload]
        assert {r["key"] for r in got} == VARIANTS and len(got) == len(VARIANTS), stdout
    diff = "max abs score diff / baseline std"
    for r in rows:
        rel = float(r[diff])
        assert math.isfinite(rel) and float(r["seconds"]) > 0 and r["of ceiling"].endswith("%"), r
        if r["dtype"] == "fp32":
            assert rel < 1e-3, r
        else:  # bf16 rounds, but the scores are still the same sequences'
            assert r["dtype"] == "bf16" and rel < 0.5, r
    assert "PPO-like:" in stdout and "GRPO-like:" in stdout and "ceiling fp32" in stdout
    assert stdout.count("gRPC / in-process engine >= 0.95") == 4 and "n/a" not in stdout
    assert "- CPU: " in stdout and "native bf16 matmuls" in stdout and "measured matmul rate in this run" in stdout
    assert "- ppo fp32:" in stdout and "- grpo bf16:" in stdout
    text = out.read_text()
    assert text.strip() in stdout and "command: `python bench/bench_cpu.py --tiny --out" in text
    assert "torch " in text and "threads" in text


def test_subset_runs_the_baseline_and_marks_the_rest_not_run() -> None:
    stdout = run_bench("--workloads", "grpo", "--variants", "hf-best-fp32")
    rows = table_rows(stdout)
    assert [(r["workload"], r["key"]) for r in rows] == [("grpo", "hf-padded"), ("grpo", "hf-best-fp32")], stdout
    assert float(rows[1]["max abs score diff / baseline std"]) < 1e-3
    assert "PPO-like:" not in stdout and "n/a" in stdout and "PASS" not in stdout and "MISS" not in stdout


def test_packed_engine_rows_score_the_same_and_report_their_ratio() -> None:
    keys = ["engine-packed-fp32", "engine-padded-fp32", "engine-packed-bf16", "engine-padded-bf16"]
    stdout = run_bench("--workloads", "ppo", "--variants", *keys)
    rows = {r["key"]: r for r in table_rows(stdout)}
    assert set(rows) == {"hf-padded", *keys}, stdout
    for key in keys:
        assert float(rows[key]["max abs score diff / baseline std"]) < (1e-3 if "fp32" in key else 0.5), rows[key]
    assert "Packed / padded engine throughput (same dtype):" in stdout
    assert "- ppo fp32: " in stdout and "- ppo bf16: " in stdout


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as `python bench/bench_cpu.py` imports
    bench = importlib.import_module("bench_cpu")
    info = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse4_2\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert bench.cpu_flags(info) == {"avx2": True, "avx512f": True, "avx512_bf16": True,
                                     "amx_tile": False, "amx_bf16": False}
    assert bench.cpu_flags("") == dict.fromkeys(bench.CPU_FLAGS, False)


def test_isa_caps_report_what_the_kernels_run_under() -> None:
    """The no-AVX-512 table is measured on an AVX-512 machine with ISA caps; the report must say so:
    torch's own dispatch level (read from torch, not echoed from the variable) and each cap set."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_cpu; print(bench_cpu.isa_caps())")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONSAFEPATH": "1",
           "RMSERVE_CPU_ATTENTION": "0"}
    env.pop("MKL_ENABLE_INSTRUCTIONS", None)
    env.pop("RMSERVE_KERNEL_MARCH", None)
    out = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == ("ATen kernels DEFAULT; no attention kernel (disabled by RMSERVE_CPU_ATTENTION=0); "
                   "ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=AVX2")


# --------------------------------------------------------------------------- #
# --against: a server from this checkout vs one from a git ref (bench/before_after.py)
# --------------------------------------------------------------------------- #

def _before_after(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as bench_cpu.py imports it
    return importlib.import_module("before_after")


def _git_checkout() -> bool:
    try:
        subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def test_a_ref_is_staged_as_installed_and_wins_over_the_editable_install(monkeypatch, tmp_path: Path) -> None:
    """The ref's tree, mapped by its own pyproject.toml: every package's modules and its package data
    (default model, kernel sources, protos); a child with the staged folder on PYTHONPATH imports
    rmserve from there, not from the checkout an editable install points at."""
    import pytest

    if not _git_checkout():
        pytest.skip("not a git checkout: --against needs git")
    ba = _before_after(monkeypatch)
    commit = ba.export_ref("HEAD", tmp_path / "src")
    assert commit == ba.resolve("HEAD") and len(commit) == 40
    staged = ba.stage(tmp_path / "staged", tmp_path / "src")
    pkg = staged / "rmserve"
    for rel in ("__init__.py", "v1/reward_pb2.py", "v1/reward.proto", "service/cli.py", "service/engine/__init__.py",
                "kernels/cpu_attention.cpp", "service/default_model/manifest.json"):
        assert (pkg / rel).is_file(), rel
    assert not list(pkg.rglob("test_*.py")) and not (pkg / "tests").exists()
    code = "import rmserve, rmserve.v1.reward_pb2 as pb, rmserve.service as s; print(rmserve.__file__); print(pb.__file__); print(s.__file__)"
    env = {**os.environ, "PYTHONPATH": str(staged)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert len(out) == 3 and all(Path(f).resolve().is_relative_to(staged.resolve()) for f in out), out


def test_package_dirs_follow_setuptools_mapping(monkeypatch) -> None:
    ba = _before_after(monkeypatch)
    mapping = {"rmserve": "protos/rmserve", "rmserve.service": "service", "rmserve.service.server": "service/server"}
    assert ba.package_dir("rmserve.service.server", mapping) == "service/server"
    assert ba.package_dir("rmserve.service.server.requests", mapping) == "service/server/requests"
    assert ba.package_dir("rmserve.v1", mapping) == "protos/rmserve/v1"
    assert ba.package_dir("other.pkg", {"": "src"}) == "src/other/pkg"


def test_an_unknown_ref_is_refused_by_name(monkeypatch) -> None:
    import pytest

    if not _git_checkout():
        pytest.skip("not a git checkout: --against needs git")
    ba = _before_after(monkeypatch)
    with pytest.raises(SystemExit, match="no-such-ref-here"):
        ba.resolve("no-such-ref-here")


def test_ratios_are_new_over_old_and_the_verdict_weighs_the_spread(monkeypatch) -> None:
    ba = _before_after(monkeypatch)
    s = ba.summarise([2.0, 2.2, 2.1], [1.0, 1.1, 1.0], [4.0, 4.0, 4.0], [2.0, 2.0, 2.0])
    assert (s.best, s.median, s.cpu_median) == (2.0, 2.1, 2.0)
    assert s.paired == [2.0, 2.0, 2.1] and math.isclose(s.spread_new, 1.1) and math.isclose(s.spread_old, 1.1)
    assert s.verdict == "slower beyond noise"
    assert ba.summarise([1.0, 2.0, 1.0], [1.0, 1.0, 1.0], [1.0] * 3, [1.0] * 3).verdict == "within noise"
    assert ba.summarise([1.0, 1.0, 1.0], [2.0, 2.1, 2.0], [1.0] * 3, [1.0] * 3).verdict == "faster beyond noise"


def test_cpu_lists_parse_like_taskset(monkeypatch) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    bench = importlib.import_module("bench_cpu")
    assert bench.parse_cpus("0-1,4") == {0, 1, 4} and bench.parse_cpus("3") == {3}


def test_against_head_serves_both_sides_and_reports_ratios(tmp_path: Path) -> None:
    """End to end with the tiny model: two server processes (this working tree and HEAD), the same
    scores on both, a ratio row per workload (no timing is asserted)."""
    import pytest

    if not _git_checkout():
        pytest.skip("not a git checkout: --against needs git")
    out = tmp_path / "ab.md"
    stdout = run_bench("--against", "HEAD", "--repeat", "3", "--n", "8", "--groups", "1", "--out", str(out))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert f"- new: {head} (this checkout's working tree" in stdout and f"- old: {head} (HEAD = " in stdout
    assert "rmserve imported from the staged copies (checked)" in stdout and "/new-staged/rmserve/" in stdout
    for w in ("ppo", "grpo"):
        diff = next(ln for ln in stdout.splitlines() if ln.startswith(f"- {w}: max |score new - score old| = "))
        assert float(diff.split("(")[1].split(" x ")[0]) < 1e-3, diff
        rows = [r for r in table_rows(stdout.split("Ratios are time new / time old")[1]) if r["workload"] == w]
        assert len(rows) == 1 and float(rows[0]["best ratio"]) > 0, rows
        assert rows[0]["verdict"] in ("within noise", "slower beyond noise", "faster beyond noise")
    per_round = table_rows(stdout.split("Per round")[1].split("Ratios are")[0])
    assert [(r["round"].split()[0], r["workload"]) for r in per_round] == [
        (str(n), w) for n in (1, 2, 3) for w in ("ppo", "grpo")]
    assert "Idle server's CPU time while the other was driven" in stdout
    assert out.read_text().strip() in stdout and "command: `python bench/bench_cpu.py --tiny --against HEAD" in stdout
