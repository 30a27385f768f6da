"""LabelService: labelers feed preferences back (docs/labelers.md).

SubmitPreferences validates a whole batch first (a bad item is named by its
index and rejects the batch: nothing half-stored), then commits it to the
preference store on a worker thread and acknowledges only after the commit is
on disk. SuggestComparisons scores candidate responses with the live ensemble
(through the same scheduler as scoring) and ranks their pairs by the
acquisition rule of `service/data/acquisition.py`. LabelerReport compares each
labeler with the model and with the others (`service/data/agreement.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

from rmserve.service.data.preferences import Filters, Preference, PreferenceStore, validate
from rmserve.service.server.core import ScoringCore
from rmserve.service.server.encoding import Group, Prompt
from rmserve.service.server.errors import InvalidInput
from rmserve.service.server.rpc import call_with_status, deadline_of, unary
from rmserve.service.server.state import ServingState
from rmserve.service.server.wire import prompt_of, set_prompt
from rmserve.v1 import label_pb2 as lpb
from rmserve.v1 import label_pb2_grpc as lpb_grpc

EXPORT_CHUNK = 500        # rows per ExportPreferences message
REPORT_MAX_SCORED = 4096  # newest comparisons the report scores with the model (bounds its cost)


def preference_from_pb(item: lpb.Preference, index: int) -> Preference:
    where = f"item {index}" + (f" (id {item.id!r})" if item.id else "")
    prompt = prompt_of(item)
    if prompt is None:
        raise InvalidInput(f"{where}: has no prompt; set prompt_text or prompt_messages")
    label = item.WhichOneof("label")
    p = Preference(
        id=item.id, prompt=prompt, responses=list(item.responses),
        choice=item.choice if label == "choice" else None,
        ranking=list(item.ranking.ranks) if label == "ranking" else None,
        tie=label == "tie" and item.tie,
        margin=item.margin if item.HasField("margin") else None,
        labeler=item.labeler, labeler_kind=item.labeler_kind or "human", judge=item.judge,
        guideline=item.guideline, rationale=item.rationale, tag=item.tag,
        timestamp=item.timestamp_unix if item.HasField("timestamp_unix") else None,
    )
    if label == "tie" and not item.tie:
        raise InvalidInput(f"{where}: tie is false; to label a tie send tie=true, else a choice or a ranking")
    try:
        validate(p, where)
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    return p


def _item_key(prompt, a: str, b: str) -> tuple[str, bool]:
    """A key for (prompt, unordered pair {a, b}) and whether (a, b) is its canonical order."""
    first, second = sorted((a, b))
    key = hashlib.sha256(json.dumps([prompt, first, second], ensure_ascii=False).encode()).hexdigest()[:24]
    return key, a == first


def comparisons(p: Preference) -> list[tuple[int, int, float]]:
    """(i, j, outcome) for each labelled pair i < j: 1.0 = i preferred, 0.0 = j, 0.5 = tie."""
    n = len(p.responses)
    if p.tie:
        return [(i, j, 0.5) for i in range(n) for j in range(i + 1, n)]
    if p.choice is not None:
        return [(min(p.choice, j), max(p.choice, j), 1.0 if p.choice < j else 0.0) for j in range(n) if j != p.choice]
    assert p.ranking is not None
    r = p.ranking
    return [(i, j, 1.0 if r[i] < r[j] else 0.0 if r[i] > r[j] else 0.5) for i in range(n) for j in range(i + 1, n)]


class LabelServicer(lpb_grpc.LabelServiceServicer):
    def __init__(self, state: ServingState, core: ScoringCore, store: PreferenceStore):
        self.state = state  # rpc.unary reads its metrics and work
        self.core = core
        self.store = store

    async def _scored(
        self, prompts_and_responses: Sequence[tuple[Prompt, Sequence[str]]], context, *, skip_unreadable: bool = False
    ) -> list[np.ndarray | None]:
        """Per-head rewards [n_responses, K] for each (prompt, responses), through the scoring core.
        With `skip_unreadable`, an item the model cannot encode (a role its template does not
        know, a response over its token limit) gets None instead of failing the whole call."""
        groups = [Group(prompt, responses) for prompt, responses in prompts_and_responses]
        judged, _ = await self.core.judge(groups, deadline=deadline_of(context), skip_unreadable=skip_unreadable)
        return [None if results is None else np.array([r.members for r in results], dtype=np.float64)
                for results in judged]

    @unary("SubmitPreferences")
    async def SubmitPreferences(self, request: lpb.SubmitPreferencesRequest, context) -> lpb.SubmitPreferencesResponse:
        if not request.items:
            raise InvalidInput("the request has no items")
        cap = self.state.config.max_samples_per_request
        if len(request.items) > cap:
            raise InvalidInput(f"the request has {len(request.items)} items; this server accepts at most {cap} per "
                               "request (the SDK splits for you)")
        items = [preference_from_pb(it, i) for i, it in enumerate(request.items)]
        result = await asyncio.get_running_loop().run_in_executor(None, self.store.submit, items)
        return lpb.SubmitPreferencesResponse(accepted=result.accepted, duplicates=result.duplicates, total=result.total)

    @unary("SuggestComparisons")
    async def SuggestComparisons(self, request: lpb.SuggestComparisonsRequest, context) -> lpb.SuggestComparisonsResponse:
        from rmserve.service.data import acquisition

        if request.k <= 0:
            raise InvalidInput(f"k must be >= 1, got {request.k}")
        if not request.candidates:
            raise InvalidInput("the request has no candidates")
        prompts = [prompt_of(c) for c in request.candidates]
        for i, (c, prompt) in enumerate(zip(request.candidates, prompts, strict=True)):
            if prompt is None:
                raise InvalidInput(f"candidate {i}: has no prompt; set prompt_text or prompt_messages")
            if len(c.responses) < 2:
                raise InvalidInput(f"candidate {i}: needs at least 2 responses to compare, got {len(c.responses)}")
        slot_version = self.state.live_slot().version
        rewards = await self._scored([(p, c.responses) for p, c in zip(prompts, request.candidates, strict=True)], context)
        index: list[tuple[int, int, int]] = []
        ra, rb = [], []
        for ci, (c, r) in enumerate(zip(request.candidates, rewards, strict=True)):
            for i, j in acquisition.candidate_pairs(len(c.responses)):
                index.append((ci, i, j))
                ra.append(r[i])
                rb.append(r[j])
        scores = acquisition.score_pairs(np.stack(ra), np.stack(rb))
        chosen = acquisition.select(scores.score, min(request.k, len(index)), groups=[ci for ci, _, _ in index])
        out = lpb.SuggestComparisonsResponse(model_version=slot_version)
        for n in chosen:
            ci, i, j = index[n]
            c = request.candidates[ci]
            s = out.suggestions.add(
                candidate_id=c.id, index_a=i, index_b=j, response_a=c.responses[i], response_b=c.responses[j],
                prob=float(scores.prob[n]), score=float(scores.score[n]),
                disagreement=float(scores.disagreement[n]), uncertainty=float(scores.uncertainty[n]),
            )
            set_prompt(s, prompts[ci])
        return out

    @unary("LabelerReport")
    async def LabelerReport(self, request: lpb.LabelerReportRequest, context) -> lpb.LabelerReportResponse:
        from rmserve.service.data.agreement import LabelRecord, labeler_report

        prefs = await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(self.store.query(Filters(tag=request.tag or None)))
        )
        # the model's view of the newest comparisons (bounded cost)
        scored = prefs[-REPORT_MAX_SCORED:]
        probs: dict[str, float] = {}
        version = ""
        if scored and self.state.slot is not None:
            version = self.state.slot.version
            # a stored label the served model cannot read (another model's template or token
            # limit) gets no model opinion; it must not take the whole report down
            rewards = await self._scored([(p.prompt, p.responses) for p in scored], context, skip_unreadable=True)
            for p, r in zip(scored, rewards, strict=True):
                if r is None:
                    continue
                mean = r.mean(axis=1)
                for i, j, _ in comparisons(p):
                    key, canonical = _item_key(p.prompt, p.responses[i], p.responses[j])
                    prob_i = 1.0 / (1.0 + math.exp(-(mean[i] - mean[j])))
                    probs[key] = prob_i if canonical else 1.0 - prob_i
        records = []
        for p in prefs:
            for i, j, outcome in comparisons(p):
                key, canonical = _item_key(p.prompt, p.responses[i], p.responses[j])
                records.append(LabelRecord(
                    labeler=p.labeler, kind=p.labeler_kind, item=key,
                    outcome=outcome if canonical else 1.0 - outcome, model_prob=probs.get(key),
                ))
        out = lpb.LabelerReportResponse(model_version=version)
        for s in labeler_report(records):
            stats = out.labelers.add(labeler=s.labeler, kind=s.kind, volume=s.volume, shared_items=s.shared_items,
                                     repeated_items=s.repeated_items, flagged=s.flagged, reason=s.reason)
            for f in ("agreement_with_model", "agreement_with_others", "self_consistency"):
                if getattr(s, f) is not None:
                    setattr(stats, f, getattr(s, f))
        return out

    async def ExportPreferences(self, request: lpb.ExportPreferencesRequest, context):
        async def rows() -> list[str]:
            if request.kind not in ("", "human", "ai"):
                raise InvalidInput(f"kind must be human or ai (or empty for both), got {request.kind!r}")
            if request.HasField("since_unix") and not math.isfinite(request.since_unix):
                raise InvalidInput(f"since_unix must be a finite number of seconds, got {request.since_unix}")
            filters = Filters(kind=request.kind or None, tag=request.tag or None, labeler=request.labeler or None,
                              since=request.since_unix if request.HasField("since_unix") else None)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: [json.dumps(p.training_row(), ensure_ascii=False) for p in self.store.query(filters)]
            )

        out = await call_with_status(self.state.metrics, "ExportPreferences", context, rows, request)
        for start in range(0, len(out), EXPORT_CHUNK):
            yield lpb.ExportPreferencesResponse(rows=out[start:start + EXPORT_CHUNK])
