"""Everything the sync and async clients share, free of I/O.

Request building, validation, chunking, response parsing and the retry policy
live here once; `sync.py` and `async_client.py` only move bytes (blocking or
awaiting) and sleep. That keeps the two clients in lockstep: a fix here fixes
both, and tests of one exercise the logic of the other.

Every check of a call's input raises `InvalidRequestError` (INVALID_ARGUMENT, the
server's code for the same mistakes; also a ValueError), before anything is sent.
A client built with an unusable address or TLS material raises a plain ValueError:
that is configuration, not a request.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import random
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from rmserve.client.errors import (
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    RewardServiceError,
    _metadata_pairs,
    from_rpc_error,
    from_status,
)
from rmserve.client.types import CompareResult, ModelInfo, ScoreResult, ScoreResults
from rmserve.v1 import reward_pb2 as pb

# A sample as callers write it: {"messages": [...]}, {"prompt", "response"} or {"token_ids"},
# each with an optional "id".
Sample = Mapping[str, Any]
Message = Mapping[str, Any]
# A prompt for compare()/score_groups(): plain text or chat messages.
Prompt = str | Sequence[Message]

DEFAULT_MAX_RETRIES = 4
DEFAULT_INITIAL_BACKOFF = 0.25
DEFAULT_MAX_BACKOFF = 8.0
DEFAULT_MAX_SAMPLES_PER_REQUEST = 256
DEFAULT_MAX_CONCURRENT_REQUESTS = 4
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_HEALTH_TIMEOUT = 10.0
DEFAULT_STREAM_CHUNK_SIZE = 64
KEEPALIVE_TIME_MS = 60_000     # >= the server's MIN_CLIENT_PING_INTERVAL_MS (service/server/config.py)
KEEPALIVE_TIMEOUT_MS = 20_000

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
PUSHBACK_KEY = "grpc-retry-pushback-ms"
# health(): these mean "not serving (yet)", not "the caller did something wrong".
NOT_HEALTHY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}
)

_SAMPLE_SHAPES = "{'messages': [...]}, {'prompt': ..., 'response': str} or {'token_ids': [...]}"


# ---------------------------------------------------------------------------
# Options: configured once on the client, overridden per call by copy.


@dataclass(frozen=True)
class ClientOptions:
    """Timeouts, retries and chunking in one place; frozen so a per-call override is a copy."""

    timeout: float | None = None
    """Overall deadline of one SDK call in seconds (all chunks and retries); None: no deadline."""
    max_retries: int = DEFAULT_MAX_RETRIES
    """Retries after the first attempt, on UNAVAILABLE and RESOURCE_EXHAUSTED only.

    The defaults (4 retries from 0.25 s, doubling) ride out a few seconds of
    server restart or a full queue, which should not end a long training run.
    """
    max_samples_per_request: int = DEFAULT_MAX_SAMPLES_PER_REQUEST
    """Larger inputs are split into requests of at most this many samples (completions for groups)."""
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    """Chunks of one call in flight at once, so the server can batch them together."""
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    metadata: tuple[tuple[str, str], ...] = ()
    """Sent with every call (the api key travels here as `authorization`)."""

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise InvalidRequestError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")
        if self.max_retries < 0:
            raise InvalidRequestError(f"max_retries must be >= 0, got {self.max_retries!r}")
        if self.max_samples_per_request < 1:
            raise InvalidRequestError(f"max_samples_per_request must be >= 1, got {self.max_samples_per_request!r}")
        if self.max_concurrent_requests < 1:
            raise InvalidRequestError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests!r}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise InvalidRequestError("need 0 <= initial_backoff <= max_backoff")

    def override(self, **changes: Any) -> ClientOptions:
        """A copy with the changes that are not None; `self` is untouched."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


def auth_metadata(
    api_key: str | None, metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None
) -> tuple[tuple[str, str], ...]:
    """Call metadata: the caller's pairs plus `authorization: Bearer <api_key>`."""
    pairs = list(metadata.items() if isinstance(metadata, Mapping) else (metadata or ()))
    if api_key:
        pairs = [(k, v) for k, v in pairs if k.lower() != "authorization"]
        pairs.append(("authorization", f"Bearer {api_key}"))
    return tuple((str(k).lower(), str(v)) for k, v in pairs)


def channel_target(address: str | Sequence[str]) -> str:
    """The gRPC target for one address ("HOST:PORT", or a gRPC URI such as "dns:///rm.svc:50051",
    which resolves to every replica) or several replicas (["h1:50051", "h2:50051"]).

    Several addresses become one `ipv4:`/`ipv6:` target, resolved once here (gRPC's own list
    schemes take IP literals only); calls are spread over them by the round_robin policy
    (build_channel_args), and a call that fails with UNAVAILABLE on a replica that went away
    is retried (RetryState) on another.
    """
    if isinstance(address, str):
        if not address:
            raise ValueError("address must be 'HOST:PORT', a gRPC target URI, or a list of 'HOST:PORT'")
        return address
    addresses = list(address)
    if not addresses or not all(isinstance(a, str) and a for a in addresses):
        raise ValueError(f"addresses must be a non-empty list of 'HOST:PORT' strings, got {address!r}")
    if len(addresses) == 1:
        return addresses[0]
    v4, v6 = [], []
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"each address must be 'HOST:PORT', got {a!r}")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve {a!r}: {e}") from None
        family, *_, sockaddr = infos[0]
        (v6 if family == socket.AF_INET6 else v4).append(
            f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}")
    if v4 and v6:
        raise ValueError("mix of IPv4 and IPv6 addresses: gRPC balances over one family per target")
    return ("ipv6:" + ",".join(v6)) if v6 else ("ipv4:" + ",".join(v4))


def is_balanced(target: str) -> bool:
    """Several replicas (a list of addresses) or a DNS name that may resolve to several."""
    return target.startswith(("ipv4:", "ipv6:", "dns:"))


def build_channel_args(
    max_message_bytes: int, extra: Mapping[str, Any] | Iterable[tuple[str, Any]] | None
) -> list[tuple[str, Any]]:
    """gRPC channel arguments.

    gRPC's own retries are switched off: the SDK retries in `RetryState`, and two
    layers of retries would multiply. Reconnect backoff is capped at 2 s (gRPC's
    default grows to 120 s): while a channel waits to reconnect, every call fails
    at once with UNAVAILABLE, so a long reconnect backoff would burn all of the
    SDK's retries without a single new connection attempt. Keepalive pings every
    KEEPALIVE_TIME_MS, with or without calls open: a trainer's channel idle between
    steps stays connected (NAT and load-balancer entries on the way stay alive) and a
    dead server is noticed within 80 s rather than at the next call's deadline. rmserve
    permits pings every 30 s (service/server/config.py MIN_CLIENT_PING_INTERVAL_MS), so they
    never draw a too_many_pings GOAWAY.
    """
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.enable_retries": 0,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 2_000,
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
    opts.update(dict(extra.items() if isinstance(extra, Mapping) else (extra or ())))
    return list(opts.items())


# PEM material for TLS: the bytes themselves, PEM text, or the path of a PEM file.
Pem = bytes | str | os.PathLike


def read_pem(value: Pem | None, what: str) -> bytes | None:
    """Certificates and keys as bytes, so callers may pass what they have at hand (a path from config)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {value}: {e}") from e


def channel_credentials(
    tls: bool | None,
    root_certificates: Pem | None,
    private_key: Pem | None,
    certificate_chain: Pem | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (or implied by certificates); None means plaintext.

    `private_key` + `certificate_chain` are the client's own certificate, for a server
    that requires one (mutual TLS, `rmserve serve --tls-client-ca`)."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs both certificate_chain= and its private_key=")
    if tls is None:
        tls = any(x is not None for x in (root_certificates, private_key, certificate_chain))
    if not tls:
        if private_key is not None:
            raise ValueError("a client certificate needs TLS: tls=False contradicts certificate_chain=/private_key=")
        return None
    return grpc.ssl_channel_credentials(
        read_pem(root_certificates, "root_certificates"),
        read_pem(private_key, "private_key"),
        read_pem(certificate_chain, "certificate_chain"),
    )


# ---------------------------------------------------------------------------
# Deadlines and retries (sans I/O: the clients do the sleeping).


class Deadline:
    """One overall deadline per SDK call, shared by its chunks and their retries."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else self._end - time.monotonic()

    def attempt_timeout(self) -> float | None:
        """The gRPC timeout for the next attempt; raises when the deadline has already passed."""
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceededError(f"the call's {self.timeout:g}s deadline passed")
        return left


def pushback_seconds(e: grpc.RpcError) -> float | None:
    """The server's `grpc-retry-pushback-ms` hint: seconds, -1.0 for "do not retry", None if absent."""
    md = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in _metadata_pairs(md):
        if key == PUSHBACK_KEY:
            try:
                ms = int(value)
            except ValueError:
                return -1.0  # gRPC's retry design: a malformed hint means "do not retry"
            return -1.0 if ms < 0 else ms / 1000.0
    return None


class RetryState:
    """Decides, per failed attempt, how long to wait before the next one, or raises.

    Exponential backoff with jitter on UNAVAILABLE and RESOURCE_EXHAUSTED; a
    pushback hint from the server replaces the computed delay (negative: give
    up). A retry that could not start before the call's deadline is not made:
    the last real error is raised instead of sleeping into a DEADLINE_EXCEEDED.
    """

    def __init__(self, options: ClientOptions, deadline: Deadline, rng: random.Random | None = None):
        self.options = options
        self.deadline = deadline
        self.attempts = 0
        self._rng = rng or random

    def attempt_timeout(self) -> float | None:
        self.attempts += 1
        try:
            return self.deadline.attempt_timeout()
        except RewardServiceError as err:
            err.attempts = self.attempts - 1
            raise

    def backoff(self, e: grpc.RpcError) -> float:
        """Seconds to sleep before retrying after `e`; raises the typed error when not retrying."""
        code = e.code() if hasattr(e, "code") else None
        if code not in RETRYABLE_CODES or self.attempts > self.options.max_retries:
            raise from_rpc_error(e, attempts=self.attempts) from None
        delay = pushback_seconds(e)
        if delay is None:
            base = min(self.options.max_backoff, self.options.initial_backoff * 2 ** (self.attempts - 1))
            delay = base * (0.5 + 0.5 * self._rng.random())  # "equal jitter": spread, never ~0
        if delay < 0:
            raise from_rpc_error(e, attempts=self.attempts) from None
        left = self.deadline.remaining()
        if left is not None and delay >= left:
            raise from_rpc_error(e, attempts=self.attempts) from None
        return delay


# ---------------------------------------------------------------------------
# Requests.


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}: expected a str, got {type(value).__name__}")
    return value


def message_text(content: Any, where: str) -> str:
    """A message's content as the text the model scores, with one meaning on every client path
    (the SDK, the TRL and verl adapters) and the server's HTTP door: a str as it is; OpenAI-style
    parts (`[{"type": "text", "text": ...}, ...]`) with their text joined by ""; None (an
    assistant turn that only calls tools) as "". Any other part type (image_url, input_audio,
    ...) is refused, naming the part: the model reads text only, and dropping the part would
    score another conversation than the one the caller sent."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise InvalidRequestError(
            f"{where}: expected a str or a list of {{'type': 'text', 'text': str}} parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text":
            raise InvalidRequestError(
                f"{where}, part {k}: a part of type {kind!r} cannot be scored; only 'text' parts can"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}, part {k}: a 'text' part needs 'text': str")
        texts.append(part["text"])
    return "".join(texts)


def build_messages(messages: Any, where: str) -> pb.Conversation:
    """A Conversation from [{"role", "content"}, ...]; extra keys (tool_calls, ...) are ignored.
    Content is a str or text parts (`message_text`)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError(f"{where}: expected a non-empty list of {{'role', 'content'}} dicts")
    conv = pb.Conversation()
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidRequestError(f"{where}, message {j}: expected a dict with 'role' and 'content'")
        conv.messages.add(
            role=_text(m["role"], f"{where}, message {j} role"),
            content=message_text(m["content"], f"{where}, message {j} content"),
        )
    return conv


def build_sample(sample: Any, index: int) -> pb.Sample:
    """Validate one caller sample and turn it into a proto, naming the sample in every error."""
    where = f"sample {index}"
    if not isinstance(sample, Mapping):
        raise InvalidRequestError(f"{where}: expected a dict, one of {_SAMPLE_SHAPES}; got {type(sample).__name__}")
    keys = set(sample) - {"id"}
    out = pb.Sample()
    if "id" in sample and sample["id"] is not None:
        if not isinstance(sample["id"], (str, int)) or isinstance(sample["id"], bool):
            raise InvalidRequestError(f"{where}: 'id' must be a str or int, got {type(sample['id']).__name__}")
        out.id = str(sample["id"])
    if keys == {"messages"}:
        out.conversation.CopyFrom(build_messages(sample["messages"], where))
    elif keys == {"prompt", "response"}:
        prompt, response = sample["prompt"], _text(sample["response"], f"{where} 'response'")
        if isinstance(prompt, str):
            out.text.prompt, out.text.response = prompt, response
        else:  # chat prompt + text response: the response is the assistant's turn
            conv = build_messages(prompt, f"{where} 'prompt'")
            conv.messages.add(role="assistant", content=response)
            out.conversation.CopyFrom(conv)
    elif keys == {"token_ids"}:
        ids = sample["token_ids"]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise InvalidRequestError(f"{where}: 'token_ids' must be a list of ints")
        try:
            out.tokens.ids.extend(operator.index(t) for t in ids)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"{where}: 'token_ids' must be a list of int32 ints ({e})") from None
        if not out.tokens.ids:
            raise InvalidRequestError(f"{where}: 'token_ids' is empty")
    else:
        raise InvalidRequestError(
            f"{where}: expected one of {_SAMPLE_SHAPES} (plus an optional 'id'); got keys {sorted(sample)}"
        )
    return out


def build_options(
    uncertainty_penalty: float | None,
    return_members: bool,
    run_id: str | None,
    step: int | None,
) -> pb.ScoreOptions:
    opts = pb.ScoreOptions(run_id=run_id or "", return_members=bool(return_members))
    if step is not None:
        opts.step = operator.index(step)
    if uncertainty_penalty is not None:
        if not math.isfinite(uncertainty_penalty):
            raise InvalidRequestError(f"uncertainty_penalty must be finite, got {uncertainty_penalty!r}")
        opts.uncertainty_penalty = float(uncertainty_penalty)
    return opts


def set_prompt(msg: pb.Group | pb.CompareRequest, prompt: Prompt, where: str) -> None:
    if isinstance(prompt, str):
        msg.prompt_text = prompt
    else:
        msg.prompt_messages.CopyFrom(build_messages(prompt, f"{where} prompt"))


def check_sizes(requests: Sequence[Any], max_bytes: int) -> None:
    """Refuse up front a request the channel would refuse to send.

    gRPC reports an oversized message as RESOURCE_EXHAUSTED, which the retry
    policy would retry to no avail; this says what to change instead.
    """
    for i, req in enumerate(requests):
        size = req.ByteSize()
        if size > max_bytes:
            raise InvalidRequestError(
                f"request chunk {i} is {size} bytes, over the {max_bytes}-byte message limit: "
                "lower max_samples_per_request or raise max_message_bytes (the server must accept it too)"
            )


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class ScorePlan:
    """The Score requests for one `score()` call and how to put their answers back together."""

    requests: list[pb.ScoreRequest]
    sizes: list[int]
    return_members: bool

    @classmethod
    def build(
        cls,
        samples: Iterable[Sample],
        options: pb.ScoreOptions,
        max_per_request: int,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> ScorePlan:
        if isinstance(samples, Mapping):
            raise InvalidRequestError("score() takes a list of samples; wrap a single sample in a list")
        protos = [build_sample(s, i) for i, s in enumerate(samples)]
        if not protos:
            raise InvalidRequestError("score() needs at least one sample")
        reqs = [
            pb.ScoreRequest(samples=protos[r.start : r.stop], options=options)
            for r in _chunks(len(protos), max_per_request)
        ]
        check_sizes(reqs, max_bytes)
        return cls(reqs, [len(r.samples) for r in reqs], options.return_members)

    def parse(self, responses: Sequence[pb.ScoreResponse]) -> ScoreResults:
        out: list[ScoreResult] = []
        for i, (resp, n) in enumerate(zip(responses, self.sizes, strict=True)):
            _check_count(len(resp.results), n, f"Score chunk {i}")
            out.extend(parse_result(r, self.return_members, resp.model_version) for r in resp.results)
        return ScoreResults(out, model_version=responses[-1].model_version if responses else "")


@dataclass
class GroupsPlan:
    """ScoreGroups requests for many (prompt, completions) groups, capped in completions per request.

    A group larger than the cap is split into pieces with the same prompt (the
    prompt is then encoded once per piece, not once per completion); pieces are
    packed greedily into requests and concatenated back per original group.
    """

    requests: list[pb.ScoreGroupsRequest]
    owners: list[list[tuple[int, int]]]  # per request, per group piece: (original group, completions)
    num_groups: int
    return_members: bool

    @classmethod
    def build(
        cls,
        groups: Iterable[tuple[Prompt, Sequence[str]]],
        options: pb.ScoreOptions,
        max_per_request: int,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> GroupsPlan:
        pieces: list[tuple[int, pb.Group]] = []
        num_groups = 0
        for g, item in enumerate(groups):
            num_groups += 1
            try:
                prompt, completions = item
            except (TypeError, ValueError):
                raise InvalidRequestError(f"group {g}: expected a (prompt, completions) pair") from None
            if isinstance(completions, str) or not isinstance(completions, Sequence) or not completions:
                raise InvalidRequestError(f"group {g}: completions must be a non-empty list of str")
            texts = [_text(c, f"group {g}, completion {j}") for j, c in enumerate(completions)]
            template = pb.Group(id=str(g))
            set_prompt(template, prompt, f"group {g}")
            for r in _chunks(len(texts), max_per_request):
                piece = pb.Group()
                piece.CopyFrom(template)
                piece.completions.extend(texts[r.start : r.stop])
                pieces.append((g, piece))
        if not pieces:
            raise InvalidRequestError("score_groups() needs at least one group")
        requests: list[pb.ScoreGroupsRequest] = []
        owners: list[list[tuple[int, int]]] = []
        load = max_per_request  # forces a new request for the first piece
        for g, piece in pieces:
            n = len(piece.completions)
            if load + n > max_per_request:
                requests.append(pb.ScoreGroupsRequest(options=options))
                owners.append([])
                load = 0
            requests[-1].groups.append(piece)
            owners[-1].append((g, n))
            load += n
        check_sizes(requests, max_bytes)
        return cls(requests, owners, num_groups, options.return_members)

    def parse(self, responses: Sequence[pb.ScoreGroupsResponse]) -> list[ScoreResults]:
        version = responses[-1].model_version if responses else ""
        out = [ScoreResults(model_version=version) for _ in range(self.num_groups)]
        for i, (resp, owners) in enumerate(zip(responses, self.owners, strict=True)):
            _check_count(len(resp.groups), len(owners), f"ScoreGroups chunk {i} (groups)")
            for gres, (g, n) in zip(resp.groups, owners, strict=True):
                _check_count(len(gres.results), n, f"ScoreGroups chunk {i}, group {g}")
                out[g].extend(parse_result(r, self.return_members, resp.model_version) for r in gres.results)
        return out


def build_compare(prompt: Prompt, response_a: str, response_b: str) -> pb.CompareRequest:
    req = pb.CompareRequest(
        response_a=_text(response_a, "response_a"), response_b=_text(response_b, "response_b")
    )
    set_prompt(req, prompt, "compare")
    return req


class StreamFeeder:
    """Turns the caller's sample iterable into ScoreStream request chunks.

    gRPC pulls requests on its own thread (sync) or task (aio) and would hide an
    exception raised there behind a bare CANCELLED; so a bad sample, or an error
    in the caller's iterator, is kept here, ends the request stream, and is
    re-raised to the caller by `check()`. Samples without an id get their
    position in the stream as id, so every result can be matched.
    """

    def __init__(self, options: pb.ScoreOptions, chunk_size: int):
        if chunk_size < 1:
            raise InvalidRequestError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.options = options
        self.chunk_size = chunk_size
        self.sizes: deque[int] = deque()
        self.error: BaseException | None = None
        self._next_index = 0
        self._batch: list[pb.Sample] = []

    def _add(self, sample: Any) -> pb.ScoreStreamRequest | None:
        proto = build_sample(sample, self._next_index)
        if not proto.id:
            proto.id = str(self._next_index)
        self._next_index += 1
        self._batch.append(proto)
        return self._flush() if len(self._batch) >= self.chunk_size else None

    def _flush(self) -> pb.ScoreStreamRequest:
        req = pb.ScoreStreamRequest(samples=self._batch, options=self.options)
        self.sizes.append(len(self._batch))
        self._batch = []
        return req

    def requests(self, samples: Iterable[Sample]) -> Iterator[pb.ScoreStreamRequest]:
        try:
            for s in samples:
                req = self._add(s)
                if req is not None:
                    yield req
            if self._batch:
                yield self._flush()
        except Exception as e:  # re-raised to the caller by check()
            self.error = e

    async def arequests(self, samples: Any) -> Any:
        """The same as `requests`, for a sync or async iterable of samples."""
        try:
            if hasattr(samples, "__aiter__"):
                async for s in samples:
                    req = self._add(s)
                    if req is not None:
                        yield req
            else:
                for s in samples:
                    req = self._add(s)
                    if req is not None:
                        yield req
            if self._batch:
                yield self._flush()
        except Exception as e:
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def parse(self, resp: pb.ScoreStreamResponse) -> list[ScoreResult]:
        """Results of one response chunk; a rejected chunk raises its typed error."""
        expected = self.sizes.popleft() if self.sizes else None
        if resp.HasField("error"):
            raise from_status(resp.error.code, resp.error.message)
        if expected is None:
            raise InternalServerError("ScoreStream: a response arrived for no request chunk")
        _check_count(len(resp.results), expected, "ScoreStream chunk")
        return [parse_result(r, self.options.return_members, resp.model_version) for r in resp.results]


# ---------------------------------------------------------------------------
# Responses.


def _check_count(got: int, expected: int, what: str) -> None:
    if got != expected:
        raise InternalServerError(f"{what}: server returned {got} results for {expected} inputs")


def parse_result(r: pb.ScoreResult, with_members: bool, model_version: str = "") -> ScoreResult:
    return ScoreResult(
        reward=float(r.reward),
        std=float(r.std),
        min=float(r.min),
        conservative=float(r.conservative),
        epistemic=float(r.epistemic) if r.HasField("epistemic") else None,
        members=tuple(float(x) for x in r.members) if with_members else None,
        num_tokens=int(r.num_tokens),
        truncated=bool(r.truncated),
        id=r.id,
        ood_score=float(r.ood_score) if r.HasField("ood_score") else None,
        ood=bool(r.ood) if r.HasField("ood") else None,
        model_version=model_version,
    )


def parse_compare(resp: pb.CompareResponse) -> CompareResult:
    return CompareResult(
        prob=float(resp.prob),
        member_probs=tuple(float(p) for p in resp.member_probs),
        a=parse_result(resp.a, bool(resp.a.members), resp.model_version),
        b=parse_result(resp.b, bool(resp.b.members), resp.model_version),
        model_version=resp.model_version,
    )


def parse_model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        version=m.version,
        kind=m.kind,
        num_members=int(m.num_members),
        num_heads=int(m.num_heads),
        backbone=m.backbone,
        max_tokens=int(m.max_tokens),
        dtype=m.dtype,
        shift=tuple(float(x) for x in m.normalization.shift),
        scale=tuple(float(x) for x in m.normalization.scale),
        default_uncertainty_penalty=float(m.default_uncertainty_penalty),
        has_epistemic=bool(m.has_epistemic),
        max_samples_per_request=int(m.max_samples_per_request),
        backbone_layers=int(m.backbone_layers),
        ood_threshold=float(m.ood_threshold) if m.HasField("ood_threshold") else None,
        ood_quantile=float(m.ood_quantile) if m.HasField("ood_threshold") else None,
        ood_calibrated_on=m.ood_calibrated_on,
    )


# ---------------------------------------------------------------------------
# The shared half of both clients.

_Client = TypeVar("_Client", bound="BaseClient")


class BaseClient:
    """Configuration shared by `RewardClient` and `AsyncRewardClient`.

    `with_options()` returns a shallow copy that shares the channel and has its
    own frozen `ClientOptions`; per-call keyword overrides work the same way,
    so neither ever changes the client they were made from.

    TLS: `root_certificates=` (the CA that signed the server's certificate) and, for a
    server that requires client certificates (mutual TLS), `certificate_chain=` with its
    `private_key=`; each is PEM bytes, PEM text or the path of a PEM file.
    """

    _owns_channel: bool

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        timeout: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_samples_per_request: int = DEFAULT_MAX_SAMPLES_PER_REQUEST,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        initial_backoff: float = DEFAULT_INITIAL_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        api_key: str | None = None,
        metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        private_key: Pem | None = None,
        certificate_chain: Pem | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
    ):
        self.target = channel_target(address)
        self.address = address if isinstance(address, str) else ",".join(address)
        self._options = ClientOptions(
            timeout=timeout,
            max_retries=max_retries,
            max_samples_per_request=max_samples_per_request,
            max_concurrent_requests=max_concurrent_requests,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            metadata=auth_metadata(api_key, metadata),
        )
        self._credentials = channel_credentials(tls, root_certificates, private_key, certificate_chain)
        self._channel_args = build_channel_args(max_message_bytes, channel_options)
        if is_balanced(self.target) and not any(k == "grpc.lb_policy_name" for k, _ in self._channel_args):
            # spread calls over every replica the target names or resolves to
            self._channel_args.append(("grpc.lb_policy_name", "round_robin"))
        self._max_message_bytes = max_message_bytes
        self._owns_channel = True
        self._open()

    def _open(self) -> None:
        """Make the channel (or get ready to): the one transport-specific step of construction."""
        raise NotImplementedError

    @property
    def options(self) -> ClientOptions:
        """This client's defaults (read-only; use `with_options` for a variant)."""
        return self._options

    @property
    def timeout(self) -> float | None:
        return self._options.timeout

    @property
    def max_retries(self) -> int:
        return self._options.max_retries

    def with_options(
        self: _Client,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        max_samples_per_request: int | None = None,
        max_concurrent_requests: int | None = None,
        initial_backoff: float | None = None,
        max_backoff: float | None = None,
        metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> _Client:
        """A client sharing this one's channel with some options changed; this one is unchanged.

        The copy does not own the channel: closing it is a no-op, close the original.
        """
        new = self._options.override(
            timeout=timeout,
            max_retries=max_retries,
            max_samples_per_request=max_samples_per_request,
            max_concurrent_requests=max_concurrent_requests,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            metadata=None if metadata is None else _keep_auth(auth_metadata(None, metadata), self._options.metadata),
        )
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone._options = new
        clone._owns_channel = False
        return clone

    def _call_options(self, timeout: float | None) -> ClientOptions:
        return self._options.override(timeout=timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r}, timeout={self.timeout}, max_retries={self.max_retries})"


def _keep_auth(new: tuple[tuple[str, str], ...], old: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Replacing the metadata keeps the api key unless the new metadata brings its own."""
    if any(k == "authorization" for k, _ in new):
        return new
    return new + tuple((k, v) for k, v in old if k == "authorization")


__all__ = [
    "BaseClient",
    "ClientOptions",
    "Deadline",
    "GroupsPlan",
    "RetryState",
    "ScorePlan",
    "StreamFeeder",
    "build_compare",
    "build_options",
    "build_sample",
    "message_text",
    "parse_compare",
    "parse_model_info",
    "parse_result",
]
