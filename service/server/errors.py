"""Server errors, and the one table that maps every rmserve error to a gRPC status.

The model layer raises plain exceptions (`rmserve.service.engine.errors`), the
preference store its own (`rmserve.service.data.preferences`); the scheduler,
registry, auth and admin raise the ones below. Only this module
turns either kind into a status (`grpc_status`), so every caller sees the same
code for the same problem, whichever service or path raised it.
"""

from __future__ import annotations

import grpc

from rmserve.service.data.preferences import PreferenceConflict, StoreFull, StoreUnavailable
from rmserve.service.engine.errors import (
    EngineOutOfMemory,
    EngineUnavailable,
    EnsembleFormatError,
    InvalidInput,
    RMServeError,
)

__all__ = [
    "DeadlineExceeded",
    "InvalidInput",
    "NonFiniteScore",
    "NotFound",
    "NotReady",
    "PermissionDenied",
    "QueueFull",
    "RMServeError",
    "SampleFailed",
    "Unauthenticated",
    "Unavailable",
    "grpc_status",
]


class QueueFull(RMServeError):
    """The scheduler's queue (or the caller's share of it) is full; retrying after
    `retry_after_s` may succeed. A negative `retry_after_s` says retrying cannot help
    (the request alone is over the limit), so clients do not retry in vain."""

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


class NonFiniteScore(RMServeError):
    """The model's score of a sample is NaN or infinite (even scored alone): an error
    naming the sample, never a NaN reward that would poison a trainer's update."""


class SampleFailed(RMServeError):
    """One sample failed on its own: its batch was split until the failure was isolated,
    and the other samples were answered. Only the request holding it fails, with the
    status of `cause` (INTERNAL for an unexpected exception); `where` names the sample
    (set by the servicer, which knows the request's layout; the scheduler knows `index`)."""

    def __init__(self, cause: BaseException, index: int = 0, where: str | None = None):
        super().__init__(str(cause))
        self.cause = cause
        self.index = index
        self.where = where
        self.__cause__ = cause

    def __str__(self) -> str:
        what = str(self.cause) if isinstance(self.cause, RMServeError) else (
            f"scoring failed on this sample alone ({type(self.cause).__name__}: {self.cause}); "
            "the other samples of its batch were scored without it"
        )
        return f"{self.where or f'sample {self.index}'}: {what}"


_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineOutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
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
    NonFiniteScore: grpc.StatusCode.INTERNAL,
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; unexpected ones are INTERNAL and say so."""
    if isinstance(exc, SampleFailed):  # the cause's code, the message naming the sample
        return grpc_status(exc.cause)[0], str(exc)
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"
