"""Preference data: formats, ranked-list weights, ties, and bad rows reported with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training.data import DataError, load_pairs, parse_hh
from rmserve.training.encoding import encode_pairs

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"


def write(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_hh_text_becomes_messages_with_the_shared_prefix_as_prompt(tmp_path):
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I bake bread?"
    path = write(tmp_path, [{"chosen": prefix + "\n\nAssistant: knead it", "rejected": prefix + "\n\nAssistant: no"}])
    (p,), report = load_pairs(path)
    assert p.prompt == [u("hi"), a("hello"), u("how do I bake bread?")]
    assert p.chosen == [a("knead it")] and p.rejected == [a("no")]
    assert (p.weight, p.margin, p.source) == (1.0, 0.0, f"{path}:1")
    assert report.rows == 1 and report.pairs == 1 and report.skipped == 0


def test_hh_consecutive_turns_of_one_role_are_merged_and_counted(tmp_path):
    msgs = parse_hh("\n\nHuman: q\n\nAssistant: one\n\nAssistant: two")
    assert msgs == [u("q"), a("one"), a("two")]  # parse keeps them; the loader merges
    path = write(tmp_path, [{"chosen": "\n\nHuman: q\n\nAssistant: one\n\nAssistant: two",
                             "rejected": "\n\nHuman: q\n\nAssistant: other"}])
    (p,), report = load_pairs(path)
    assert p.chosen == [a("one\n\ntwo")]
    assert report.notes["merged consecutive assistant turns"] == 1


def test_explicit_prompt_with_text_or_messages(tmp_path):
    path = write(tmp_path, [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 0.5, "weight": 2},
        {"prompt": [u("q1"), a("r1"), u("q2")], "chosen": [a("good")], "rejected": a("bad")},
    ])
    (p1, p2), _ = load_pairs(path)
    assert (p1.prompt, p1.chosen, p1.rejected, p1.margin, p1.weight) == ([u("q")], [a("good")], [a("bad")], 0.5, 2.0)
    assert p2.prompt == [u("q1"), a("r1"), u("q2")] and p2.rejected == [a("bad")]


def test_ranked_list_yields_all_implied_pairs_weighted_like_g_minus_1_pairs(tmp_path):
    path = write(tmp_path, [
        {"prompt": "q", "responses": ["best", "mid", "worst"], "ranking": [1, 2, 3]},
        {"prompt": "q", "responses": ["x", "y", "z"], "ranking": [1, 1, 2], "weight": 3},
    ])
    pairs, report = load_pairs(path)
    first = [p for p in pairs if p.source.endswith(":1")]
    assert {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in first} == {
        ("best", "mid"), ("best", "worst"), ("mid", "worst")}
    assert sum(p.weight for p in first) == pytest.approx(2.0)       # 3 responses weigh as 2 pairs
    second = [p for p in pairs if p.source.endswith(":2")]
    assert {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in second} == {("x", "z"), ("y", "z")}
    assert [p.weight for p in second] == pytest.approx([1.5, 1.5])  # 3 x (2 ranks - 1) / 2 pairs
    assert report.ties["equal ranks"] == 1 and not report.errors


def test_ties_are_skipped_and_counted_not_errors(tmp_path):
    path = write(tmp_path, [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "tie": True},
        {"prompt": "q", "responses": ["a", "b"], "ranking": [2, 2]},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ])
    pairs, report = load_pairs(path, strict=True)  # strict: ties are policy, not malformed rows
    assert len(pairs) == 1
    assert report.ties == {"identical responses": 1, "marked tie": 1, "equal ranks": 1}
    assert report.skipped == 3 and not report.errors


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"question": "q", "answer": "a"}, "unknown row format"),
    ({"prompt": "q", "chosen": [{"role": "human", "content": "x"}], "rejected": "b"}, "bad message"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: ok"}, "empty response"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "bad field"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1]}, "bad field"),
    ({"chosen": "no turns here", "rejected": "\n\nHuman: q\n\nAssistant: ok"}, "bad HH text"),
]


def test_bad_rows_are_skipped_and_reported_with_file_and_line(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    rows = [good, ""] + [r for r, _ in BAD_ROWS]  # line 2 is blank: ignored, but still counts as a line
    path = write(tmp_path, rows)
    pairs, report = load_pairs(path)
    assert len(pairs) == 1 and report.rows == 1 + len(BAD_ROWS)
    for line, (_, reason) in enumerate(BAD_ROWS, start=3):
        assert any(e.startswith(f"{path}:{line}:") for e in report.examples[reason]), (line, reason)
    assert sum(report.errors.values()) == len(BAD_ROWS)
    assert "skipped" in report.summary() and "invalid JSON" in report.summary()


def test_strict_mode_raises_at_the_first_bad_row(tmp_path):
    path = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=rf"{path}:2: unknown row format"):
        load_pairs(path, strict=True)


def test_a_file_without_usable_pairs_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable pairs"):
        load_pairs(write(tmp_path, ["{oops"]))


def test_encoding_uses_the_serving_encoder_dedups_and_reports_unencodable_pairs(tmp_path, tiny_llama_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_llama_backbone)
    path = write(tmp_path, [
        {"prompt": "q", "responses": ["one", "two", "three"], "ranking": [1, 2, 3]},
        {"prompt": "q", "chosen": "fine", "rejected": "word " * 200},
    ])
    pairs, report = load_pairs(path)
    enc_ = PromptEncoder(tok, 64)
    enc = encode_pairs(pairs, enc_, report)
    assert len(enc) == 3 and len(enc.seqs) == 3            # 3 pairs over 3 unique conversations
    assert enc.seqs[enc.chosen[0]] == enc_.conversation([u("q"), a("one")]).ids
    assert report.errors["cannot encode"] == 1
    assert report.examples["cannot encode"][0].startswith(f"{path}:2")
    assert report.pairs == 3
    with pytest.raises(DataError, match=rf"{path}:2 \(rejected\).*response alone needs"):
        encode_pairs(pairs, enc_, report, strict=True)


def test_encoded_pairs_keep_the_response_length_without_the_prompt(tmp_path, tiny_llama_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_llama_backbone)
    long_prompt = "how do I bake bread " * 12
    path = write(tmp_path, [
        {"prompt": "q", "chosen": "the quick brown fox", "rejected": "no"},
        {"prompt": long_prompt, "chosen": "hello there", "rejected": "mix flour and water, then knead"},
    ])
    pairs, report = load_pairs(path)
    enc = encode_pairs(pairs, PromptEncoder(tok, 40), report)
    assert enc.truncated >= 1  # the long prompt was cut from the left; responses never are

    def expected(text: str) -> int:  # the response part as the template renders it: content, end marker, newline
        return len(tok(text + "<|end|>\n", add_special_tokens=False)["input_ids"])

    chosen, rejected = enc.response_lengths()
    assert chosen.tolist() == [expected("the quick brown fox"), expected("hello there")]
    assert rejected.tolist() == [expected("no"), expected("mix flour and water, then knead")]
    sub = enc.subset(np.array([1]))
    assert [x.tolist() for x in sub.response_lengths()] == [chosen[1:].tolist(), rejected[1:].tolist()]


@pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")
def test_the_real_hh_file_parses_and_its_two_empty_responses_are_reported():
    pairs, report = load_pairs(HH)
    assert report.rows == 1512 and len(pairs) == 1510
    assert report.errors == {"empty response": 2}
    assert [e.split(":")[1] for e in report.examples["empty response"]] == ["374", "406"]
    assert all(p.prompt and p.chosen[-1]["role"] == "assistant" for p in pairs)
