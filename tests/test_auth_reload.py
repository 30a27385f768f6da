"""API keys from a file or an environment variable, reloaded on SIGHUP, compared in
constant time and never logged; and an open server binds loopback only."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import grpc
import pytest

from rmserve.client import RewardClient, RewardServiceError
from rmserve.service.server import auth
from rmserve.service.server.auth import ApiKeys, check_bind_address
from tests.helpers import wait_for_line

SAMPLE = [{"prompt": "hi", "response": "hello"}]
OLD, NEW = "k-old-5ecret-0f1d", "k-new-5ecret-9a7c"


def write_keys(path, keys: dict[str, list[str]]) -> None:
    path.write_text(json.dumps(keys))


# -- the key set ----------------------------------------------------------------------------


def test_reload_swaps_the_keys(tmp_path, caplog):
    f = tmp_path / "keys.json"
    write_keys(f, {OLD: ["score"]})
    keys = ApiKeys.from_sources(path=f)
    assert keys.scopes_of(OLD) == {"score"} and keys.scopes_of(NEW) is None
    write_keys(f, {NEW: ["score", "admin"]})
    with caplog.at_level(logging.INFO, logger="rmserve.auth"):
        assert keys.reload() is True
    assert keys.scopes_of(OLD) is None and keys.scopes_of(NEW) == {"score", "admin"}
    assert str(f) in caplog.text
    assert OLD not in caplog.text and NEW not in caplog.text


@pytest.mark.parametrize("bad", ["{not json", "{}", json.dumps({"k-x": ["root"]}), json.dumps({"": ["score"]}), None])
def test_a_bad_file_on_reload_keeps_the_old_keys(tmp_path, caplog, bad):
    f = tmp_path / "keys.json"
    write_keys(f, {OLD: ["score"]})
    keys = ApiKeys.from_sources(path=f)
    if bad is None:
        f.unlink()
    else:
        f.write_text(bad)
    with caplog.at_level(logging.INFO, logger="rmserve.auth"):
        assert keys.reload() is False
    assert keys.scopes_of(OLD) == {"score"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(f) in errors[0].getMessage() and "keeping the 1 in use" in errors[0].getMessage()
    assert OLD not in caplog.text


def test_keys_from_an_environment_variable(monkeypatch, caplog):
    monkeypatch.setenv("RMSERVE_TEST_KEYS", json.dumps({NEW: ["label"]}))
    keys = ApiKeys.from_sources(env="RMSERVE_TEST_KEYS")
    assert keys.scopes_of(NEW) == {"label"}
    with caplog.at_level(logging.INFO, logger="rmserve.auth"):
        assert keys.reload() is False  # a process's environment does not change: restart to rotate
    assert "restart" in caplog.text and NEW not in caplog.text
    assert keys.scopes_of(NEW) == {"label"}
    monkeypatch.setenv("RMSERVE_TEST_KEYS", "[1, 2]")
    with pytest.raises(ValueError, match=r"\$RMSERVE_TEST_KEYS must be a non-empty JSON object"):
        ApiKeys.from_sources(env="RMSERVE_TEST_KEYS")
    monkeypatch.delenv("RMSERVE_TEST_KEYS")
    with pytest.raises(ValueError, match="RMSERVE_TEST_KEYS is not set"):
        ApiKeys.from_sources(env="RMSERVE_TEST_KEYS")
    with pytest.raises(ValueError, match="not both"):
        ApiKeys.from_sources(path="keys.json", env="RMSERVE_TEST_KEYS")
    assert ApiKeys.from_sources() is None


def test_every_key_is_compared_in_constant_time(monkeypatch):
    """A match on the first key costs what a miss costs: no early exit, no dict lookup,
    and fixed-length digests, so neither a prefix nor a length leaks."""
    keys = ApiKeys({OLD: frozenset({"score"}), NEW: frozenset({"admin"}), "k-3": frozenset({"label"})})
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in (OLD, "k-3", "nope", "x" * 1000):
        calls.clear()
        keys.scopes_of(token)
        assert len(calls) == 3
        assert all(len(a) == len(b) == 32 for a, b in calls)
    assert OLD.encode() not in repr(vars(keys)).encode()  # only digests are kept


def test_install_reload_on_sighup_calls_reload(tmp_path):
    import asyncio

    f = tmp_path / "keys.json"
    write_keys(f, {OLD: ["score"]})
    keys = ApiKeys.from_sources(path=f)
    write_keys(f, {NEW: ["score"]})

    async def go() -> None:
        loop = asyncio.get_running_loop()
        assert auth.install_reload_on_sighup(loop, keys) is True
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if keys.scopes_of(NEW):
                    return
                await asyncio.sleep(0.01)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(go())
    assert keys.scopes_of(NEW) == {"score"} and keys.scopes_of(OLD) is None


def test_a_running_server_takes_reloaded_keys(tiny_ensemble, server_factory, tmp_path, monkeypatch):
    f = tmp_path / "keys.json"
    write_keys(f, {OLD: ["score"]})
    s = server_factory(tiny_ensemble, api_keys=str(f))
    with RewardClient(s.address, timeout=30, api_key=OLD) as c:
        assert len(c.score(SAMPLE)) == 1
    write_keys(f, {NEW: ["score"]})
    assert s.server.api_keys.reload()
    with RewardClient(s.address, timeout=30, api_key=OLD) as c, pytest.raises(RewardServiceError) as err:
        c.score(SAMPLE)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(s.address, timeout=30, api_key=NEW) as c:
        assert len(c.score(SAMPLE)) == 1


def test_a_server_takes_keys_from_the_environment(tiny_ensemble, server_factory, monkeypatch):
    monkeypatch.setenv("RMSERVE_TEST_KEYS", json.dumps({NEW: ["score"]}))
    s = server_factory(tiny_ensemble, api_keys_env="RMSERVE_TEST_KEYS")
    with RewardClient(s.address, timeout=30) as c, pytest.raises(RewardServiceError) as err:
        c.score(SAMPLE)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(s.address, timeout=30, api_key=NEW) as c:
        assert len(c.score(SAMPLE)) == 1


# -- `rmserve serve` and SIGHUP --------------------------------------------------------------

RMSERVE = [sys.executable, "-m", "rmserve.service.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_sighup_reloads_the_key_file_of_rmserve_serve(tiny_ensemble, tmp_path):
    f = tmp_path / "keys.json"
    write_keys(f, {OLD: ["score"]})
    proc = subprocess.Popen([*RMSERVE, "serve", "--model", str(tiny_ensemble), "--port", "0", "--metrics-port", "-1",
                             "--api-keys", str(f), "--registry", str(tmp_path / "registry")],
                            stderr=subprocess.PIPE, text=True, env=_env())
    log: list[str] = []
    try:
        port = wait_for_line(proc, r"SERVING .* on 127\.0\.0\.1:(\d+)", log).group(1)
        address = f"127.0.0.1:{port}"
        with RewardClient(address, timeout=60, api_key=OLD) as c:
            assert len(c.score(SAMPLE)) == 1
        write_keys(f, {NEW: ["score"]})
        proc.send_signal(signal.SIGHUP)
        wait_for_line(proc, r"reloaded 1 API keys from", log)
        with RewardClient(address, timeout=60, api_key=NEW) as c:
            assert len(c.score(SAMPLE)) == 1
        with RewardClient(address, timeout=60, api_key=OLD) as c, pytest.raises(RewardServiceError) as err:
            c.score(SAMPLE)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        f.write_text("{broken")
        proc.send_signal(signal.SIGHUP)
        assert str(f) in wait_for_line(proc, r"ERROR .*API keys not reloaded", log).string
        with RewardClient(address, timeout=60, api_key=NEW) as c:
            assert len(c.score(SAMPLE)) == 1  # still serving, with the keys it had
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.append(proc.stderr.read())
    text = "".join(log)
    assert OLD not in text and NEW not in text  # no key is ever logged


# -- an open server binds loopback only ------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_an_open_server_may_bind_loopback(host):
    check_bind_address(host, authenticated=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.7", "fe80::1", "no-such-host.invalid"])
def test_an_open_server_refuses_other_addresses(host):
    with pytest.raises(ValueError, match="--insecure-open"):
        check_bind_address(host, authenticated=False)
    check_bind_address(host, authenticated=False, insecure_open=True)
    check_bind_address(host, authenticated=True)


def test_the_server_refuses_to_start_open_on_all_interfaces(tiny_ensemble, tmp_path):
    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    with pytest.raises(ValueError, match="--insecure-open"):
        BackgroundServer(ServerConfig(model=str(tiny_ensemble), host="0.0.0.0", port=0, metrics_port=None,
                                      registry=str(tmp_path / "r"))).start()
    ca = tmp_path / "ca.pem"  # client certificates guard gRPC but not the HTTP front door
    ca.write_text("unused: the bind check comes first")
    with pytest.raises(ValueError, match="--insecure-open"):
        BackgroundServer(ServerConfig(model=str(tiny_ensemble), host="0.0.0.0", port=0, metrics_port=None,
                                      tls_cert="c.pem", tls_key="k.pem", tls_client_ca=str(ca), http_port=0,
                                      registry=str(tmp_path / "r"))).start()


def test_rmserve_serve_exits_with_the_flag_named(tiny_ensemble, tmp_path):
    r = subprocess.run([*RMSERVE, "serve", "--model", str(tiny_ensemble), "--host", "0.0.0.0", "--port", "0",
                        "--metrics-port", "-1", "--registry", str(tmp_path / "registry")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert "--insecure-open" in r.stderr and "'0.0.0.0'" in r.stderr and "not a loopback address" in r.stderr
