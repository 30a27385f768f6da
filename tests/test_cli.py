"""The `rmserve` command as a user runs it: serve, score (JSONL), info, clean stop."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RMSERVE = [sys.executable, "-m", "rmserve.service.cli"]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def served(tiny_ensemble):
    proc = subprocess.Popen(
        [*RMSERVE, "serve", "--model", str(tiny_ensemble), "--port", "0", "--metrics-port", "-1"],
        stderr=subprocess.PIPE, text=True, env=env(),
    )
    log: list[str] = []
    deadline = time.monotonic() + 120
    port = None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"SERVING .* on 127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "no SERVING line:\n" + "".join(log)
    yield proc, f"127.0.0.1:{port}", log
    if proc.poll() is None:
        proc.kill()


def test_serve_score_info_and_graceful_stop(served, tmp_path):
    proc, address, log = served
    assert sum("SERVING" in line for line in log) == 1
    inp = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "prompt": "How do I bake bread?", "response": "Mix flour and water."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"token_ids": [5, 6, 7]},
    ]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    r = subprocess.run([*RMSERVE, "score", "--address", address, "--input", str(inp), "--output", str(out), "--members"],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 3 and scored[0]["id"] == "a"
    for s in scored:
        assert {"reward", "std", "min", "conservative", "epistemic", "num_tokens", "truncated"} <= set(s)
        assert len(s["members"]) == 4 and s["min"] == pytest.approx(min(s["members"]), abs=1e-5)
    r = subprocess.run([*RMSERVE, "info", "--address", address], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["serving"] is True and info["name"] == "tiny-test" and info["num_heads"] == 4
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_score_reports_bad_input_with_line_numbers(served, tmp_path):
    _, address, _ = served
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    r = subprocess.run([*RMSERVE, "score", "--address", address, "--input", str(inp)],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode != 0 and "bad.jsonl:2" in r.stderr
    inp.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    r = subprocess.run([*RMSERVE, "score", "--address", address, "--input", str(inp)],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 1 and "must have role 'assistant'" in r.stderr


def test_serve_without_trained_default_says_what_to_do(tmp_path):
    """In a build without the default heads, `serve` explains instead of serving random heads."""
    from rmserve.service.server.config import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        pytest.skip("this build ships the trained default")
    r = subprocess.run([*RMSERVE, "serve", "--port", "0"], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2
    assert "rmserve serve --model DIR" in r.stderr and "rmserve train" in r.stderr


def test_entry_point_is_installed():
    exe = shutil.which("rmserve", path=str(Path(sys.executable).parent))
    assert exe, "the rmserve console script is not installed next to this python"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "serve" in r.stdout and "score" in r.stdout
