"""A training job as its own process: `python -m rmserve.training.job`.

The server starts training through this entry point (service/server/jobs.py), so it
imports nothing of the trainer. Protocol: the parent writes one JSON object,
the TrainConfig fields, to stdin and closes it; the job writes one JSON object
per line to stdout for every progress event (`ProgressEvent.to_dict()`), and
an `error` event if it fails. Anything else the process prints goes to stderr,
so a library that prints cannot corrupt the event stream.

Exit status: 0 when the ensemble was written, 1 when training failed (the
error event says why), 2 when the config is not valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, TextIO


def _emit(stream: TextIO, event: dict[str, Any]) -> None:
    stream.write(json.dumps(event) + "\n")
    stream.flush()


def main(threads: int | None = None) -> int:
    # Events get the real stdout; fd 1 itself now points at stderr.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with contextlib.suppress(OSError):
        os.nice(10)  # scoring in the parent wins the CPU when both want it
    from rmserve.service.data.train_config import TrainConfig

    try:
        cfg = TrainConfig(**json.loads(sys.stdin.read()))
    except (TypeError, ValueError) as e:
        _emit(events, {"event": "error", "phase": "", "message": f"invalid training config: {e}"})
        return 2
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
    from rmserve.training.trainer import train

    try:
        train(cfg, progress=lambda e: _emit(events, e.to_dict()))
    except Exception as e:  # reported to the server, which reports it to the caller
        _emit(events, {"event": "error", "phase": "", "message": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(int(os.environ["RMSERVE_TRAIN_THREADS"]) if os.environ.get("RMSERVE_TRAIN_THREADS") else None))
