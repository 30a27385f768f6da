"""Keepalive: the SDK pings only as often as the server permits, so a trainer's channel
that sits idle between steps stays connected instead of being cut off with too_many_pings."""

from __future__ import annotations

import time

import pytest

from rmserve.client import RewardClient, RewardServiceError
from rmserve.client._core import build_channel_args
from rmserve.service.server.background import BackgroundServer
from rmserve.service.server.config import ServerConfig

SAMPLE = {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."}
# Short values so that a few seconds idle span several pings of both sides. gRPC clients send
# at most one ping a second whatever their keepalive time, so the server's floor is above that.
SERVER_PING_MS, MIN_CLIENT_PING_MS = 200, 1500
IDLE_S = 5.0


def test_sdk_keepalive_is_permitted_by_the_server_defaults():
    server = dict(ServerConfig().grpc_options())
    client = dict(build_channel_args(1 << 20, None))
    # pings on idle channels are sent by the client and accepted by the server
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    # never more often than the server permits: otherwise GOAWAY too_many_pings
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    # both sides find a half-open connection: their pings are not capped between data frames
    assert client["grpc.http2.max_pings_without_data"] == 0 and server["grpc.http2.max_pings_without_data"] == 0
    assert server["grpc.keepalive_time_ms"] > 0 and server["grpc.keepalive_timeout_ms"] > 0


@pytest.fixture(scope="module")
def pinging_server(tiny_ensemble, tmp_path_factory):
    config = ServerConfig(model=str(tiny_ensemble), port=0, metrics_port=None,
                          registry=str(tmp_path_factory.mktemp("registry")), keepalive_time_ms=SERVER_PING_MS,
                          keepalive_timeout_ms=10_000, min_client_ping_interval_ms=MIN_CLIENT_PING_MS)
    s = BackgroundServer(config).start()
    yield s
    s.stop()


def idle_then_score(address: str, client_ping_ms: int) -> tuple[list[str], RewardServiceError | None]:
    """Score, sit idle for several keepalive periods, score again: the channel's states, and
    the error if a call failed."""
    options = {"grpc.keepalive_time_ms": client_ping_ms}
    states: list[str] = []
    with RewardClient(address, channel_options=options, max_retries=0, timeout=30) as client:
        client._channel.subscribe(lambda s: states.append(s.name), try_to_connect=True)
        try:
            client.score([SAMPLE])
            time.sleep(IDLE_S)
            client.score([SAMPLE])
        except RewardServiceError as e:
            return states, e
    return states, None


def dropped(states: list[str]) -> bool:
    """Whether the connection left READY after it was first established (GOAWAY, reconnect)."""
    return "READY" in states and states[states.index("READY"):] != ["READY"] * len(states[states.index("READY"):])


def test_an_idle_channel_survives_keepalive_pings(pinging_server):
    states, error = idle_then_score(pinging_server.address, client_ping_ms=MIN_CLIENT_PING_MS + 100)
    assert error is None
    # connected once and never dropped: no GOAWAY, no reconnect
    assert "READY" in states and not dropped(states), states


def test_a_client_pinging_more_often_than_permitted_is_cut_off(pinging_server):
    """The control: what the test above would catch (GOAWAY too_many_pings, the connection dropped)."""
    states, error = idle_then_score(pinging_server.address, client_ping_ms=100)
    assert dropped(states) or (error is not None and "ping" in str(error).lower()), (states, error)
