"""Run a RewardServer on a background thread with its own event loop.

For notebooks, benchmarks and tests that want a real server in-process while
the calling thread stays synchronous.
"""

from __future__ import annotations

import asyncio
import threading

from rmserve.service.server.app import RewardServer
from rmserve.service.server.config import ServerConfig


class BackgroundServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.server = RewardServer(config)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rmserve-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True, timeout: float = 600) -> BackgroundServer:
        self._thread.start()
        self._started.wait(timeout)
        if self._error is not None:
            raise self._error
        if wait_ready:
            self.call(self.server.wait_ready(), timeout)
        return self

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 0) -> None:
        if self._error is None and self._thread.is_alive():
            self.call(self.server.stop(grace), 60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
