"""A busy port is refused at start-up, naming the address and the flag that set it.

gRPC sets SO_REUSEPORT by default, so a second server on a busy --port used to start and
silently take part of the first one's connections; a busy --metrics-port or --http-port
ended in a bare `[Errno 98] Address already in use`. Here a second `rmserve serve` meets
ports held by a first server and must exit non-zero, at once, without a traceback."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest

from rmserve.service.server.ports import PortUnavailable, listening


def second_serve(model, cwd, *flags: str) -> tuple[int, str]:
    """Run `rmserve serve` on ports held by another server: (exit code, stderr). A server that
    comes up anyway (SERVING) is killed and reported, instead of running until the timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rmserve.service.cli", "serve", "--model", str(model),
         "--registry", str(cwd / "registry"), *flags],
        stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    log = []
    try:
        for line in proc.stderr:
            log.append(line)
            if "SERVING" in line or "listening on" in line:
                pytest.fail("the second server started on a busy port:\n" + "".join(log))
        return proc.wait(60), "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def first(tiny_ensemble):
    import tempfile

    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    config = ServerConfig(model=str(tiny_ensemble), port=0, metrics_port=0, http_port=0,
                          registry=tempfile.mkdtemp(prefix="rmserve-registry-"))
    s = BackgroundServer(config).start(wait_ready=False)
    yield s.server
    s.stop()


@pytest.mark.parametrize(("flag", "held"), [("--port", "port"), ("--metrics-port", "metrics_port"),
                                            ("--http-port", "http_port")])
def test_a_busy_port_is_refused_naming_the_port_and_its_flag(first, tiny_ensemble, tmp_path, flag, held):
    port = getattr(first, held)
    flags = {"--port": "0", "--metrics-port": "-1", flag: str(port)}
    rc, err = second_serve(tiny_ensemble, tmp_path, *[x for kv in flags.items() for x in kv])
    assert rc != 0, err
    assert f"cannot listen on 127.0.0.1:{port} ({flag}): port {port} is already in use" in err, err
    assert "Traceback" not in err, err


def test_listening_names_the_address_flag_and_reason_of_a_bind_failure():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # gRPC's bind failure is a RuntimeError without the errno: the reason is found by probing
        with pytest.raises(PortUnavailable) as ei, listening("127.0.0.1", port, "--port"):
            raise RuntimeError(f"Failed to bind to address 127.0.0.1:{port}")
        assert ei.value.errno == errno.EADDRINUSE and ei.value.flag == "--port"
        assert str(ei.value).startswith(f"cannot listen on 127.0.0.1:{port} (--port): port {port} is already in use")
        with pytest.raises(PortUnavailable, match=r"\(--metrics-port\).*or -1 to turn it off"), \
                listening("127.0.0.1", port, "--metrics-port"):
            socket.create_server(("127.0.0.1", port))
    with pytest.raises(ValueError, match="not a port error"), listening("127.0.0.1", 1, "--port"):
        raise ValueError("not a port error")  # anything but a bind failure passes through
