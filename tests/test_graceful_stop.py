"""SIGTERM on `rmserve serve`: health NOT_SERVING first, new calls UNAVAILABLE, the calls in
flight finish with their results, and with none left the process exits at once, without
waiting out the grace period for streams that are merely open."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc
from tests.helpers import scraped_sample

GRACE_S = 60  # long: exiting well within it is the behaviour under test, not a speed
REQ = pb.ScoreRequest(samples=[pb.Sample(text=pb.PromptResponse(prompt="How do I bake bread?", response="Knead."))])


def watch_health(channel: grpc.Channel) -> tuple[list[int], threading.Event]:
    """Statuses a health Watch stream receives (an open stream that never ends by itself)."""
    seen: list[int] = []
    not_serving = threading.Event()

    def run() -> None:
        try:
            for r in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                seen.append(r.status)
                if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    not_serving.set()
        except grpc.RpcError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return seen, not_serving


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_idle_server_exits_at_once_on_sigterm_despite_open_streams(tiny_ensemble, tmp_path, serve_process):
    proc, address, _ = serve_process(tiny_ensemble, tmp_path, "--grace", str(GRACE_S), "--metrics-port", "-1")
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        assert len(stub.Score(REQ, timeout=60).results) == 1
        seen, _ = watch_health(ch)
        # a trainer's ScoreStream: one chunk answered, then the stream stays open and idle
        chunks: list[pb.ScoreStreamRequest] = [pb.ScoreStreamRequest(samples=REQ.samples)]
        more = threading.Event()

        def feed():
            yield from chunks
            more.wait(GRACE_S * 2)

        stream = stub.ScoreStream(feed())
        assert len(next(stream).results) == 1
        wait_until(lambda: seen, "the health Watch's first status")
        proc.send_signal(signal.SIGTERM)
        # a stop that waited for those streams would take the whole 60 s grace
        assert proc.wait(GRACE_S / 2) == 0
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        more.set()


@pytest.mark.timeout(300)
def test_sigterm_finishes_the_call_in_flight_and_refuses_new_ones(tiny_ensemble, tmp_path, serve_process):
    # every batch waits 3 s to fill: a call stays in flight long enough to SIGTERM under it
    proc, address, metrics_port = serve_process(tiny_ensemble, tmp_path, "--grace", str(GRACE_S),
                                                "--metrics-port", "0", "--max-wait-ms", "3000")
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def in_flight() -> float:
        return scraped_sample(metrics_url, "rmserve_requests_in_flight")

    with grpc.insecure_channel(address) as ch, ThreadPoolExecutor(1) as pool:
        stub = pb_grpc.RewardServiceStub(ch)
        expected = stub.Score(REQ, timeout=60).results[0]
        seen, not_serving = watch_health(ch)
        wait_until(lambda: seen, "the health Watch's first status")
        call = pool.submit(stub.Score, REQ, timeout=120)
        wait_until(lambda: in_flight() >= 1, "the call to be in flight")
        proc.send_signal(signal.SIGTERM)

        assert not_serving.wait(60), f"health never turned NOT_SERVING: {seen}"
        assert seen[0] == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(address) as fresh, pytest.raises(grpc.RpcError) as err:
            pb_grpc.RewardServiceStub(fresh).Score(REQ, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        got = call.result(120).results[0]  # the call in flight finished, with its result
        assert got.reward == expected.reward and got.std == expected.std and got.num_tokens == expected.num_tokens
        assert proc.wait(GRACE_S / 2) == 0
