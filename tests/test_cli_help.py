"""`rmserve serve --help` marks every backend never run on its target device as experimental.

vLLM, ONNX Runtime on CUDA and accelerate over several GPUs have run only against fakes
and on CPU; they stay experimental until a GPU run is recorded in bench/results/
(docs/STATUS.md, "Waiting for a GPU"), and the help and STATUS say so alike.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RMSERVE = [sys.executable, "-m", "rmserve.service.cli"]


@pytest.fixture(scope="module")
def backend_help() -> str:
    out = subprocess.run([*RMSERVE, "serve", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout
    text = " ".join(out.split())  # argparse wraps lines wherever the terminal width puts them
    m = re.search(r"--backend \{[a-z,]+\} (.*?) --device-map", text)
    assert m, out
    return m.group(1)


def test_vllm_is_marked_experimental(backend_help):
    assert re.search(r"\bvllm \(experimental\b", backend_help), backend_help


def test_onnx_on_cuda_and_accelerate_over_several_gpus_are_marked_experimental(backend_help):
    assert re.search(r"\bonnx \([^)]*experimental on CUDA\)", backend_help), backend_help
    assert re.search(r"\baccelerate \([^)]*experimental over several GPUs\)", backend_help), backend_help


def test_torch_is_not_marked_and_the_help_says_what_lifts_the_mark(backend_help):
    torch = re.search(r"\btorch \(([^)]*)\)", backend_help)
    assert torch and "experimental" not in torch.group(1), backend_help
    assert "until a GPU run is recorded in bench/results/" in backend_help, backend_help


def test_status_marks_the_same_backends_experimental():
    status = (ROOT / "docs" / "STATUS.md").read_text()
    section = status.split("## Waiting for a GPU", 1)[1].split("\n## ", 1)[0]
    mark = re.search(r"Experimental until a GPU run is recorded in bench/results/.*?(?:\n\n|$)", section, re.S)
    assert mark, section
    for backend in ("`--backend vllm`", "ONNX Runtime on CUDA", "`--backend accelerate` over several GPUs"):
        assert backend in " ".join(mark.group(0).split()), backend
