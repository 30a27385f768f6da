"""Client-side bad input: the SDK's typed `InvalidRequestError` (INVALID_ARGUMENT, also a
ValueError) from the sync and the async client, and one meaning of message content on every
client path (the SDK, the TRL and the verl adapters): text parts joined, other parts refused
with their index and type. Nothing is sent for a request refused here."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

import rmserve.client
from rmserve.client import (
    AsyncRewardClient,
    InvalidRequestError,
    RewardClient,
    RewardServiceError,
    as_trl_reward_func,
)
from rmserve.client import verl as rm_verl


def load_fake():
    """tests/client_fake_server.py, imported by path (pytest uses --import-mode=importlib)."""
    name = "_rmserve_tests_client_fake_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("client_fake_server.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


fake = load_fake()


@pytest.fixture(scope="module")
def server():
    srv = fake.FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def fs(server):
    server.reset()
    server.set_serving(True)
    return server


def test_invalid_request_error_is_exported_typed_and_a_value_error():
    assert rmserve.client.InvalidRequestError is InvalidRequestError
    assert "InvalidRequestError" in rmserve.client.__all__
    assert issubclass(InvalidRequestError, RewardServiceError) and issubclass(InvalidRequestError, ValueError)
    e = InvalidRequestError("sample 0: nope")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details == "sample 0: nope"


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}

# Each kind of bad sample the README lists as INVALID_ARGUMENT, and what the error names.
BAD = [
    pytest.param([], "score\\(\\) needs at least one sample", id="empty-batch"),
    pytest.param([{"messages": []}], "sample 0: expected a non-empty list", id="no-messages"),
    pytest.param([{"token_ids": []}], "sample 0: 'token_ids' is empty", id="empty-token-ids"),
    pytest.param(["just text"], "sample 0: expected a dict", id="string-sample"),
    pytest.param([{"prompt": "p", "response": 3}], "sample 0 'response': expected a str", id="response-not-str"),
    pytest.param([{"messages": [{"role": "user", "content": [IMAGE]}]}],
                 "sample 0, message 0 content, part 0: a part of type 'image_url' cannot be scored", id="image-part"),
    pytest.param({"prompt": "p", "response": "r"}, "list of samples", id="one-sample-unwrapped"),
]


@pytest.mark.parametrize(("samples", "match"), BAD)
def test_sync_client_raises_invalid_request_error_and_sends_nothing(fs, samples, match):
    with RewardClient(fs.address, timeout=10) as c, pytest.raises(InvalidRequestError, match=match) as ei:
        c.score(samples)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fs.calls("Score") == []


@pytest.mark.parametrize(("samples", "match"), BAD)
def test_async_client_raises_invalid_request_error_and_sends_nothing(fs, samples, match):
    async def go():
        async with AsyncRewardClient(fs.address, timeout=10) as c:
            await c.score(samples)

    with pytest.raises(InvalidRequestError, match=match) as ei:
        asyncio.run(go())
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fs.calls("Score") == []


def test_other_call_validation_is_typed_too(fs):
    with RewardClient(fs.address, timeout=10) as c:
        for call in (
            lambda: c.score_groups("p", []),
            lambda: c.score([{"prompt": "p", "response": "r"}], uncertainty_penalty=float("nan")),
            lambda: c.compare("p", "a", 3),
            lambda: c.score([{"prompt": "p", "response": "r"}], timeout=-1),
            lambda: list(c.score_stream([{"prompt": "p"}])),
            lambda: c.submit_preferences([]),
        ):
            with pytest.raises(InvalidRequestError):
                call()
    with RewardClient(fs.address, max_message_bytes=1000) as c, pytest.raises(InvalidRequestError, match="1000-byte"):
        c.score([{"prompt": "p", "response": "x" * 2000}])
    assert fs.calls("Score") == [] and fs.calls("ScoreGroups") == [] and fs.calls("Compare") == []


def test_text_parts_are_joined_without_a_separator(fs):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    with RewardClient(fs.address, timeout=10) as c:
        c.score([{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "hi"}]}])
    msgs = fs.calls("Score")[0].request.samples[0].conversation.messages
    assert [m.content for m in msgs] == ["Hello, world", "hi"]


def test_a_part_that_is_not_text_is_named_by_message_index_and_type(fs):
    messages = [{"role": "user", "content": "look"},
                {"role": "user", "content": [{"type": "text", "text": "this: "}, {"type": "input_audio"}]}]
    with RewardClient(fs.address, timeout=10) as c, pytest.raises(InvalidRequestError) as ei:
        c.score([{"prompt": "p", "response": "r"}, {"messages": messages}])
    assert "sample 1, message 1 content, part 1: a part of type 'input_audio'" in str(ei.value)
    assert fs.calls("Score") == []


def trl_call(func, prompts, completions):
    return func(prompts=prompts, completions=completions, completion_ids=[[0]] * len(prompts),
                trainer_state=SimpleNamespace(global_step=0), log_metric=None, log_extra=None)


def test_trl_adapter_refuses_an_image_part_instead_of_dropping_it(fs):
    func = as_trl_reward_func(fs.address)
    prompt = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]
    completion = [{"role": "assistant", "content": "a cat"}]
    with pytest.raises(InvalidRequestError, match=r"prompt 1, message 0 content, part 1: a part of type 'image_url'"):
        trl_call(func, [[{"role": "user", "content": "q"}], prompt], [completion, completion])
    with pytest.raises(InvalidRequestError, match=r"completion 0, message 0 content, part 0: a part of type 'image_url'"):
        trl_call(func, ["p", "p"], [[{"role": "assistant", "content": [IMAGE]}], completion])
    assert fs.calls("Score") == [] and fs.calls("ScoreGroups") == []
    # text parts still read as their joined text, as in the SDK
    trl_call(func, ["p"], [[{"role": "assistant", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]}]])
    msgs = fs.calls("Score")[0].request.samples[0].conversation.messages
    assert [m.content for m in msgs] == ["p", "a cat"]
    func.close()


def test_verl_adapter_reads_content_as_the_sdk_does():
    info = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]}]}
    assert rm_verl.build_sample("4", info) == {"prompt": [{"role": "user", "content": "2+2?"}], "response": "4"}
    with pytest.raises(InvalidRequestError, match=r"extra_info\['prompt'\], message 0 content, part 0: a part of type 'image_url'"):
        rm_verl.build_sample("4", {"prompt": [{"role": "user", "content": [IMAGE]}]})
    with pytest.raises(InvalidRequestError, match=r"solution_str, part 0: a part of type 'image_url'"):
        rm_verl.build_sample([IMAGE], {"prompt": "p"})
    with pytest.raises(InvalidRequestError, match="raw_prompt"):
        rm_verl.build_sample("4", {"raw_prompt": 5})
