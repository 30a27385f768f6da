"""API-key scopes: UNAUTHENTICATED without a known key, PERMISSION_DENIED without the scope."""

from __future__ import annotations

import json

import grpc
import pytest

from rmserve.client import RewardClient, RewardServiceError
from tests.helpers import self_signed_cert


@pytest.fixture
def keyed_server(tiny_ensemble, server_factory, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-score": ["score"], "k-admin": ["score", "admin"]}))
    return server_factory(tiny_ensemble, api_keys=str(keys))


SAMPLE = [{"prompt": "hi", "response": "hello"}]


def test_scoring_needs_a_key_with_the_score_scope(keyed_server):
    with RewardClient(keyed_server.address, timeout=30) as c:
        assert c.health() is True  # probes need no key
        with pytest.raises(RewardServiceError) as err:
            c.score(SAMPLE)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "api_key" in str(err.value)
    with RewardClient(keyed_server.address, timeout=30, api_key="wrong") as c, pytest.raises(RewardServiceError) as err:
        c.score(SAMPLE)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(keyed_server.address, timeout=30, api_key="k-score") as c:
        assert len(c.score(SAMPLE)) == 1


def test_admin_needs_the_admin_scope(keyed_server):
    with RewardClient(keyed_server.address, timeout=30, api_key="k-score") as c:
        with pytest.raises(RewardServiceError) as err:
            c.list_models()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'admin' scope" in str(err.value)
        with pytest.raises(RewardServiceError) as err:
            list(c.train("/data/x.jsonl"))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    with RewardClient(keyed_server.address, timeout=30, api_key="k-admin") as c:
        assert c.list_models() == []
        assert len(c.score(SAMPLE)) == 1


def test_bad_key_files_are_rejected(tmp_path):
    from rmserve.service.server.auth import load_api_keys

    bad = tmp_path / "k.json"
    bad.write_text(json.dumps({"k": ["root"]}))
    with pytest.raises(ValueError, match="scopes of a key"):
        load_api_keys(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="non-empty"):
        load_api_keys(bad)


def test_tls_when_certificates_are_given(tiny_ensemble, server_factory, tmp_path):
    cert, key = self_signed_cert(tmp_path, "/CN=127.0.0.1", "IP:127.0.0.1")
    s = server_factory(tiny_ensemble, tls_cert=str(cert), tls_key=str(key))
    with RewardClient(s.address, timeout=30, root_certificates=cert.read_bytes()) as c:
        assert len(c.score(SAMPLE)) == 1
    with RewardClient(s.address, timeout=60, max_retries=0) as c, pytest.raises(RewardServiceError) as err:
        c.score(SAMPLE)  # plaintext to a TLS port fails
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
