"""Shared fixtures: tiny random-weight models saved as real checkpoint directories, servers.

The helpers they are built on (and that test modules import directly) live in tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import (
    SERVED_SAMPLES,
    make_tiny_bert_seqcls,
    make_tiny_ensemble,
    make_tiny_llama_backbone,
    make_tiny_llama_seqcls,
    start_server,
    wait_for_line,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama_backbone(tmp_path_factory) -> Path:
    return make_tiny_llama_backbone(tmp_path_factory.mktemp("llama_backbone"))


@pytest.fixture(scope="session")
def tiny_llama4_backbone(tmp_path_factory) -> Path:
    """Four layers, for layer cuts."""
    return make_tiny_llama_backbone(tmp_path_factory.mktemp("llama4_backbone"), seed=7, num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_llama_seqcls(tmp_path_factory) -> Path:
    return make_tiny_llama_seqcls(tmp_path_factory.mktemp("llama_seqcls"))


@pytest.fixture(scope="session")
def tiny_bert_seqcls(tmp_path_factory) -> Path:
    return make_tiny_bert_seqcls(tmp_path_factory.mktemp("bert_seqcls"))


@pytest.fixture(scope="session")
def smollm2_ensemble(tmp_path_factory) -> Path:
    """The embedded default's backbone (SmolLM2-135M, fetched and converted once) with 3 random heads."""
    import torch

    from rmserve.service.engine.ensemble import (
        EnsembleManifest,
        MemberSpec,
        MemberTensors,
        save_member,
        write_manifest,
    )

    out = tmp_path_factory.mktemp("smollm2_ensemble")
    spec = MemberSpec(name="member0", backbone="builtin:smollm2-135m-instruct")
    g = torch.Generator().manual_seed(0)
    save_member(out, spec, MemberTensors(weight=torch.randn(3, 576, generator=g) / 24, bias=torch.zeros(3)))
    write_manifest(out, EnsembleManifest(name="t", version="t", kind="heads", members=[spec], max_tokens=512))
    return out


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> Path:
    return make_tiny_ensemble(tmp_path_factory.mktemp("ensemble"))


@pytest.fixture(scope="session")
def tiny_server(tiny_ensemble):
    s = start_server(tiny_ensemble, max_samples_per_request=16, max_message_bytes=1 << 20)
    yield s
    s.stop()


@pytest.fixture
def serve_process():
    """Start `rmserve serve` child processes, all killed after the test:
    start(model, cwd, *flags) -> (process, address, metrics port or None) once SERVING."""
    started: list[subprocess.Popen] = []

    def start(model, cwd: Path, *extra: str):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rmserve.service.cli", "serve", "--model", str(model), "--port", "0",
             "--registry", str(cwd / "registry"), *extra],
            stderr=subprocess.PIPE, text=True, cwd=cwd,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        )
        started.append(proc)
        m = wait_for_line(proc, r"SERVING .* on 127\.0\.0\.1:(\d+), metrics on (\w+)", [], timeout=300)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        return proc, f"127.0.0.1:{m.group(1)}", None if m.group(2) == "off" else int(m.group(2))

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(30)


@pytest.fixture
def serves_alike():
    """check(address, reference) -> (got, want): SERVED_SAMPLES scored by two servers (another
    backend, and the torch backend's), every field and head equal within 1e-5."""
    import numpy as np

    from rmserve.client import RewardClient

    def check(address: str, reference: str):
        with RewardClient(address) as c, RewardClient(reference) as ref:
            got = c.score(SERVED_SAMPLES, uncertainty_penalty=0.5, return_members=True)
            want = ref.score(SERVED_SAMPLES, uncertainty_penalty=0.5, return_members=True)
        for g, w in zip(got, want, strict=True):
            for name in ("reward", "std", "min", "conservative", "epistemic", "num_tokens"):
                assert getattr(g, name) == pytest.approx(getattr(w, name), rel=1e-5, abs=1e-5), name
            np.testing.assert_allclose(g.members, w.members, rtol=1e-5, atol=1e-5)
        return got, want

    return check


@pytest.fixture
def server_factory():
    """Start extra servers with their own config; all are stopped after the test."""
    started = []

    def make(model, wait_ready: bool = True, **config):
        s = start_server(model, wait_ready, **config)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def fake_server():
    """The client SDK's fake RewardService (tests/client_fake_server.py), one per test module."""
    from tests.client_fake_server import FakeServer

    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def fs(fake_server):
    """The module's fake server, its calls and injected failures cleared and serving, for one test."""
    fake_server.reset()
    fake_server.set_serving(True)
    return fake_server
