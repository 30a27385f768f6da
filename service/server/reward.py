"""RewardService: the gRPC scoring door, a thin converter over the scoring core.

Each RPC converts its request to the core's plain forms (wire.py), calls the
core (core.py), and converts the plain results back; counting, timing and the
error mapping are rpc.py's (`unary`, `chunk_error`). The run monitor's reads
(GetRunStatus, ListRuns) and the model info come from the same state.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from rmserve.service.server import auth
from rmserve.service.server.core import Scored, ScoringCore
from rmserve.service.server.errors import InvalidInput, NotFound
from rmserve.service.server.rpc import Malformed, chunk_error, deadline_of, unary
from rmserve.service.server.state import ServingState
from rmserve.service.server.wire import (
    compare_prompt,
    comparison_pb,
    groups_of,
    model_info_pb,
    options_of,
    result_pb,
    run_pb,
    samples_of,
)
from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc

# ScoreStream chunks read and not yet answered, per stream: a client that stops reading its
# answers holds at most this many chunks' results, and the stream reads no more of its requests
# (HTTP/2 flow control then stops the client's sends) until it reads again.
STREAM_WINDOW = 4


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who a call counts against for --max-queue-per-client: its API key, else its connection
    (peer address and port: one SDK client, one channel)."""
    header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
    return auth.caller_id(header, context.peer())


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, state: ServingState, core: ScoringCore):
        self.state = state  # rpc.unary reads its metrics and work
        self.core = core

    async def _score(self, samples, options: pb.ScoreOptions, context) -> Scored:
        return await self.core.score(samples_of(samples), options_of(options), deadline=deadline_of(context),
                                     caller=caller_of(context))

    @unary("Score")
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        scored = await self._score(request.samples, request.options, context)
        return pb.ScoreResponse(results=[result_pb(r) for r in scored.results], model_version=scored.model_version)

    async def ScoreStream(self, request_iterator, context):
        """One response chunk per request chunk, in order; up to STREAM_WINDOW chunks in flight.
        A chunk is work in flight (`state.work`) from its read until its answer is written,
        so a graceful stop finishes it; an open stream between chunks holds no stop."""
        metrics = self.state.metrics
        work = self.state.work
        pending: asyncio.Queue = asyncio.Queue()  # bounded by `window`
        window = asyncio.Semaphore(STREAM_WINDOW)  # a slot per chunk read, freed once its answer is written
        read = answered = 0

        async def one(req: pb.ScoreStreamRequest) -> pb.ScoreStreamResponse:
            t0 = time.perf_counter()
            code = grpc.StatusCode.CANCELLED  # unless it finishes: the call ended and cancelled it
            try:
                scored = await self._score(req.samples, req.options, context)
                code = grpc.StatusCode.OK
                return pb.ScoreStreamResponse(results=[result_pb(r) for r in scored.results],
                                              model_version=scored.model_version)
            except Exception as e:
                code, error = chunk_error(e)
                return pb.ScoreStreamResponse(error=error)
            finally:
                metrics.requests.labels("ScoreStream.chunk", code.name).inc()
                if code == grpc.StatusCode.OK:
                    metrics.latency.labels("ScoreStream.chunk").observe(time.perf_counter() - t0)

        async def reader():
            nonlocal read
            await window.acquire()  # a slot for the first chunk, before reading it
            async for req in request_iterator:
                read += 1
                work.begin()
                metrics.stream_chunks.inc()
                if isinstance(req, Malformed):
                    code, error = chunk_error(req.reject())
                    metrics.requests.labels("ScoreStream.chunk", code.name).inc()
                    done = asyncio.get_running_loop().create_future()
                    done.set_result(pb.ScoreStreamResponse(error=error))
                    await pending.put(done)
                else:
                    await pending.put(asyncio.ensure_future(one(req)))
                await window.acquire()  # a slot for the next chunk, before reading it
            await pending.put(None)

        read_task = asyncio.ensure_future(reader())
        try:
            while (task := await pending.get()) is not None:
                try:
                    yield await task
                finally:
                    answered += 1
                    work.end()
                    metrics.stream_chunks.dec()
                    window.release()
            await read_task
        finally:
            read_task.cancel()
            while not pending.empty():  # the call ended: its chunks not yet scored free their queue slots
                if (left := pending.get_nowait()) is not None:
                    left.cancel()
            metrics.stream_chunks.dec(read - answered)
            for _ in range(read - answered):  # chunks read but never answered (the call ended)
                work.end()

    @unary("ScoreGroups")
    async def ScoreGroups(self, request: pb.ScoreGroupsRequest, context) -> pb.ScoreGroupsResponse:
        scored = await self.core.score_groups(groups_of(request.groups), options_of(request.options),
                                              deadline=deadline_of(context), caller=caller_of(context))
        return pb.ScoreGroupsResponse(
            groups=[pb.GroupResult(id=g.id, results=[result_pb(r) for r in g.results]) for g in scored.groups],
            model_version=scored.model_version,
        )

    @unary("Compare")
    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        return comparison_pb(await self.core.compare(compare_prompt(request), request.response_a, request.response_b,
                                                     deadline=deadline_of(context), caller=caller_of(context)))

    @unary("GetRunStatus")
    async def GetRunStatus(self, request: pb.GetRunStatusRequest, context) -> pb.RunStatus:
        if not request.run_id:
            raise InvalidInput("run_id is empty: name the run (the run_id your trainer tags its Score calls with)")
        found = self.state.monitor.status(request.run_id)
        if found is None:
            raise NotFound(
                f"no run {request.run_id!r}: the monitor has seen no Score call tagged with it "
                f"(or it was evicted: the monitor keeps the {self.state.monitor.config.max_runs} most recent runs)"
            )
        run, series = found
        return run_pb(run, series)

    @unary("ListRuns")
    async def ListRuns(self, request: pb.ListRunsRequest, context) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[run_pb(run, [], steps=n) for run, n in self.state.monitor.runs()])

    @unary("GetModelInfo")
    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return model_info_pb(self.core.model_info())
