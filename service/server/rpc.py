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
  of grpc's generic INTERNAL;
- a graceful stop (`drain`): new calls get UNAVAILABLE, the work in flight
  (`Work`) finishes within the grace period, then what is left is cancelled.
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

from rmserve.service.server.errors import InvalidInput, QueueFull, Unavailable, grpc_status
from rmserve.service.server.metrics import Metrics
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


# Status messages travel percent-encoded in the grpc-message trailer, and a client refuses
# trailers over 8 KiB (it reports RESOURCE_EXHAUSTED, not the status): room for the rest.
MAX_STATUS_BYTES = 2048


def _encoded_size(c: str) -> int:
    return 1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode("utf-8", "surrogatepass"))


def bounded(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """`message` cut in the middle to fit `limit` bytes as a grpc-message: an error that
    quotes a huge input (a 100 KB sample id) must still reach the caller as its status."""
    sizes = [_encoded_size(c) for c in message]
    if sum(sizes) <= limit:
        return message
    budget = (limit - 64) // 2
    head = tail = used = 0
    while used + sizes[head] <= budget:
        used += sizes[head]
        head += 1
    used = 0
    while used + sizes[-1 - tail] <= budget:
        used += sizes[-1 - tail]
        tail += 1
    return f"{message[:head]} [... {len(message) - head - tail} characters cut ...] {message[len(message) - tail:]}"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message); an unexpected exception (INTERNAL) is logged with its traceback."""
    code, message = grpc_status(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error", exc_info=exc)
    return code, bounded(message)


class Work:
    """Calls doing work now: what a graceful stop waits for.

    A call counts from its start until gRPC has sent its status (unary calls), a
    ScoreStream chunk until its answer is written. Long-lived streams between
    chunks (a health Watch, an idle ScoreStream) are not work, so they do not
    hold a stop for the whole grace period.
    """

    def __init__(self) -> None:
        self.count = 0
        self.closed = False  # stopping: calls that start now are refused (UNAVAILABLE)
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self.closed = True

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def until_rpc_done(self, context: grpc.aio.ServicerContext) -> None:
        """Counts the call until gRPC has finished it (status sent or call cancelled)."""
        self.begin()
        context.add_done_callback(lambda _: self.end())

    async def idle(self) -> None:
        await self._idle.wait()


async def drain(server: grpc.aio.Server, work: Work, grace: float) -> None:
    """Graceful stop: with `work` closed, new calls get UNAVAILABLE at once (call_with_status);
    the work in flight has `grace` seconds to finish; then gRPC stops, cancelling every call
    still open (UNAVAILABLE to its caller). Returns as soon as no work is left, instead of
    waiting out the grace period for streams that are only open. gRPC's stop is called once:
    two concurrent stops of a grpc.aio server can crash the process."""
    idle = asyncio.ensure_future(work.idle())
    try:
        await asyncio.wait({idle}, timeout=grace)
    finally:
        idle.cancel()
        await server.stop(None)


async def call_with_status(
    metrics: Metrics, method: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[Any]], request=None,
    work: Work | None = None,
):
    """Runs `fn()` for an RPC: counts and times it, and aborts with the mapped status on error.
    With `work`, the call counts as work in flight until gRPC has finished it (see `drain`)."""
    t0 = time.perf_counter()
    code = grpc.StatusCode.OK
    if work is not None:
        work.until_rpc_done(context)
    metrics.in_flight.inc()
    try:
        if isinstance(request, Malformed):
            raise request.reject()
        if work is not None and work.closed:  # gRPC refuses new calls too, but only once its stop has begun
            raise Unavailable("the server is shutting down; retry (another replica, or this one once restarted)")
        return await fn()
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except grpc.aio.AbortError:
        raise
    except Exception as e:
        code, message = status_of(e)
        if isinstance(e, QueueFull):
            # a negative hint (the request alone is over a limit) tells gRPC-style clients not to retry
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(e.retry_after_s * 1000))),))
        await context.abort(code, message)
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(method, code.name).inc()
        if code == grpc.StatusCode.OK:
            metrics.latency.labels(method).observe(time.perf_counter() - t0)


def unary(method: str):
    """Decorator of a servicer's unary method (the servicer has `.state.metrics` and `.state.work`)."""

    def deco(fn: Callable):
        @functools.wraps(fn)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            return await call_with_status(
                self.state.metrics, method, context, lambda: fn(self, request, context), request, self.state.work
            )

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
    if isinstance(exc, QueueFull) and exc.retry_after_s >= 0:  # negative: retrying cannot help, no header
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return HTTP_STATUS.get(code, 500), {"error": {"code": code.name, "message": message}}, headers
