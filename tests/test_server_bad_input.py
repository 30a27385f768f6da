"""Every bad input gets a precise status and message; the next valid request succeeds."""

from __future__ import annotations

import grpc
import pytest

from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.address) as ch:
        yield pb_grpc.RewardServiceStub(ch), ch


def text(prompt: str, response: str) -> pb.Sample:
    return pb.Sample(text=pb.PromptResponse(prompt=prompt, response=response))


def conv(*turns: tuple[str, str]) -> pb.Sample:
    return pb.Sample(conversation=pb.Conversation(messages=[pb.Message(role=r, content=c) for r, c in turns]))


GOOD = pb.ScoreRequest(samples=[text("How do I bake bread?", "Mix flour, water and yeast.")])

CASES = [
    ("empty batch", pb.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no samples"),
    ("empty conversation", pb.ScoreRequest(samples=[pb.Sample(conversation=pb.Conversation())]),
     grpc.StatusCode.INVALID_ARGUMENT, "no messages"),
    ("empty token ids", pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds())]), grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids is empty"),
    ("no input", pb.ScoreRequest(samples=[pb.Sample(id="x")]), grpc.StatusCode.INVALID_ARGUMENT, "has no input"),
    (
        "unknown role",
        pb.ScoreRequest(samples=[conv(("user", "hi"), ("robot", "beep"))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown role 'robot'",
    ),
    (
        "over the token limit",
        pb.ScoreRequest(samples=[text("hi", "the quick brown fox jumps over the lazy dog " * 20)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "response alone needs",
    ),
    (
        "token ids out of vocabulary",
        pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds(ids=[1, 2, 99999]))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token id 99999 is outside the vocabulary",
    ),
    (
        "too many samples",
        pb.ScoreRequest(samples=[text("a", "b")] * 17),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at most 16 per request",
    ),
    (
        "negative penalty",
        pb.ScoreRequest(samples=[text("a", "b")], options=pb.ScoreOptions(uncertainty_penalty=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "uncertainty_penalty must be",
    ),
]


@pytest.mark.parametrize(("name", "request_", "code", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_precise_status_and_the_server_keeps_serving(stub, name, request_, code, match):
    s, _ = stub
    with pytest.raises(grpc.RpcError) as err:
        s.Score(request_, timeout=30)
    assert err.value.code() == code
    assert match in err.value.details()
    assert len(s.Score(GOOD, timeout=30).results) == 1


def test_message_over_the_size_limit_is_resource_exhausted(stub):
    s, _ = stub
    big = pb.ScoreRequest(samples=[text("x" * (1 << 20), "y")])
    with pytest.raises(grpc.RpcError) as err:
        s.Score(big, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(s.Score(GOOD, timeout=30).results) == 1


@pytest.mark.parametrize(("method", "message_type", "streaming"), [
    ("/rmserve.v1.RewardService/Score", "ScoreRequest", False),
    ("/rmserve.v1.RewardService/Compare", "CompareRequest", False),
    ("/rmserve.v1.AdminService/ActivateModel", "ActivateModelRequest", False),
    ("/rmserve.v1.AdminService/ListModels", "ListModelsRequest", False),
    ("/rmserve.v1.AdminService/Train", "TrainRequest", True),
])
def test_malformed_bytes_are_invalid_argument_on_every_service(stub, method, message_type, streaming):
    s, ch = stub
    call = ch.unary_stream if streaming else ch.unary_unary
    raw = call(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        out = raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)
        if streaming:
            list(out)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert f"malformed {message_type}" in err.value.details()
    assert len(s.Score(GOOD, timeout=30).results) == 1


def test_bad_chunk_in_a_stream_gets_an_error_and_the_stream_goes_on(stub):
    s, _ = stub
    chunks = [
        pb.ScoreStreamRequest(samples=[pb.Sample(id="a", text=pb.PromptResponse(prompt="p", response="r"))]),
        pb.ScoreStreamRequest(samples=[pb.Sample(id="b", tokens=pb.TokenIds(ids=[-1]))]),
        pb.ScoreStreamRequest(samples=[pb.Sample(id="c", text=pb.PromptResponse(prompt="p", response="r2"))]),
    ]
    out = list(s.ScoreStream(iter(chunks), timeout=30))
    assert [r.results[0].id if r.results else None for r in out] == ["a", None, "c"]
    assert out[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "outside the vocabulary" in out[1].error.message


def test_expired_deadline_is_deadline_exceeded(stub):
    s, _ = stub
    with pytest.raises(grpc.RpcError) as err:
        s.Score(GOOD, timeout=0.0001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(s.Score(GOOD, timeout=30).results) == 1


def test_groups_and_compare_validate_too(stub):
    s, _ = stub
    with pytest.raises(grpc.RpcError) as err:
        s.ScoreGroups(pb.ScoreGroupsRequest(groups=[pb.Group(prompt_text="p")]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no completions" in err.value.details()
    bad_prompt = pb.Conversation(messages=[pb.Message(role="robot", content="beep")])
    with pytest.raises(grpc.RpcError) as err:
        s.Compare(pb.CompareRequest(prompt_messages=bad_prompt, response_a="a", response_b=""), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown role 'robot'" in err.value.details()
