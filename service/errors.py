"""Server errors, and the one table that maps every rmserve error to a gRPC status.

The model layer raises plain exceptions (`rmserve.service.engine.errors`), the
preference store its own (`rmserve.training.preferences`); the scheduler,
registry, auth and admin raise the ones below. Only this module
turns either kind into a status (`grpc_status`), so every caller sees the same
code for the same problem, whichever service or path raised it.
"""

from __future__ import annotations

import grpc

from rmserve.service.engine.errors import (
    EngineOutOfMemory,
    EnsembleFormatError,
    InvalidInput,
    RMServeError,
)
from rmserve.training.preferences import PreferenceConflict, StoreFull, StoreUnavailable

__all__ = [
    "DeadlineExceeded",
    "InvalidInput",
    "NotFound",
    "NotReady",
    "PermissionDenied",
    "QueueFull",
    "RMServeError",
    "Unauthenticated",
    "Unavailable",
    "grpc_status",
]


class QueueFull(RMServeError):
    """The scheduler's queue is full; retrying after `retry_after_s` may succeed."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RMServeError):
    """The caller's deadline passed before the sample was scored."""


class NotReady(RMServeError):
    """No model is loaded (yet), or the requested operation needs another state."""


class Unavailable(RMServeError):
    """Temporarily unable to serve (model loading, shutting down): retry later."""


class NotFound(RMServeError):
    """A named model version, job or file does not exist."""


class PermissionDenied(RMServeError):
    """The caller's credentials do not carry the scope this method needs."""


class Unauthenticated(RMServeError):
    """No or unknown credentials."""


_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineOutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.FAILED_PRECONDITION,
    EnsembleFormatError: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PreferenceConflict: grpc.StatusCode.ALREADY_EXISTS,
    StoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; unexpected ones are INTERNAL and say so."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"
