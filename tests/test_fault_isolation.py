"""Faults affect only what they must: a poisoned sample fails its own request, with a status
that names it, and every other request of its batch is answered correctly; an engine that
crashes answers every caller with an error instead of leaving them waiting.

The poison is a test-only engine (`FaultyEngine` below, put in the backend registry for one
test): a batch holding that token id raises, or yields NaN for that sequence. No test depends on
timing: the three requests share one batch because the batch closes exactly when its token
budget is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Literal

import grpc
import numpy as np
import pytest

from rmserve.client import AsyncRewardClient
from rmserve.client.errors import InternalServerError
from rmserve.service.engine import backends
from rmserve.service.engine.heads import EngineOutput

MARKER = 42
A = [[5, 6, 7, 8], [9, 10, 11]]
B = [[12, 13, 14], [15, MARKER, 16, 17], [18, 19]]   # B's sample 1 is poisoned
C = [[20, 21, 22, 23, 24]]
B_CLEAN = [[43 if t == MARKER else t for t in s] for s in B]
TOKENS = sum(len(s) for r in (A, B, C) for s in r)


class FaultyEngine:
    """Wraps a backend's engine: a `score` call whose sequences hold `token` raises (mode "raise":
    the whole batch fails, as a forward would) or gives NaN scores for those sequences ("nan")."""

    def __init__(self, engine, token: int, mode: Literal["raise", "nan"]):
        self.engine, self.token, self.mode = engine, token, mode
        self.model = engine.model

    def score(self, seqs: list[list[int]]) -> EngineOutput:
        hit = [i for i, s in enumerate(seqs) if self.token in s]
        if hit and self.mode == "raise":
            raise RuntimeError(f"injected fault: token {self.token} in {len(hit)} of {len(seqs)} sequences")
        out = self.engine.score(seqs)
        for name in ("rewards", "mean", "var", "min"):
            getattr(out, name)[hit] = np.nan
        return out


def inject_faults(monkeypatch, token: int, mode: Literal["raise", "nan"]) -> None:
    """Servers started from now on (in this process) score through a FaultyEngine."""
    torch_backend = backends.BACKENDS["torch"]
    monkeypatch.setitem(backends.BACKENDS, "torch", dataclasses.replace(
        torch_backend, engine=lambda model, **kw: FaultyEngine(torch_backend.engine(model, **kw), token, mode)))


def samples(seqs: list[list[int]], prefix: str) -> list[dict]:
    return [{"token_ids": s, "id": f"{prefix}{i}"} for i, s in enumerate(seqs)]


def three_requests(address: str, b: list[list[int]] = B) -> list:
    """A, b and C at once (TOKENS tokens in all: one batch's budget, so they close it)."""

    async def go():
        async with AsyncRewardClient(address, timeout=120, max_retries=0) as client:
            return await asyncio.gather(
                client.score(samples(A, "a")), client.score(samples(b, "b")), client.score(samples(C, "c")),
                return_exceptions=True,
            )

    return asyncio.run(go())


def batches(server) -> tuple[int, int]:
    """(scheduler batches, sequences in them) so far."""
    hist = server.server.state.metrics.batch_sequences
    got = {s.name: s.value for m in hist.collect() for s in m.samples if not s.labels.get("le")}
    return int(got["rmserve_batch_sequences_count"]), int(got["rmserve_batch_sequences_sum"])


@pytest.mark.parametrize("mode, says", [("raise", "injected fault"), ("nan", "not finite")])
def test_a_poisoned_sample_fails_only_its_request(tiny_ensemble, server_factory, monkeypatch, mode, says):
    inject_faults(monkeypatch, MARKER, mode)
    # the batch closes when it holds exactly the three requests' tokens (the wait is an hour)
    srv = server_factory(tiny_ensemble, batch_tokens=TOKENS, max_wait_ms=3_600_000, runs_file="")
    a, b, c = three_requests(srv.address)

    assert batches(srv) == (1, len(A) + len(B) + len(C))  # they did share one batch
    assert isinstance(b, InternalServerError) and b.code == grpc.StatusCode.INTERNAL
    assert "sample 1 (id 'b1')" in b.details and says in b.details, b.details
    engine = srv.server.state.slot.engine
    for seqs, results in ((A, a), (C, c)):
        assert not isinstance(results, BaseException), results
        want = [float(engine.score([s]).mean[0]) for s in seqs]  # each sample alone, in this process
        np.testing.assert_allclose([r.reward for r in results], want, rtol=1e-5, atol=1e-6)
        assert all(np.isfinite(r.reward) for r in results)
    # B with its poisoned token replaced is fine, and the server goes on serving
    again = three_requests(srv.address, B_CLEAN)
    assert [[r.id for r in res] for res in again] == [["a0", "a1"], ["b0", "b1", "b2"], ["c0"]], again


def test_an_engine_that_crashes_answers_every_caller(tiny_ensemble, server_factory):
    """SystemExit out of the engine (a dying worker) on every batch: each caller gets INTERNAL,
    none waits for ever; with the engine back, the same server serves again."""
    srv = server_factory(tiny_ensemble, batch_tokens=TOKENS, max_wait_ms=3_600_000, runs_file="")
    engine = srv.server.state.slot.engine
    healthy = engine.score

    def crash(seqs):
        raise SystemExit("the engine thread died")

    engine.score = crash
    try:
        results = three_requests(srv.address)
    finally:
        engine.score = healthy
    for r in results:
        assert isinstance(r, InternalServerError), r
        assert "SystemExit" in r.details and "the engine thread died" in r.details, r.details
    again = three_requests(srv.address)
    assert [len(res) for res in again] == [2, 3, 1], again
