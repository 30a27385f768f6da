"""LabelService pieces shared by both clients: request building and typed results for
submit_preferences, suggest_comparisons, labeler_report and export_preferences."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rmserve.client._core import Prompt, set_prompt
from rmserve.client.errors import InvalidRequestError
from rmserve.v1 import label_pb2 as lpb

__all__ = ["LabelerStats", "SubmitResult", "Suggestion", "build_candidates", "build_preferences"]

_KEYS = {"id", "prompt", "responses", "choice", "ranking", "tie", "margin", "labeler", "labeler_kind", "judge",
         "guideline", "rationale", "tag", "timestamp"}


@dataclass(frozen=True)
class SubmitResult:
    accepted: int      # new preferences stored
    duplicates: int    # ids already stored with the same content (retries)
    total: int         # preferences in the store afterwards


@dataclass(frozen=True)
class Suggestion:
    """A comparison worth labelling: `prob` = P(response_a ≻ response_b) under the ensemble,
    `score` the acquisition score (higher = more worth a label)."""

    candidate_id: str
    prompt: Prompt
    index_a: int
    index_b: int
    response_a: str
    response_b: str
    prob: float
    score: float
    disagreement: float
    uncertainty: float


@dataclass(frozen=True)
class LabelerStats:
    labeler: str
    kind: str
    volume: int
    agreement_with_model: float | None
    agreement_with_others: float | None   # Cohen's kappa against the other labelers' majority
    shared_items: int
    self_consistency: float | None
    repeated_items: int
    flagged: bool
    reason: str


def _preference(item: Mapping[str, Any], i: int) -> lpb.Preference:
    where = f"item {i}"
    if not isinstance(item, Mapping):
        raise InvalidRequestError(f"{where}: expected a dict, got {type(item).__name__}")
    if unknown := sorted(set(item) - _KEYS):
        raise InvalidRequestError(f"{where}: unknown keys {unknown}; known: {sorted(_KEYS)}")
    for key in ("id", "prompt", "responses", "labeler"):
        if key not in item:
            raise InvalidRequestError(f"{where}: missing {key!r}")
    responses = item["responses"]
    if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence):
        raise InvalidRequestError(f"{where}: 'responses' must be a list of str")
    p = lpb.Preference(id=str(item["id"]), responses=[str(r) for r in responses], labeler=str(item["labeler"]),
                       labeler_kind=str(item.get("labeler_kind", "human")))
    set_prompt(p, item["prompt"], where)
    labels = [k for k in ("choice", "ranking") if item.get(k) is not None] + (["tie"] if item.get("tie") is True else [])
    if len(labels) != 1:
        raise InvalidRequestError(f"{where}: set exactly one of 'choice', 'ranking' or 'tie': True")
    if labels == ["choice"]:
        p.choice = int(item["choice"])
    elif labels == ["ranking"]:
        p.ranking.ranks.extend(int(r) for r in item["ranking"])
    else:
        p.tie = True
    if item.get("margin") is not None:
        margin = float(item["margin"])
        if not math.isfinite(margin):
            raise InvalidRequestError(f"{where}: 'margin' must be finite")
        p.margin = margin
    if item.get("timestamp") is not None:
        p.timestamp_unix = float(item["timestamp"])
    for k in ("judge", "guideline", "rationale", "tag"):
        if item.get(k):
            setattr(p, k, str(item[k]))
    return p


def build_preferences(items: Iterable[Mapping[str, Any]], chunk: int) -> list[lpb.SubmitPreferencesRequest]:
    """Requests of at most `chunk` items each (each is stored all-or-nothing by the server)."""
    prefs = [_preference(item, i) for i, item in enumerate(items)]
    if not prefs:
        raise InvalidRequestError("submit_preferences needs at least one item")
    return [lpb.SubmitPreferencesRequest(items=prefs[i:i + chunk]) for i in range(0, len(prefs), chunk)]


def parse_submit(responses: Sequence[lpb.SubmitPreferencesResponse]) -> SubmitResult:
    return SubmitResult(accepted=sum(r.accepted for r in responses), duplicates=sum(r.duplicates for r in responses),
                        total=responses[-1].total)


def build_candidates(candidates: Iterable[Mapping[str, Any]], k: int) -> lpb.SuggestComparisonsRequest:
    req = lpb.SuggestComparisonsRequest(k=int(k))
    for i, c in enumerate(candidates):
        if not isinstance(c, Mapping) or "prompt" not in c or "responses" not in c:
            raise InvalidRequestError(f"candidate {i}: expected {{'prompt': str | messages, 'responses': [str, ...]}}")
        msg = req.candidates.add(id=str(c.get("id", i)), responses=[str(r) for r in c["responses"]])
        set_prompt(msg, c["prompt"], f"candidate {i}")
    return req


def _prompt_of(msg) -> Prompt:
    if msg.WhichOneof("prompt") == "prompt_messages":
        return [{"role": m.role, "content": m.content} for m in msg.prompt_messages.messages]
    return msg.prompt_text


def parse_suggestions(resp: lpb.SuggestComparisonsResponse) -> list[Suggestion]:
    return [
        Suggestion(candidate_id=s.candidate_id, prompt=_prompt_of(s), index_a=s.index_a, index_b=s.index_b,
                   response_a=s.response_a, response_b=s.response_b, prob=s.prob, score=s.score,
                   disagreement=s.disagreement, uncertainty=s.uncertainty)
        for s in resp.suggestions
    ]


def parse_report(resp: lpb.LabelerReportResponse) -> list[LabelerStats]:
    def opt(s, f):
        return getattr(s, f) if s.HasField(f) else None

    return [
        LabelerStats(labeler=s.labeler, kind=s.kind, volume=s.volume,
                     agreement_with_model=opt(s, "agreement_with_model"),
                     agreement_with_others=opt(s, "agreement_with_others"), shared_items=s.shared_items,
                     self_consistency=opt(s, "self_consistency"), repeated_items=s.repeated_items,
                     flagged=s.flagged, reason=s.reason)
        for s in resp.labelers
    ]


def build_export(kind: str | None, since: float | None, tag: str | None, labeler: str | None) -> lpb.ExportPreferencesRequest:
    req = lpb.ExportPreferencesRequest(kind=kind or "", tag=tag or "", labeler=labeler or "")
    if since is not None:
        req.since_unix = float(since)
    return req


def parse_rows(chunk: lpb.ExportPreferencesResponse) -> list[dict[str, Any]]:
    return [json.loads(r) for r in chunk.rows]
