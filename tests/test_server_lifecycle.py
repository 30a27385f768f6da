"""Health follows the model's load; metrics are scraped over HTTP; the default is explained."""

from __future__ import annotations

import dataclasses
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import rmserve.service.server.state as server_mod
from rmserve.service.engine import backends
from rmserve.service.server.errors import NotReady
from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc

REQ = pb.ScoreRequest(samples=[pb.Sample(text=pb.PromptResponse(prompt="hi", response="hello there"))])


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_health_is_serving_only_after_the_model_is_loaded(tiny_ensemble, server_factory, monkeypatch):
    gate = threading.Event()
    real = backends.BACKENDS["torch"]

    def slow_load(*args, **kwargs):
        gate.wait(30)
        return real.load(*args, **kwargs)

    monkeypatch.setitem(backends.BACKENDS, "torch", dataclasses.replace(real, load=slow_load))
    s = server_factory(tiny_ensemble, wait_ready=False)
    assert health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(s.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RewardServiceStub(ch).Score(REQ, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        gate.set()
        s.call(s.server.wait_ready(), 60)
        assert health(s.address) == health_pb2.HealthCheckResponse.SERVING
        assert len(pb_grpc.RewardServiceStub(ch).Score(REQ, timeout=10).results) == 1


def test_metrics_show_the_request(tiny_server):
    with grpc.insecure_channel(tiny_server.address) as ch:
        pb_grpc.RewardServiceStub(ch).Score(REQ, timeout=10)
    text = urllib.request.urlopen(tiny_server.metrics_url, timeout=10).read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['rmserve_requests_total{code="OK",method="Score"}'] >= 1
    assert samples["rmserve_sequences_scored_total"] >= 1
    assert samples["rmserve_tokens_scored_total"] >= 1
    assert samples["rmserve_ready"] == 1
    assert samples["rmserve_batch_sequences_count"] >= 1
    assert any(k.startswith("rmserve_model_info{") for k in samples)


def test_serving_without_a_model_explains_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(server_mod, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(NotReady, match="rmserve serve --model DIR"):
        server_mod.resolve_model_path(None)
