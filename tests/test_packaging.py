"""Packaging: a build prints no setuptools warning (they were printed on every install: the
license as a TOML table, the default model's folders "would be ignored"), the wheel ships every
file of the embedded default model, and the server finds that model where it is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = """
import sys, warnings
warnings.simplefilter("always")
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""


def test_the_build_warns_nothing_and_the_wheel_holds_the_whole_default_model(tmp_path):
    src = tmp_path / "src"  # setuptools writes build/ and *.egg-info into the source tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             "tests", "bench", "docs", "examples", "deploy"))
    r = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "Warning" in line]
    assert not warnings, "\n".join(warnings)
    names = set(zipfile.ZipFile(tmp_path / "dist" / r.stdout.split()[-1]).namelist())
    shipped = {f"rmserve/service/{p.relative_to(ROOT / 'service').as_posix()}"
               for p in (ROOT / "service" / "default_model").rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)


def test_the_default_model_dir_is_the_embedded_model():
    from rmserve.service.server.config import DEFAULT_MODEL_DIR

    assert DEFAULT_MODEL_DIR.resolve() == (ROOT / "service" / "default_model").resolve()
