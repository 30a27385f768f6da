"""The committed stubs must be what scripts/gen_protos.sh generates now."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_fresh(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests has grpc_tools
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT, env=env)
    committed = ROOT / "protos" / "rmserve" / "v1"
    fresh = tmp_path / "rmserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(f"{p}{s}" for p in ("admin", "reward") for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    stale = [n for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    assert not stale, f"stale generated stubs {stale}: run scripts/gen_protos.sh and commit"


def test_bare_folder_names_are_not_importable_from_an_install(tmp_path):
    """Outside the checkout (cwd elsewhere), only `rmserve.*` resolves."""
    code = (
        "import importlib.util, rmserve.service, rmserve.client, rmserve.kernels, rmserve.training\n"
        "print([b for b in ('service', 'client', 'kernels', 'training') if importlib.util.find_spec(b)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
