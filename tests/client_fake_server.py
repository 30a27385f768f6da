"""A fake in-process RewardService for the client SDK tests (not collected: no test_ prefix).

It scores deterministically from the text (reward = len(response) / 10, three
heads at reward - 0.5, reward, reward + 0.5), records every call, and can be
told to fail the next calls of a method with a status and a pushback hint, to
hold its calls until released, to make its first n calls wait for each other,
or to cap the request size, so retries, deadlines and chunking can be tested
without a model, and without timing anything: the order of events is forced by
gates, never by sleeping. It runs a real grpc.aio server (with the standard
health service) on 127.0.0.1, port 0, in a thread with its own event loop, so
both the sync and the async client can talk to it.

Test modules import it as `tests.client_fake_server`, as they import tests/helpers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc

HEAD_OFFSETS = (-0.5, 0.0, 0.5)
DEFAULT_LAMBDA = 0.5
# A held or gathered call stops waiting after this long: a hang guard for a broken client
# (the test then fails on what it checks), never reached when the client does its job.
GATE_SAFETY_S = 60.0


def text_of(sample: pb.Sample) -> tuple[str, str]:
    """(prompt, response) of a sample as the fake sees it."""
    kind = sample.WhichOneof("input")
    if kind == "text":
        return sample.text.prompt, sample.text.response
    if kind == "conversation":
        msgs = sample.conversation.messages
        return " ".join(m.content for m in msgs[:-1]), msgs[-1].content
    return "", " ".join(str(i) for i in sample.tokens.ids)


def expected(prompt: str, response: str, lam: float = DEFAULT_LAMBDA) -> dict[str, Any]:
    """What the fake returns, for the tests to compare against."""
    r = len(response) / 10
    members = [r + d for d in HEAD_OFFSETS]
    var = sum((m - r) ** 2 for m in members) / len(members)
    return dict(
        reward=r,
        std=math.sqrt(var),
        min=min(members),
        conservative=r - lam * var,
        members=members,
        epistemic=float(len(prompt)) if "?" in prompt else None,
        # OOD statistics with the epistemic ones ("?" prompts); flagged past 4 characters
        ood_score=len(response) / 4 if "?" in prompt else None,
        ood=len(response) > 4 if "?" in prompt else None,
        num_tokens=len(prompt.split()) + len(response.split()),
        truncated="TRUNC" in prompt,
    )


def result(prompt: str, response: str, options: pb.ScoreOptions, sid: str = "") -> pb.ScoreResult:
    lam = options.uncertainty_penalty if options.HasField("uncertainty_penalty") else DEFAULT_LAMBDA
    e = expected(prompt, response, lam)
    out = pb.ScoreResult(
        id=sid,
        reward=e["reward"],
        std=e["std"],
        min=e["min"],
        conservative=e["conservative"],
        num_tokens=e["num_tokens"],
        truncated=e["truncated"],
    )
    if e["epistemic"] is not None:
        out.epistemic = e["epistemic"]
    if e["ood_score"] is not None:
        out.ood_score, out.ood = e["ood_score"], e["ood"]
    if options.return_members:
        out.members.extend(e["members"])
    return out


class Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, pushback_ms: int | None = None):
        super().__init__(message)
        self.code, self.message, self.pushback_ms = code, message, pushback_ms


@dataclass
class Call:
    method: str
    request: Any
    metadata: dict[str, str]


@dataclass
class Gather:
    """The first `n` calls of a method wait until all `n` have arrived (so they are in flight together)."""

    n: int
    arrived: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakeState:
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    holds: dict[str, asyncio.Event] = field(default_factory=dict)  # method -> set when released
    gathers: dict[str, Gather] = field(default_factory=dict)
    max_samples: int = 1000
    in_flight: int = 0
    max_in_flight: int = 0


class FakeRewardService(pb_grpc.RewardServiceServicer):
    def __init__(self, state: FakeState):
        self.s = state

    async def _enter(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.s.calls.append(Call(method, request, {k: v for k, v in context.invocation_metadata()}))
        if self.s.failures[method]:
            code, pushback_ms = self.s.failures[method].popleft()
            if pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(pushback_ms)),))
            await context.abort(code, f"injected {code.name}")
        hold = self.s.holds.get(method)
        if hold is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hold.wait(), GATE_SAFETY_S)
        gather = self.s.gathers.get(method)
        if gather is not None and gather.arrived < gather.n:
            gather.arrived += 1
            if gather.arrived == gather.n:
                gather.all_in.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gather.all_in.wait(), GATE_SAFETY_S)

    async def _unary(self, method: str, request: Any, context: grpc.aio.ServicerContext, fn: Any) -> Any:
        self.s.in_flight += 1
        self.s.max_in_flight = max(self.s.max_in_flight, self.s.in_flight)
        try:
            await self._enter(method, request, context)
            return fn(request)
        except Reject as r:
            if r.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(r.pushback_ms)),))
            await context.abort(r.code, r.message)
        finally:
            self.s.in_flight -= 1

    def _check_samples(self, samples: Any, n: int) -> None:
        if n == 0:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "empty batch")
        if n > self.s.max_samples:
            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{n} > {self.s.max_samples} samples", -1)
        for s in samples:
            if s.WhichOneof("input") == "conversation":
                for m in s.conversation.messages:
                    if m.role not in ("system", "user", "assistant", "tool"):
                        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {m.role!r}")

    def _score(self, req: pb.ScoreRequest) -> pb.ScoreResponse:
        self._check_samples(req.samples, len(req.samples))
        return pb.ScoreResponse(
            results=[result(*text_of(s), req.options, s.id) for s in req.samples], model_version="fake-v1"
        )

    def _groups(self, req: pb.ScoreGroupsRequest) -> pb.ScoreGroupsResponse:
        self._check_samples([], sum(len(g.completions) for g in req.groups))
        out = pb.ScoreGroupsResponse(model_version="fake-v1")
        for g in req.groups:
            if g.WhichOneof("prompt") == "prompt_text":
                prompt = g.prompt_text
            else:
                prompt = " ".join(m.content for m in g.prompt_messages.messages)
            out.groups.add(id=g.id, results=[result(prompt, c, req.options) for c in g.completions])
        return out

    def _compare(self, req: pb.CompareRequest) -> pb.CompareResponse:
        if req.WhichOneof("prompt") == "prompt_text":
            prompt = req.prompt_text
        else:
            prompt = " ".join(m.content for m in req.prompt_messages.messages)
        opts = pb.ScoreOptions(return_members=True)
        a, b = result(prompt, req.response_a, opts), result(prompt, req.response_b, opts)
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        return pb.CompareResponse(
            prob=sig(a.reward - b.reward),
            member_probs=[sig(x - y) for x, y in zip(a.members, b.members, strict=True)],
            a=a,
            b=b,
            model_version="fake-v1",
        )

    async def Score(self, request, context):
        return await self._unary("Score", request, context, self._score)

    async def ScoreGroups(self, request, context):
        return await self._unary("ScoreGroups", request, context, self._groups)

    async def Compare(self, request, context):
        return await self._unary("Compare", request, context, self._compare)

    async def GetModelInfo(self, request, context):
        info = pb.ModelInfo(
            name="fake", version="fake-v1", kind="heads", num_members=1, num_heads=3, backbone="none",
            max_tokens=128, dtype="float32", default_uncertainty_penalty=DEFAULT_LAMBDA, has_epistemic=True,
            max_samples_per_request=self.s.max_samples,
            normalization=pb.Normalization(shift=[0.0, 0.5, 1.0], scale=[1.0, 2.0, 3.0]),
        )
        return await self._unary("GetModelInfo", request, context, lambda _: info)

    async def ScoreStream(self, request_iterator, context):
        await self._enter("ScoreStream", None, context)
        async for req in request_iterator:
            self.s.calls.append(Call("ScoreStream.chunk", req, {}))
            if any(s.id == "bad" for s in req.samples):
                yield pb.ScoreStreamResponse(
                    error=pb.ChunkError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad chunk")
                )
                continue
            yield pb.ScoreStreamResponse(
                results=[result(*text_of(s), req.options, s.id) for s in req.samples], model_version="fake-v1"
            )


class FakeServer:
    """Start with `FakeServer().start()`; `.address`, `.state`, `.fail(...)`, `.hold(...)`, `.gather(...)`,
    `.set_serving(...)`, `.stop()`."""

    def __init__(self, port: int = 0, tls: tuple[bytes, bytes] | None = None) -> None:
        """`tls`: (private key PEM, certificate chain PEM) to serve TLS instead of plaintext."""
        self.state = FakeState()
        self.tls = tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = port

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_RewardServiceServicer_to_server(FakeRewardService(self.state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.tls is None:
            self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        else:
            creds = grpc.ssl_server_credentials([self.tls])
            self.port = self.server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> FakeServer:
        self._thread.start()
        self._run(self._start())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fail(self, method: str, *failures: tuple[grpc.StatusCode, int | None]) -> None:
        """The next len(failures) calls of `method` fail with (code, pushback_ms or None)."""
        self.state.failures[method].extend(failures)

    def hold(self, method: str) -> None:
        """Calls of `method` wait (after being recorded) until `release(method)` or `reset()`."""
        self._run(self._set_hold(method))

    async def _set_hold(self, method: str) -> None:
        self.state.holds[method] = asyncio.Event()

    def release(self, method: str) -> None:
        """Let the held calls of `method`, and all later ones, through."""
        self._run(self._release(method))

    async def _release(self, method: str) -> None:
        hold = self.state.holds.pop(method, None)
        if hold is not None:
            hold.set()

    def gather(self, method: str, n: int) -> None:
        """The next `n` calls of `method` wait for each other: none is answered before all `n` are in flight."""
        self._run(self._set_gather(method, n))

    async def _set_gather(self, method: str, n: int) -> None:
        self.state.gathers[method] = Gather(n)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._run(self.health.set("", status))

    def calls(self, method: str) -> list[Call]:
        return [c for c in self.state.calls if c.method == method]

    def reset(self) -> None:
        self._run(self._reset())

    async def _reset(self) -> None:
        s = self.state
        s.calls.clear()
        s.failures.clear()
        for hold in s.holds.values():  # a call left held by the last test goes through now
            hold.set()
        s.holds.clear()
        for gather in s.gathers.values():
            gather.all_in.set()
        s.gathers.clear()
        s.max_samples = 1000
        s.max_in_flight = 0

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
