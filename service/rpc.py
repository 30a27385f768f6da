"""Where exceptions become gRPC statuses: the one place, for every service.

`errors.grpc_status` is the table (exception class -> code); this module applies
it on each path a status can leave the server by:

- a unary or unary-stream call (`call_with_status`, the `unary` decorator):
  counted and timed in the metrics, then aborted with the code;
- one chunk of a ScoreStream (`chunk_error`): the chunk's response carries the
  error and the stream goes on;
- a call refused before its handler runs (`refusing_handler`: auth);
- request bytes that do not parse (`lenient`, used by `add_service` for every
  method of every service): INVALID_ARGUMENT naming the message type, instead
  of grpc's generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from rmserve.service.errors import InvalidInput, QueueFull, grpc_status
from rmserve.service.metrics import Metrics
from rmserve.v1 import reward_pb2 as pb

log = logging.getLogger("rmserve.rpc")


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""

    message_type: str
    error: str

    def reject(self) -> InvalidInput:
        return InvalidInput(f"malformed {self.message_type}: the request bytes do not parse ({self.error})")


def lenient(cls) -> Callable[[bytes], Any]:
    """Deserializer that turns a parse failure into a `Malformed` value."""

    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(cls.DESCRIPTOR.name, str(e))

    return parse


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the `time.monotonic` clock (the scheduler's), or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message); an unexpected exception (INTERNAL) is logged with its traceback."""
    code, message = grpc_status(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error", exc_info=exc)
    return code, message


async def call_with_status(
    metrics: Metrics, method: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[Any]], request=None
):
    """Runs `fn()` for an RPC: counts and times it, and aborts with the mapped status on error."""
    t0 = time.perf_counter()
    code = grpc.StatusCode.OK
    metrics.in_flight.inc()
    try:
        if isinstance(request, Malformed):
            raise request.reject()
        return await fn()
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except grpc.aio.AbortError:
        raise
    except Exception as e:
        code, message = status_of(e)
        if isinstance(e, QueueFull):
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(e.retry_after_s * 1000))),))
        await context.abort(code, message)
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(method, code.name).inc()
        if code == grpc.StatusCode.OK:
            metrics.latency.labels(method).observe(time.perf_counter() - t0)


def unary(method: str):
    """Decorator of a servicer's unary method (the servicer has `.state.metrics`)."""

    def deco(fn: Callable):
        @functools.wraps(fn)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            return await call_with_status(self.state.metrics, method, context, lambda: fn(self, request, context), request)

        return wrapper

    return deco


def chunk_error(exc: BaseException) -> tuple[grpc.StatusCode, pb.ChunkError]:
    """The error a ScoreStream chunk answers with (the stream itself goes on)."""
    code, message = status_of(exc)
    return code, pb.ChunkError(code=code.value[0], message=message)


def refusing_handler(exc: BaseException, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `exc`'s status."""
    code, message = status_of(exc)

    async def abort(request, context):
        await context.abort(code, message)

    async def abort_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """Like a generated `add_XServicer_to_server`, with lenient parsing on every method.

    Every method of the service must be implemented by the servicer: a missing
    one is a programming error caught at startup, not an UNIMPLEMENTED at run time.
    """
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for name, m in service.methods_by_name.items():
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[name] = make(getattr(servicer, name), lenient(request_cls), response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


# HTTP status for each gRPC code (the HTTP front door answers with the same errors):
# the mapping of google.rpc.Code to HTTP, with 499 for a caller that went away.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_error(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, JSON body, headers) for an exception: the gRPC code, its name and the
    message in the body; RESOURCE_EXHAUSTED from a full queue carries Retry-After."""
    code, message = status_of(exc)
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return HTTP_STATUS.get(code, 500), {"error": {"code": code.name, "message": message}}, headers
