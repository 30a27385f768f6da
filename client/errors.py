"""The client's exception tree: one class per gRPC status a caller may act on.

Every `grpc.RpcError` leaves the SDK through `from_rpc_error`, so callers catch
`RewardServiceError` (or a subclass) and never have to import grpc to tell a
bad request from a busy server; `.code` keeps the original `grpc.StatusCode`.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalServerError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RewardServiceError",
    "UnavailableError",
    "from_rpc_error",
    "from_status",
]


class RewardServiceError(Exception):
    """A call to the reward service failed; `.code` is the gRPC status, `.details` its message."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    code: grpc.StatusCode

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
        attempts: int = 1,
    ):
        code = code or self.default_code
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
        #: How many times the call was sent before giving up (retries included).
        self.attempts = attempts


class InvalidRequestError(RewardServiceError, ValueError):
    """INVALID_ARGUMENT: the request itself is wrong; retrying will not help.

    Raised by the server's refusal and, with the same code, by the SDK's own checks before
    anything is sent (an empty batch, a sample with no messages, empty `token_ids`, a content
    part that is not text, ...). Also a `ValueError`, which those checks raised before this
    class existed, so callers that catch ValueError still do.
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(RewardServiceError):
    """RESOURCE_EXHAUSTED: the server is full or the request exceeds a size cap."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(RewardServiceError):
    """DEADLINE_EXCEEDED: the call's overall timeout passed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(RewardServiceError):
    """UNAVAILABLE: the server cannot be reached or is shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


class AuthenticationError(RewardServiceError):
    """UNAUTHENTICATED: no api key, or one the server does not know."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RewardServiceError):
    """PERMISSION_DENIED: the credentials lack the scope this method needs."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(RewardServiceError):
    """FAILED_PRECONDITION: e.g. no model loaded yet."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class NotFoundError(RewardServiceError):
    """NOT_FOUND: a named model version, job or file does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(RewardServiceError):
    """ALREADY_EXISTS: an id reused with other content (a label is never silently replaced)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class InternalServerError(RewardServiceError):
    """INTERNAL / UNKNOWN: a server bug; the details say what broke."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RewardServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.UNKNOWN: InternalServerError,
}

_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def _metadata_pairs(md: object) -> tuple[tuple[str, str], ...]:
    """Sync grpc gives `_Metadatum` tuples, grpc.aio a `Metadata` object: normalise both."""
    if not md:
        return ()
    return tuple((str(k), v if isinstance(v, str) else repr(v)) for k, v in md)  # type: ignore[attr-defined]


def from_status(
    code: grpc.StatusCode | int,
    details: str,
    *,
    trailing_metadata: tuple[tuple[str, str], ...] = (),
    attempts: int = 1,
) -> RewardServiceError:
    """The typed error for a status; `code` may be the int carried by a stream's ChunkError."""
    if isinstance(code, int):
        code = _CODE_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, RewardServiceError)
    return cls(details, code=code, trailing_metadata=trailing_metadata, attempts=attempts)


def from_rpc_error(e: grpc.RpcError, *, attempts: int = 1) -> RewardServiceError:
    """The one place where a grpc.RpcError (sync or aio) becomes a typed SDK error."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    md = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    return from_status(
        code or grpc.StatusCode.UNKNOWN,
        details,
        trailing_metadata=_metadata_pairs(md),
        attempts=attempts,
    )
