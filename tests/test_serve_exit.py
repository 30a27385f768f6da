"""An idle `rmserve serve` exits as soon as it has stopped, on SIGTERM and on Ctrl-C (SIGINT).

The 3.8 s an idle server used to take to exit were not rmserve's stop (a few ms with nothing
in flight) but Python's interpreter teardown afterwards, freeing the ~2800 modules torch,
transformers and triton import. The CLI now ends the process once the server has stopped and
the exit handlers have run. The tests check that mechanism rather than a wall-clock bound (a
loaded machine must not fail a test): the exit handlers ran (logs flushed, temporary folders
removed) and the interpreter's teardown did not (an object's finalizer that only teardown
would call never ran). The time taken is reported in the assertion messages. The rest of
an idle stop's time was the /metrics server's poll (up to 0.5 s), which stop() no longer waits for.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

# A `rmserve serve` with two probes: an exit handler, and an object in __main__'s globals
# whose __del__ only the interpreter's teardown calls (it writes to fd 2 directly: by then
# sys.stderr may be gone).
PROBE = """
import atexit, os, sys
atexit.register(lambda: print("probe: exit handlers ran", file=sys.stderr, flush=True))
class Probe:
    def __del__(self, write=os.write):  # bound now: teardown clears module globals first
        write(2, b"probe: interpreter teardown ran\\n")
probe = Probe()
from rmserve.service.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_server_exits_without_interpreter_teardown(tiny_ensemble, tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, "serve", "--model", str(tiny_ensemble), "--port", "0",
         "--metrics-port", "-1", "--registry", str(tmp_path / "registry")],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    )
    try:
        log = []
        while line := proc.stderr.readline():
            log.append(line)
            if re.search(r"SERVING .* on 127\.0\.0\.1:\d+", line):
                break
        else:
            pytest.fail("no SERVING line:\n" + "".join(log))
        t0 = time.monotonic()
        proc.send_signal(sig)
        rest = proc.stderr.read()
        rc = proc.wait(60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert rc == 0, rest
    assert "stopping: finishing in-flight requests" in rest, rest  # the log is flushed
    assert "probe: exit handlers ran" in rest, rest
    assert "probe: interpreter teardown ran" not in rest, f"exit took {took:.2f} s through the teardown:\n{rest}"


def test_stop_does_not_wait_for_the_metrics_servers_poll(tiny_ensemble, tmp_path):
    """The /metrics server's `shutdown()` blocks until its loop next polls (every 0.5 s); stop()
    tells it to end and goes on. Here its shutdown blocks until released: stop() must return
    while it still waits (on the old code it hung there and this call timed out)."""
    import threading

    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    s = BackgroundServer(ServerConfig(model=str(tiny_ensemble), port=0, metrics_port=0,
                                      registry=str(tmp_path / "registry"))).start()
    release, waiting = threading.Event(), threading.Event()
    real_shutdown = s.server._metrics_http.shutdown

    def shutdown_after_the_poll():
        waiting.set()
        release.wait(120)
        real_shutdown()

    s.server._metrics_http.shutdown = shutdown_after_the_poll
    try:
        s.call(s.server.stop(0), timeout=60)
        assert waiting.wait(60) and not release.is_set()  # asked to end, and not waited for
    finally:
        release.set()
        s.loop.call_soon_threadsafe(s.loop.stop)
        s._thread.join(30)
