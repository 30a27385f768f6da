"""Listening ports: a port that cannot be had is refused at start-up, naming the port and its flag.

The server listens on up to three ports (gRPC `--port`, Prometheus `--metrics-port`, HTTP
`--http-port`). A bind failure surfaces differently from each library (gRPC: a RuntimeError
without the errno; aiohttp and http.server: `[Errno 98] Address already in use` without the
address), so the operator could not tell which flag to change. `listening` wraps one bind and
turns its failure into `PortUnavailable`, an OSError that says which address, which flag, and
why (found by binding a plain socket to the same address: the bind failure's own errno is not
always there). The gRPC server must also not share its port: gRPC sets SO_REUSEPORT by default,
so a second server on a busy port would start and take part of the first one's connections;
config.py's `grpc_options` turns that off, and the second server's bind fails here instead.

`stop_listening` ends the /metrics server (a socketserver) without waiting for it: its
`shutdown()` blocks until `serve_forever` next wakes, up to its 0.5 s poll interval, which
was most of what a graceful stop of an idle server still took.
"""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PortUnavailable", "listening", "port_unavailable", "stop_listening"]


class PortUnavailable(OSError):
    """A listening port the server cannot have; the message names the address and the flag."""

    def __init__(self, host: str, port: int, flag: str, reason: str, code: int | None = None):
        super().__init__(f"cannot listen on {host}:{port} ({flag}): {reason}")
        self.errno = code
        self.host, self.port, self.flag = host, port, flag


def _bind_errno(host: str, port: int) -> int | None:
    """The errno of binding a plain TCP socket to host:port now (None: it binds).

    SO_REUSEADDR as every server sets it, so a connection in TIME_WAIT does not count as busy:
    on Linux only a socket listening on the address makes the bind fail with EADDRINUSE."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            return e.errno
    return None


def port_unavailable(host: str, port: int, flag: str, error: BaseException) -> PortUnavailable:
    """The error to raise for a failed bind of host:port (given by `flag`), with the reason."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) and port:
        code = _bind_errno(host, port) or code
    off = " or -1 to turn it off" if flag == "--metrics-port" else ""
    if code == errno.EADDRINUSE:
        reason = (f"port {port} is already in use (another process listens there: a second rmserve?); "
                  f"stop it, or choose another {flag} (0 picks a free port{off})")
    elif code == errno.EADDRNOTAVAIL:
        reason = f"{host} is not an address of this machine (--host / --metrics-host)"
    elif code == errno.EACCES:
        reason = f"permission denied (ports below 1024 need privileges); choose another {flag}"
    else:
        reason = str(error)
    return PortUnavailable(host, port, flag, reason, code)


@contextmanager
def listening(host: str, port: int, flag: str) -> Iterator[None]:
    """Wrap the one call that binds host:port: its failure leaves as `PortUnavailable`.

    RuntimeError is gRPC's bind failure ("Failed to bind to address ..."); keep the block to
    that one call, so that no other RuntimeError is mistaken for it."""
    try:
        yield
    except PortUnavailable:
        raise
    except (OSError, RuntimeError) as e:
        raise port_unavailable(host, port, flag, e) from e


def stop_listening(server: socketserver.BaseServer) -> None:
    """Tell a socketserver's `serve_forever` loop to end, without waiting for it to notice.

    `shutdown()` waits for the loop's next wake-up (http.server polls every 0.5 s); it runs on a
    daemon thread instead, so a stopping server does not wait out a poll timer: the loop ends by
    itself within the poll interval, or with the process."""
    threading.Thread(target=server.shutdown, name="rmserve-metrics-stop", daemon=True).start()
