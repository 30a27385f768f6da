"""Progress events: one structure for the CLI bar, the JSON log and the Train RPC stream."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("rmserve.training")


class TrainingStopped(Exception):
    """`should_stop()` returned True; a checkpoint was written and `resume=True` continues."""


@dataclass
class ProgressEvent:
    """What a training job reports.

    event: start | phase | step | epoch | checkpoint | stopped | error | done.
    phase: data | features | train | finalize | eval.
    step/total count optimizer steps over all members in `train`, sequences in
    `features`. loss and accuracy average the steps since the previous event
    (accuracy: ensemble-mean reward, strict >). eta_s is for the current phase.
    `report` is set on `done` (the training report dict).
    """

    event: str
    phase: str
    step: int = 0
    total: int = 0
    member: int | None = None
    epoch: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    lr: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""
    report: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


ProgressCallback = Callable[[ProgressEvent], None]


class Reporter:
    """Stamps elapsed time, appends each event as a JSON line, logs it and calls the callback."""

    def __init__(self, callback: ProgressCallback | None, log_path: Path | None):
        self.callback = callback
        self.log_path = log_path
        self.t0 = time.monotonic()
        self.current_phase = "data"

    def emit(self, event: ProgressEvent) -> None:
        self.current_phase = event.phase
        event.elapsed_s = round(time.monotonic() - self.t0, 3)
        d = event.to_dict()
        if self.log_path is not None and event.event != "done":  # the report has its own file
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps({"time": time.time(), **d}) + "\n")
        d.pop("report", None)
        log.info(json.dumps(d))
        if self.callback is not None:
            self.callback(event)

    def phase(self, phase: str, message: str) -> None:
        self.emit(ProgressEvent("phase", phase, message=message))

    @contextmanager
    def reporting_errors(self) -> Iterator[None]:
        """An exception inside (other than TrainingStopped) also goes out as an `error` event."""
        try:
            yield
        except TrainingStopped:
            raise
        except Exception as e:
            self.emit(ProgressEvent("error", self.current_phase, message=f"{type(e).__name__}: {e}"))
            raise
