"""rmserve.client against a fake in-process server: results, chunking, retries, deadlines, errors.

The real server is tested end to end elsewhere; here the server is a fake
whose answers are a known function of the input (tests/client_fake_server.py),
so every assertion checks real values, and failures can be injected on demand.

Nothing here measures wall-clock time: a loaded machine must not fail a test.
Retry timing is checked on the sleeps the client asks for (its `time` swapped
for a `FakeTime` whose clock only moves when the client sleeps), deadlines on
calls the fake server holds until the client gives up, and concurrency on
calls the fake server makes wait for each other.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import socket
import subprocess
import sys
import time
import types

import grpc
import numpy as np
import pytest

from rmserve.client import (
    AsyncRewardClient,
    DeadlineExceededError,
    InvalidRequestError,
    ResourceExhaustedError,
    RewardClient,
    RewardServiceError,
    UnavailableError,
    _core,
    as_arrays,
)
from rmserve.client import errors as E
from rmserve.client import sync as sync_client
from rmserve.client._core import ClientOptions, Deadline, RetryState
from tests import client_fake_server as fake
from tests.helpers import self_signed_cert

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def client(fs):
    with RewardClient(fs.address, timeout=10, initial_backoff=0.01, max_backoff=0.05) as c:
        yield c


class FakeTime:
    """Stands in for the `time` module of the sync client and of `_core` (its deadlines).

    `sleep` records the delay asked for and moves the fake clock by it, at once;
    `monotonic` reads the fake clock, which moves only then, so how long the
    RPCs themselves take (a loaded machine) never counts against a deadline.
    """

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch):
    ft = FakeTime()
    monkeypatch.setattr(sync_client, "time", ft)  # the client's backoff sleeps
    monkeypatch.setattr(_core, "time", ft)  # the call's deadline
    return ft


def assert_matches(result, prompt, response, *, lam=fake.DEFAULT_LAMBDA, members=False):
    e = fake.expected(prompt, response, lam)
    for k in ("reward", "std", "min", "conservative"):
        assert getattr(result, k) == pytest.approx(e[k], rel=1e-5, abs=1e-6), k
    assert result.num_tokens == e["num_tokens"]
    assert result.truncated is e["truncated"]
    if e["epistemic"] is None:
        assert result.epistemic is None
    else:
        assert result.epistemic == pytest.approx(e["epistemic"])
    if members:
        assert result.members == pytest.approx(e["members"])
    else:
        assert result.members is None


SAMPLES = [
    {"prompt": "Why is the sky blue?", "response": "Rayleigh scattering.", "id": "a"},
    {"messages": [{"role": "user", "content": "hi TRUNC"}, {"role": "assistant", "content": "hello there"}]},
    {"token_ids": [1, 2, 3]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "response": "4"},
]
EXPECT = [
    ("Why is the sky blue?", "Rayleigh scattering."),
    ("hi TRUNC", "hello there"),
    ("", "1 2 3"),
    ("2+2?", "4"),
]


# -- packaging ----------------------------------------------------------------


def test_client_import_does_not_pull_torch():
    code = (
        "import sys, rmserve.client, rmserve.client.trl\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- scoring --------------------------------------------------------------------


def test_score_all_sample_shapes(client, fs):
    results = client.score(SAMPLES)
    assert len(results) == 4
    for r, (p, c) in zip(results, EXPECT, strict=True):
        assert_matches(r, p, c)
    assert results[0].id == "a" and results[1].id == ""
    assert results[0].epistemic is not None and results[1].epistemic is None
    assert results.model_version == "fake-v1" and results.model_versions == ("fake-v1",)
    assert {r.model_version for r in results} == {"fake-v1"}
    # What went over the wire: the chat prompt + text response became a conversation.
    (call,) = fs.calls("Score")
    kinds = [s.WhichOneof("input") for s in call.request.samples]
    assert kinds == ["text", "conversation", "tokens", "conversation"]
    assert call.request.samples[3].conversation.messages[-1].role == "assistant"


def test_score_options_reach_server_and_members(client, fs):
    results = client.score(SAMPLES[:2], uncertainty_penalty=2.0, return_members=True, run_id="run-1", step=7)
    for r, (p, c) in zip(results, EXPECT[:2], strict=True):
        assert_matches(r, p, c, lam=2.0, members=True)
    opts = fs.calls("Score")[0].request.options
    assert (opts.run_id, opts.step, opts.uncertainty_penalty, opts.return_members) == ("run-1", 7, 2.0, True)
    # Defaults: step and lambda unset (proto `optional`), so the server uses its own.
    client.score(SAMPLES[:1])
    opts = fs.calls("Score")[1].request.options
    assert not opts.HasField("step") and not opts.HasField("uncertainty_penalty")


def test_numpy_arrays(client):
    results = client.score(SAMPLES, return_members=True)
    arr = results.arrays()
    assert arr.reward.dtype == np.float32 and arr.reward.shape == (4,)
    np.testing.assert_allclose(arr.reward, [len(c) / 10 for _, c in EXPECT], rtol=1e-5)
    np.testing.assert_allclose(results.rewards, arr.reward)
    assert arr.members.shape == (4, 3)
    assert arr.truncated.tolist() == [False, True, False, False]
    assert np.isnan(arr.epistemic[1]) and arr.epistemic[0] == pytest.approx(len(EXPECT[0][0]))
    no_members = as_arrays(client.score(SAMPLES[1:3]))
    assert no_members.members is None and no_members.epistemic is None


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([{"prompt": "p"}], r"sample 0: expected one of"),
        ([SAMPLES[0], {"messages": []}], r"sample 1: expected a non-empty list"),
        ([SAMPLES[0], SAMPLES[1], {"messages": [{"role": "user"}]}], r"sample 2, message 0"),
        ([{"prompt": "p", "response": 3}], r"sample 0 'response': expected a str"),
        ([{"token_ids": [1, "x"]}], r"sample 0: 'token_ids' must be a list of int32"),
        ([{"token_ids": [2**40]}], r"sample 0: 'token_ids' must be a list of int32"),
        (["just text"], r"sample 0: expected a dict"),
        ([{"prompt": "p", "response": "r", "extra": 1}], r"got keys \['extra', 'prompt', 'response'\]"),
        ([], r"at least one sample"),
        ({"prompt": "p", "response": "r"}, r"list of samples"),
    ],
)
def test_client_side_validation(client, fs, samples, match):
    with pytest.raises(ValueError, match=match):
        client.score(samples)
    assert fs.calls("Score") == []  # nothing was sent


def test_oversized_request_is_refused_before_sending(fs):
    with RewardClient(fs.address, max_message_bytes=1000) as c:
        with pytest.raises(ValueError, match=r"request chunk 0 is \d+ bytes, over the 1000-byte"):
            c.score([{"prompt": "p", "response": "x" * 2000}])
        with pytest.raises(ValueError, match="over the 1000-byte"):
            c.score_groups("p", ["y" * 2000])
        assert c.score([{"prompt": "p", "response": "x" * 20}])[0].reward == pytest.approx(2.0)
    assert len(fs.calls("Score")) == 1 and fs.calls("ScoreGroups") == []


def test_chunking_keeps_order_and_runs_chunks_concurrently(fs):
    fs.state.max_samples = 3  # the fake rejects bigger requests, so chunking is enforced
    fs.gather("Score", 2)  # the first two chunks are answered only once both are in flight
    samples = [{"prompt": "p", "response": "x" * i, "id": str(i)} for i in range(10)]
    with RewardClient(fs.address, max_samples_per_request=3, max_concurrent_requests=2) as c:
        results = c.score(samples)
    assert [r.id for r in results] == [str(i) for i in range(10)]
    assert [r.reward for r in results] == pytest.approx([i / 10 for i in range(10)])
    # Chunks run concurrently, so the server may see them in any order; the results are in order.
    assert sorted(len(call.request.samples) for call in fs.calls("Score")) == [1, 3, 3, 3]
    assert fs.state.max_in_flight == 2  # two at once (forced by the gather), never more


def test_async_chunking_keeps_order_and_bounds_concurrency(fs):
    fs.state.max_samples = 2
    fs.gather("Score", 3)
    samples = [{"prompt": "p", "response": "y" * i} for i in range(9)]

    async def go():
        async with AsyncRewardClient(fs.address, max_samples_per_request=2, max_concurrent_requests=3) as c:
            return await c.score(samples)

    results = asyncio.run(go())
    assert [r.reward for r in results] == pytest.approx([i / 10 for i in range(9)])
    assert sorted(len(call.request.samples) for call in fs.calls("Score")) == [1, 2, 2, 2, 2]
    assert fs.state.max_in_flight == 3


# -- retries and deadlines ----------------------------------------------------------


def test_retries_unavailable_then_succeeds(client, fs, fake_time):
    fs.fail("Score", (UNAVAILABLE, None), (UNAVAILABLE, None), (EXHAUSTED, None))
    results = client.score(SAMPLES[:1])
    assert_matches(results[0], *EXPECT[0])
    assert len(fs.calls("Score")) == 4
    # one sleep per retry, exponential from initial_backoff=0.01 under max_backoff=0.05, jittered into [cap/2, cap]
    caps = [0.01, 0.02, 0.04]
    assert len(fake_time.sleeps) == 3
    assert all(cap / 2 <= d <= cap for d, cap in zip(fake_time.sleeps, caps, strict=True)), fake_time.sleeps


def test_retry_honours_pushback(client, fs, fake_time):
    fs.fail("Score", (EXHAUSTED, 300))
    client.score(SAMPLES[:1])
    assert fake_time.sleeps == [pytest.approx(0.3)]  # the server's 300 ms, not the client's 0.01 s backoff
    assert len(fs.calls("Score")) == 2


def test_negative_pushback_is_not_retried(client, fs):
    fs.state.max_samples = 1  # over the cap: the fake answers RESOURCE_EXHAUSTED + pushback -1
    with pytest.raises(ResourceExhaustedError) as ei:
        client.score(SAMPLES[:2])
    assert ei.value.code == EXHAUSTED and ei.value.attempts == 1
    assert len(fs.calls("Score")) == 1


def test_gives_up_after_max_retries_with_typed_error(fs):
    fs.fail("Score", *[(UNAVAILABLE, None)] * 5)
    with RewardClient(fs.address, max_retries=2, initial_backoff=0.01) as c, pytest.raises(UnavailableError) as ei:
        c.score(SAMPLES[:1])
    assert isinstance(ei.value, RewardServiceError)
    assert ei.value.code == UNAVAILABLE and ei.value.attempts == 3
    assert "injected UNAVAILABLE" in ei.value.details
    assert len(fs.calls("Score")) == 3


def test_invalid_argument_is_typed_and_not_retried(client, fs):
    bad = [{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(InvalidRequestError) as ei:
        client.score(bad)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown role" in ei.value.details
    assert len(fs.calls("Score")) == 1
    assert client.score(SAMPLES[:1])[0].reward == pytest.approx(2.0)  # the next request still works


def test_deadline_is_per_call(fs):
    """The server holds the call and the client has no deadline of its own: only the per-call
    timeout can end it (without it, the call would be answered when the hold's hang guard expires)."""
    fs.hold("Score")
    with RewardClient(fs.address, initial_backoff=0.01) as c:
        assert c.timeout is None
        with pytest.raises(DeadlineExceededError) as ei:
            c.score(SAMPLES[:1], timeout=0.3)
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ei.value.attempts == 1  # DEADLINE_EXCEEDED is not retried


def test_retries_never_extend_past_the_deadline(fs, fake_time):
    """On the fake clock only the client's sleeps take time: the 15 s pushbacks fit three times into
    the 50 s deadline (50 -> 35 -> 20 -> 5 s left); a fourth would sleep into the deadline, so the
    fourth failure is raised as it is instead. (The attempts' gRPC timeouts are those 50..5 s, real.)"""
    fs.fail("Score", *[(UNAVAILABLE, 15_000)] * 100)
    with (
        RewardClient(fs.address, timeout=50.0, max_retries=100) as c,
        pytest.raises(UnavailableError) as ei,  # the last real error, not a sleep into the deadline
    ):
        c.score(SAMPLES[:1])
    assert fake_time.sleeps == [pytest.approx(15.0)] * 3
    assert ei.value.attempts == 4 and len(fs.calls("Score")) == 4


def test_retry_state_backoff_is_exponential_with_jitter():
    class Err(grpc.RpcError):
        def code(self):
            return UNAVAILABLE

        def trailing_metadata(self):
            return ()

        def details(self):
            return "down"

    opts = ClientOptions(max_retries=10, initial_backoff=0.1, max_backoff=0.5)
    state = RetryState(opts, Deadline(None))
    delays = []
    for _ in range(5):
        state.attempt_timeout()
        delays.append(state.backoff(Err()))
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True)), delays


def test_per_call_overrides_never_mutate_the_client(fs):
    fs.hold("Score")
    with RewardClient(fs.address, timeout=300.0, max_retries=0) as c:
        before = c.options
        with pytest.raises(DeadlineExceededError):
            c.score(SAMPLES[:1], timeout=0.1)
        assert c.options is before and c.timeout == 300.0
        fs.release("Score")

        patient = c.with_options(max_retries=3, timeout=200.0)
        assert (patient.max_retries, patient.timeout) == (3, 200.0)
        assert (c.max_retries, c.timeout) == (0, 300.0) and c.options is before
        fs.fail("Score", (UNAVAILABLE, None))
        assert patient.score(SAMPLES[:1])[0].reward == pytest.approx(2.0)  # retried once
        fs.fail("Score", (UNAVAILABLE, None))
        with pytest.raises(UnavailableError):
            c.score(SAMPLES[:1])  # the original still does not retry
        patient.close()  # a copy does not own the channel
        assert c.score(SAMPLES[:1])[0].reward == pytest.approx(2.0)


def test_api_key_and_metadata_are_sent(fs):
    with RewardClient(fs.address, api_key="sk-test", metadata={"x-team": "rl"}) as c:
        c.score(SAMPLES[:1])
        c.with_options(metadata={"x-team": "eval"}).score(SAMPLES[:1])
    first, second = (call.metadata for call in fs.calls("Score"))
    assert first["authorization"] == "Bearer sk-test" and first["x-team"] == "rl"
    assert second["authorization"] == "Bearer sk-test" and second["x-team"] == "eval"


def test_error_mapping_covers_every_documented_code():
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: E.InvalidRequestError,
        grpc.StatusCode.RESOURCE_EXHAUSTED: E.ResourceExhaustedError,
        grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceededError,
        grpc.StatusCode.UNAVAILABLE: E.UnavailableError,
        grpc.StatusCode.UNAUTHENTICATED: E.AuthenticationError,
        grpc.StatusCode.PERMISSION_DENIED: E.PermissionDeniedError,
        grpc.StatusCode.FAILED_PRECONDITION: E.FailedPreconditionError,
        grpc.StatusCode.NOT_FOUND: E.NotFoundError,
        grpc.StatusCode.INTERNAL: E.InternalServerError,
        grpc.StatusCode.ABORTED: E.RewardServiceError,
    }
    for code, cls in cases.items():
        err = E.from_status(code.value[0], "msg")  # the int form a stream's ChunkError carries
        assert type(err) is cls and err.code == code and err.details == "msg"
        assert E.from_status(code, "m").code == code
    assert E.DeadlineExceededError("x").code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unreachable_server_raises_unavailable():
    with RewardClient("127.0.0.1:1", max_retries=1, initial_backoff=0.01, timeout=60) as c:
        with pytest.raises(UnavailableError) as ei:
            c.model_info()
        assert ei.value.code == UNAVAILABLE and ei.value.attempts == 2
        assert c.health() is False


def test_retries_ride_out_a_server_that_comes_back(monkeypatch):
    """Reconnect backoff is capped, so retries reconnect instead of failing fast until exhausted.

    The server comes up while the client sleeps before its first retry: the first
    attempt surely failed, and the rest of the default retries (really slept) must
    reach the server through a channel that was backing off.
    """
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    late = fake.FakeServer(port=port)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        if not slept:
            late.start()
        slept.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(sync_client, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    try:
        with RewardClient(f"127.0.0.1:{port}", timeout=60) as c:
            assert c.health() is False  # nothing listening: the channel is now backing off
            results = c.score(SAMPLES[:1])  # default retries
            assert results[0].reward == pytest.approx(2.0)
        assert 1 <= len(slept) <= _core.DEFAULT_MAX_RETRIES
        assert len(late.calls("Score")) == 1  # the first attempts never reached it
    finally:
        if slept:
            late.stop()


def test_tls_with_root_certificates(tmp_path):
    cert, key = self_signed_cert(tmp_path, "/CN=localhost", "IP:127.0.0.1,DNS:localhost")
    srv = fake.FakeServer(tls=(key.read_bytes(), cert.read_bytes())).start()
    try:
        with RewardClient(srv.address, root_certificates=cert.read_bytes(), api_key="k") as c:
            assert c.score(SAMPLES[:1])[0].reward == pytest.approx(2.0)
            assert c.health() is True
        assert srv.calls("Score")[0].metadata["authorization"] == "Bearer k"

        async def go():
            async with AsyncRewardClient(srv.address, root_certificates=cert.read_bytes()) as ac:
                return (await ac.score(SAMPLES[:1]))[0].reward

        assert asyncio.run(go()) == pytest.approx(2.0)
        with RewardClient(srv.address, max_retries=0, timeout=5) as plain, pytest.raises(UnavailableError):
            plain.score(SAMPLES[:1])  # a plaintext client cannot talk to a TLS server
    finally:
        srv.stop()


# -- groups, compare, info, health, stream -------------------------------------------


def test_score_groups(client, fs):
    completions = ["a", "bbb", "cc"]
    results = client.score_groups("Why?", completions, step=3)
    for r, c in zip(results, completions, strict=True):
        assert_matches(r, "Why?", c)
    (call,) = fs.calls("ScoreGroups")
    (group,) = call.request.groups
    assert group.prompt_text == "Why?" and list(group.completions) == completions
    assert call.request.options.step == 3

    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hey?"}]
    results = client.score_groups(chat, ["yo"], return_members=True)
    assert_matches(results[0], "be nice hey?", "yo", members=True)
    assert fs.calls("ScoreGroups")[1].request.groups[0].prompt_messages.messages[1].content == "hey?"


def test_score_groups_split_over_the_request_cap(fs):
    fs.state.max_samples = 3
    groups = [("p1", ["a" * i for i in range(1, 8)]), ("p2", ["b", "bb"]), ("p3", ["c"])]
    with RewardClient(fs.address, max_samples_per_request=3) as c:
        out = c.score_groups_many(groups)
    assert [len(g) for g in out] == [7, 2, 1]
    assert [r.reward for r in out[0]] == pytest.approx([i / 10 for i in range(1, 8)])
    assert [r.reward for r in out[1]] == pytest.approx([0.1, 0.2])
    sizes = [[len(g.completions) for g in call.request.groups] for call in fs.calls("ScoreGroups")]
    assert sorted(sizes) == [[1], [1, 2], [3], [3]]


def test_compare(client, fs):
    res = client.compare("Q?", "long answer", "no")
    ea, eb = fake.expected("Q?", "long answer"), fake.expected("Q?", "no")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert res.prob == pytest.approx(sig(ea["reward"] - eb["reward"]), rel=1e-5)
    assert res.member_probs == pytest.approx([sig(a - b) for a, b in zip(ea["members"], eb["members"], strict=True)])
    assert res.a.reward == pytest.approx(ea["reward"]) and res.b.reward == pytest.approx(eb["reward"])
    client.compare([{"role": "user", "content": "Q?"}], "x", "y")
    assert fs.calls("Compare")[1].request.prompt_messages.messages[0].content == "Q?"


def test_model_info(client):
    info = client.model_info()
    assert (info.name, info.version, info.kind, info.num_heads, info.max_tokens) == ("fake", "fake-v1", "heads", 3, 128)
    assert info.shift == (0.0, 0.5, 1.0) and info.scale == (1.0, 2.0, 3.0)
    assert info.has_epistemic and info.default_uncertainty_penalty == 0.5 and info.max_samples_per_request == 1000


def test_health(client, fs):
    assert client.health() is True
    fs.set_serving(False)
    assert client.health() is False
    fs.set_serving(True)
    client.wait_until_ready(timeout=60)  # returns at the first SERVING answer


def test_score_stream_ids_and_order(client, fs):
    samples = ({"prompt": "p", "response": "z" * i} for i in range(10))  # a lazy iterable
    results = list(client.score_stream(samples, chunk_size=4, run_id="s"))
    assert [r.id for r in results] == [str(i) for i in range(10)]
    assert [r.reward for r in results] == pytest.approx([i / 10 for i in range(10)])
    chunks = fs.calls("ScoreStream.chunk")
    assert [len(c.request.samples) for c in chunks] == [4, 4, 2]
    assert chunks[0].request.options.run_id == "s"


def test_score_stream_error_chunk_raises_typed_error(client):
    samples = [{"prompt": "p", "response": "ok", "id": "x1"}, {"prompt": "p", "response": "no", "id": "bad"}]
    got = []
    with pytest.raises(InvalidRequestError, match="bad chunk") as ei:
        for r in client.score_stream(samples, chunk_size=1):
            got.append(r.id)
    assert got == ["x1"] and ei.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_score_stream_bad_sample_surfaces_as_value_error(client):
    samples = [{"prompt": "p", "response": "ok"}, {"prompt": "p"}]
    with pytest.raises(ValueError, match="sample 1"):
        list(client.score_stream(samples, chunk_size=1))


# -- sync / async parity ------------------------------------------------------------------


def test_async_client_mirrors_sync(client, fs):
    stream_samples = [{"prompt": "p", "response": "q" * i} for i in range(5)]
    sync = dict(
        score=client.score(SAMPLES, return_members=True, step=1),
        groups=client.score_groups("Why?", ["a", "bb"]),
        compare=client.compare("Q?", "aa", "b"),
        info=client.model_info(),
        health=client.health(),
        stream=list(client.score_stream(stream_samples, chunk_size=2)),
    )

    async def agen():
        for s in stream_samples:
            yield s

    async def go():
        async with AsyncRewardClient(fs.address, initial_backoff=0.01) as ac:
            fs.fail("Score", (UNAVAILABLE, None))  # retried like the sync client
            out = dict(
                score=await ac.score(SAMPLES, return_members=True, step=1),
                groups=await ac.score_groups("Why?", ["a", "bb"]),
                compare=await ac.compare("Q?", "aa", "b"),
                info=await ac.model_info(),
                health=await ac.health(),
                stream=[r async for r in ac.score_stream(agen(), chunk_size=2)],
            )
            with pytest.raises(InvalidRequestError) as ei:
                await ac.score([{"messages": [{"role": "wizard", "content": "x"}]}])
            assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
            bad = [{"prompt": "p", "response": "n", "id": "bad"}]
            with pytest.raises(InvalidRequestError):
                [r async for r in ac.score_stream(bad)]
            fs.hold("Score")  # answered only when the client has given up
            with pytest.raises(DeadlineExceededError):
                await ac.with_options(timeout=0.2).score(SAMPLES[:1])
            assert ac.timeout is None
            return out

    async_out = asyncio.run(go())
    assert async_out == sync
    assert len(fs.calls("Score")) == 1 + 2 + 1 + 1  # sync, async (retried), invalid, deadline


def test_async_client_can_be_built_outside_a_loop_and_reused_across_loops(fs):
    ac = AsyncRewardClient(fs.address)

    async def once():
        return (await ac.score(SAMPLES[:1]))[0].reward

    assert asyncio.run(once()) == pytest.approx(2.0)
    assert asyncio.run(once()) == pytest.approx(2.0)  # a new loop gets a new channel
    asyncio.run(ac.close())


def test_results_are_frozen_and_picklable(client):
    r = client.score(SAMPLES[:1])
    with pytest.raises(AttributeError):
        r[0].reward = 1.0
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.model_version == "fake-v1"


def test_a_call_split_over_a_rolling_activation_says_which_version_scored_each_sample():
    """Two requests of one call answered by two versions (a replica swapped between them):
    every result carries its own version, and the call lists both."""
    from rmserve.client._core import GroupsPlan, ScorePlan
    from rmserve.v1 import reward_pb2 as pb

    plan = ScorePlan.build([{"prompt": "p", "response": str(i)} for i in range(5)], pb.ScoreOptions(), 3)
    answers = [pb.ScoreResponse(results=[pb.ScoreResult(reward=float(i)) for i in range(n)], model_version=v)
               for n, v in zip(plan.sizes, ("v1", "v2"), strict=True)]
    results = plan.parse(answers)
    assert [r.model_version for r in results] == ["v1", "v1", "v1", "v2", "v2"]
    assert results.model_versions == ("v1", "v2") and results.model_version == "v2"

    groups = GroupsPlan.build([("p", ["a", "b"]), ("q", ["c", "d"])], pb.ScoreOptions(), 2)
    answers = [pb.ScoreGroupsResponse(groups=[pb.GroupResult(results=[pb.ScoreResult(), pb.ScoreResult()])],
                                      model_version=v) for v in ("v1", "v2")]
    first, second = groups.parse(answers)
    assert [r.model_version for r in first] == ["v1", "v1"] and second.model_versions == ("v2",)
