"""`rmserve score` writes every field a result has: the OOD fields of a model with OOD
statistics included, and whatever field ScoreResult gains next (the rows are read off the
dataclass, not listed by hand)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from rmserve.client import ScoreResult
from rmserve.service.cli import main
from rmserve.training.ood import calibrate_directory


@pytest.fixture(scope="module")
def ood_model(tiny_ensemble, tmp_path_factory):
    out = tmp_path_factory.mktemp("ood") / "model"
    shutil.copytree(tiny_ensemble, out)
    data = out.parent / "train.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": f"question {i}: how do I bake bread?", "chosen": f"Knead it {i} times.",
                    "rejected": f"No {i}."}) + "\n" for i in range(24)))
    calibrate_directory(out, data, quantile=0.9, holdout=0.5, seed=0)
    return out


ROWS = [{"id": "a", "prompt": "How do I bake bread?", "response": "Mix flour and water."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def score_rows(address, tmp_path, *flags):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["score", "--address", address, "--input", str(inp), "--output", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_rows_carry_every_result_field_ood_included(ood_model, server_factory, tmp_path):
    server = server_factory(ood_model)
    scored = score_rows(server.address, tmp_path, "--members")
    fields = {f.name for f in dataclasses.fields(ScoreResult)} - {"id"}  # the row keeps its own id
    assert {"ood", "ood_score", "model_version"} <= fields
    assert [s.get("id") for s in scored] == ["a", None]
    for s in scored:
        assert fields <= set(s), fields - set(s)
        assert isinstance(s["ood"], bool) and s["ood_score"] > 0 and s["model_version"] == "v1"
        assert len(s["members"]) == 4


def test_no_members_unless_asked_and_null_where_the_model_has_no_value(tiny_server, tmp_path):
    scored = score_rows(tiny_server.address, tmp_path)
    for s in scored:
        assert "members" not in s
        assert s["ood"] is None and s["ood_score"] is None  # no OOD statistics in this model
