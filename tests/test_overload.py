"""Overload: a greedy client cannot starve a polite one, and a ScoreStream client that stops
reading its answers holds a bounded amount of server memory while others are served.

Assertions are on admission and answers, never on wall-clock time: loops wait for states
(with a hang guard) instead of sleeping.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import grpc
import pytest

from rmserve.client import RewardClient
from rmserve.service.server.reward import STREAM_WINDOW
from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc
from tests.helpers import registry_sample

HANG_GUARD_S = 120.0


def until(condition, what: str, step=lambda: time.sleep(0.01)) -> None:
    end = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        step()


def token_samples(n: int, prefix: str) -> list[pb.Sample]:
    return [pb.Sample(id=f"{prefix}{j}", tokens=pb.TokenIds(ids=[5 + j % 50, 6, 7, 8, 9])) for j in range(n)]


def pushback_ms(err: grpc.RpcError) -> int | None:
    return next((int(v) for k, v in err.trailing_metadata() or () if k == "grpc-retry-pushback-ms"), None)


@pytest.mark.parametrize("identity", ["api-key", "connection"])
def test_a_flooding_client_cannot_starve_a_polite_one(tiny_ensemble, server_factory, tmp_path, identity):
    """The flooder keeps 8 calls of 16 samples in flight (128 samples against a queue of 64);
    the polite client sends one call of 4 at a time and never retries: every one of its calls
    is admitted and answered, while the flooder is held to its share (32) with retry hints.
    With API keys both share one channel (the key is the identity); without, each has its own
    connection (channels of one process share a connection unless told not to, as here)."""
    config = dict(max_queue=64, max_samples_per_request=16, runs_file="")
    if identity == "api-key":
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps({"k-greedy": ["score"], "k-polite": ["score"]}))
        config["api_keys"] = str(keys)
    srv = server_factory(tiny_ensemble, **config)
    assert srv.server.state.scheduler.max_queue_per_client == 32  # the default: half of --max-queue

    def md(key: str) -> tuple:
        return (("authorization", f"Bearer {key}"),) if identity == "api-key" else ()

    shared = grpc.insecure_channel(srv.address)
    flood_channel = shared if identity == "api-key" else grpc.insecure_channel(
        srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
    flood_stub, polite_stub = pb_grpc.RewardServiceStub(flood_channel), pb_grpc.RewardServiceStub(shared)
    outcomes: Counter[str] = Counter()
    refusals: list[grpc.RpcError] = []
    polite_done = threading.Event()

    def flood() -> None:
        n = 0
        while not (polite_done.is_set() and outcomes["RESOURCE_EXHAUSTED"]):
            calls = [flood_stub.Score.future(pb.ScoreRequest(samples=token_samples(16, f"g{n}-{i}-")),
                                             timeout=60, metadata=md("k-greedy")) for i in range(8)]
            for c in calls:
                try:
                    assert len(c.result().results) == 16
                    outcomes["OK"] += 1
                except grpc.RpcError as e:
                    outcomes[e.code().name] += 1
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refusals.append(e)
            n += 1

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        until(lambda: outcomes["RESOURCE_EXHAUSTED"] > 0, "the flooder is refused")
        for k in range(20):  # no retries: each call must be admitted the first time
            resp = polite_stub.Score(pb.ScoreRequest(samples=token_samples(4, f"p{k}-")), timeout=60,
                                     metadata=md("k-polite"))
            assert [r.id for r in resp.results] == [f"p{k}-{j}" for j in range(4)]
    finally:
        polite_done.set()
        flooder.join(HANG_GUARD_S)
        shared.close()
        flood_channel.close()
    assert not flooder.is_alive()
    assert outcomes["OK"] > 0 and set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    e = refusals[0]
    assert "this client already has" in e.details() and "--max-queue-per-client" in e.details(), e.details()
    assert pushback_ms(e) > 0


def test_a_stalled_stream_is_held_to_its_window_while_others_are_served(tiny_ensemble, server_factory):
    """A ScoreStream client that sends 1000 chunks and reads no answer. Its HTTP/2 window stays
    at 64 KB (no BDP probing, as a reader that has stopped), so the server's writes block; the
    stream then holds STREAM_WINDOW chunks and reads no more. Meanwhile another client is
    served, and the stalled stream's scored chunks stay where they are."""
    srv = server_factory(tiny_ensemble, max_samples_per_request=16, runs_file="")
    metrics = srv.server.state.metrics
    total = 1000

    def held() -> float:
        return registry_sample(metrics.registry, "rmserve_stream_chunks_unanswered")

    def scored() -> float:
        return registry_sample(metrics.registry, "rmserve_requests_total", method="ScoreStream.chunk", code="OK")

    def chunks():
        for n in range(total):
            yield pb.ScoreStreamRequest(samples=token_samples(16, f"s{n}-"), options=pb.ScoreOptions(return_members=True))

    stalled = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.RewardServiceStub(stalled).ScoreStream(chunks(), timeout=300)
    seen: list[float] = []
    try:
        with RewardClient(srv.address, timeout=60, max_retries=0) as polite:

            def polite_round() -> float:
                for k in range(5):
                    res = polite.score([{"token_ids": [5, 6, 7, k + 10], "id": f"p{k}"}])
                    assert [r.id for r in res] == [f"p{k}"]
                    seen.append(held())
                return scored()

            until(lambda: held() == STREAM_WINDOW, "the stream holds a full window")
            counts = [polite_round()]
            counts.append(polite_round())
            until(lambda: counts[-1] == counts[-2], "the stream stalls", step=lambda: counts.append(polite_round()))
            before = counts[-1]
            assert polite_round() == before  # still stalled, others still served
            assert held() == STREAM_WINDOW and max(seen) <= STREAM_WINDOW, seen
            assert before < total  # the server did not score the whole stream for a reader that reads nothing
    finally:
        call.cancel()
        stalled.close()
    until(lambda: held() == 0, "the cancelled stream frees its window")
