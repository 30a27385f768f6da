"""The scoring core's edges: one meaning of message content, every result field through every
door's converter, and no server module importing the wiring back (docs/architecture.md)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from rmserve.service.server import http, wire
from rmserve.service.server.core import ScoreOptions, ScoreResult
from rmserve.service.server.encoding import Chat, Sample, Text, Tokens, message_text, messages
from rmserve.service.server.errors import InvalidInput
from rmserve.v1 import reward_pb2 as pb

SERVER = Path(__file__).resolve().parents[1] / "service" / "server"


def test_content_is_a_string_or_text_parts_joined():
    assert message_text("hi", "m") == "hi"
    assert message_text(None, "m") == ""
    parts = [{"type": "text", "text": "How do I "}, {"type": "text", "text": "bake bread?"}]
    assert message_text(parts, "m") == "How do I bake bread?"
    assert messages([{"role": "user", "content": parts}], lambda i: f"prompt[{i}]") == [
        {"role": "user", "content": "How do I bake bread?"}]


@pytest.mark.parametrize(("content", "says"), [
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}],
     "prompt[1]: content part 1 has type 'image_url'"),
    ([{"type": "input_audio"}], "prompt[1]: content part 0 has type 'input_audio'"),
    ([{"text": "no type"}], "prompt[1]: content part 0 has type 'None'"),
    ([{"type": "text", "text": 3}], 'prompt[1]: content part 0 (a text part) needs a string "text"'),
    (7, 'prompt[1]: "content" must be a string or a list'),
])
def test_other_content_is_refused_naming_the_message_and_the_part(content, says):
    with pytest.raises(InvalidInput) as e:
        messages([{"role": "user", "content": "ok"}, {"role": "user", "content": content}], lambda i: f"prompt[{i}]")
    assert str(e.value).startswith(says), str(e.value)


def test_grpc_requests_become_the_core_forms():
    req = pb.ScoreRequest(samples=[
        pb.Sample(id="a", text=pb.PromptResponse(prompt="p", response="r")),
        pb.Sample(conversation=pb.Conversation(messages=[pb.Message(role="user", content="u"),
                                                         pb.Message(role="assistant", content="v")])),
        pb.Sample(tokens=pb.TokenIds(ids=[1, 2, 3])),
        pb.Sample(id="empty"),
    ], options=pb.ScoreOptions(run_id="r", step=4, return_members=True))
    a, b, c, d = wire.samples_of(req.samples)
    assert a == Sample(Text("p", "r"), "a")
    assert b == Sample(Chat([{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]))
    assert isinstance(c.input, Tokens) and list(c.input.ids) == [1, 2, 3]
    assert d == Sample(None, "empty")
    assert wire.options_of(req.options) == ScoreOptions(run_id="r", step=4, return_members=True)
    assert wire.options_of(pb.ScoreOptions(uncertainty_penalty=0.0)).uncertainty_penalty == 0.0  # set, not unset


FULL = ScoreResult(reward=1.5, std=0.25, min=1.0, conservative=1.4375, num_tokens=12, truncated=True, id="s",
                   epistemic=0.125, ood_score=2.5, ood=True, members=(1.0, 2.0))


def test_every_result_field_reaches_the_grpc_answer():
    out = wire.result_pb(FULL)
    for f in dataclasses.fields(ScoreResult):
        got = getattr(out, f.name)
        assert (tuple(got) if f.name == "members" else got) == getattr(FULL, f.name), f.name
    bare = wire.result_pb(dataclasses.replace(FULL, epistemic=None, ood_score=None, ood=None, members=None))
    assert not any(bare.HasField(f) for f in ("epistemic", "ood_score", "ood")) and not bare.members


def test_every_result_field_reaches_the_http_answers():
    flat = http.result_json(FULL)  # slime: one sample, members are never asked for, ids never sent
    assert set(flat) == {f.name for f in dataclasses.fields(ScoreResult)} - {"id", "members"}
    assert all(flat[k] == getattr(FULL, k) for k in flat)
    logs = http.extra_logs([FULL, FULL])
    assert logs == {"rm_reward": [1.5] * 2, "rm_std": [0.25] * 2, "rm_min": [1.0] * 2, "rm_conservative": [1.4375] * 2,
                    "rm_epistemic": [0.125] * 2, "rm_ood_score": [2.5] * 2, "rm_ood": [1.0] * 2}
    assert set(http.extra_logs([FULL, dataclasses.replace(FULL, ood=None)])) == set(logs) - {"rm_ood"}


def test_no_server_module_imports_the_wiring():
    """app.py wires the doors; a door importing it back (even under TYPE_CHECKING) would tie
    every door to every other."""
    for path in SERVER.glob("*.py"):
        if path.name in ("app.py", "background.py"):  # background runs a RewardServer: it is wiring too
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "rmserve.service.server.app", path.name
