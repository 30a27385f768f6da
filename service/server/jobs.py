"""Training jobs: one at a time, in a child process, at low priority.

Why a process: training saturates every core it gets and holds the GIL in
Python-heavy stretches; in a separate process at `nice` 10 with half the cores,
scoring keeps its latency (the engine thread wins the CPU when both want it).
The child is the training package's own entry point (`python -m
rmserve.training.job`, see training/job.py): the server imports nothing of the
trainer. The config goes to its stdin as JSON; it reports `ProgressEvent` dicts
as JSON lines on its stdout; a reader thread in the server fans them out to
whoever is listening (the Train stream), and the job's own history is kept so a
finished job can still be described.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmserve.service.server.errors import InvalidInput, NotReady

log = logging.getLogger("rmserve.jobs")


@dataclass
class TrainingJob:
    version: str
    staging: Path
    final: Path
    activate: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


class JobRunner:
    """Starts training jobs and relays their events onto the event loop."""

    def __init__(self, on_success: Callable[[TrainingJob], Any]):
        self._on_success = on_success  # coroutine function, run on the loop when a job succeeds
        self.current: TrainingJob | None = None
        self._listeners: set[asyncio.Queue] = set()
        self._proc: subprocess.Popen | None = None

    @property
    def busy(self) -> bool:
        return self.current is not None and not self.current.done.is_set()

    def start(self, config: dict[str, Any], *, version: str, staging: Path, final: Path, activate: bool) -> TrainingJob:
        if self.busy:
            raise NotReady(
                f"a training job ({self.current.version}) is already running; one job at a time — wait for it to finish"
            )
        if staging.exists() or final.exists():
            raise InvalidInput(f"model version {version!r} already exists in the registry")
        loop = asyncio.get_running_loop()
        job = TrainingJob(version=version, staging=staging, final=final, activate=activate)
        self.current = job
        threads = max(1, (os.cpu_count() or 2) // 2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rmserve.training.job"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            # PYTHONSAFEPATH: `-m` must not put the working directory on sys.path (a checkout's kernels/
            # folder would shadow the `kernels` package transformers imports)
            env={**os.environ, "RMSERVE_TRAIN_THREADS": str(threads), "PYTHONSAFEPATH": "1"}, text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        proc.stdin.write(json.dumps({**config, "out": str(staging), "version": version}))
        proc.stdin.close()
        log.info("training job %s started (pid %d)", version, proc.pid)

        def relay() -> None:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # not ours: the job writes only events to stdout
                    log.warning("training job %s wrote a non-event line: %r", version, line[:200])
                    continue
                loop.call_soon_threadsafe(self._publish, job, event)
            exitcode = proc.wait()
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._finish(job, exitcode)))

        threading.Thread(target=relay, name=f"rmserve-train-relay-{version}", daemon=True).start()
        return job

    def _publish(self, job: TrainingJob, event: dict[str, Any]) -> None:
        event = {**event, "version": job.version}
        job.history.append(event)
        if event.get("event") == "error":
            job.error = event.get("message", "training failed")
        for q in self._listeners:
            q.put_nowait(event)

    async def _finish(self, job: TrainingJob, exitcode: int | None) -> None:
        if job.error is None and exitcode not in (0, None):
            job.error = f"the training process exited with code {exitcode}"
        if job.error is None:
            try:
                os.replace(job.staging, job.final)  # the version appears complete or not at all
                log.info("training job %s finished: %s", job.version, job.final)
                await self._on_success(job)
            except Exception as e:
                job.error = f"{type(e).__name__}: {e}"
        if job.error is not None:
            log.error("training job %s failed: %s", job.version, job.error)
            shutil.rmtree(job.staging, ignore_errors=True)
            self._publish(job, {"event": "error", "phase": "", "message": job.error})
        job.done.set()
        for q in self._listeners:
            q.put_nowait(None)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends a running job's process (server shutdown): its staging directory is
        removed when the relay sees it exit, so no half-written version remains."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()

    def publish(self, job: TrainingJob, event: dict[str, Any]) -> None:
        """Server-side events (e.g. 'activated') join the job's stream."""
        self._publish(job, event)

    def listen(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._listeners.add(q)
        return q

    def unlisten(self, q: asyncio.Queue) -> None:
        self._listeners.discard(q)
