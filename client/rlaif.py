"""An RLAIF labeling loop: ask the server what is worth labelling, ask a judge, submit.

    from rmserve.client import RewardClient
    from rmserve.client.rlaif import label_round

    with RewardClient("127.0.0.1:50051", api_key="k-label") as client:
        result = label_round(client, candidates, judge, labeler="smollm2-judge", judge_name="SmolLM2-135M-Instruct",
                             guideline="harmless-v1", k=32)

The judge is any callable `(prompt, response_a, response_b) -> P(a is better)`;
`examples/rlaif_labeler.py` runs one with SmolLM2 through transformers. Ids are
derived from (labeler, judge, guideline, prompt, pair), so running a round again
after a crash or a timeout stores nothing twice: the server counts the repeats
as duplicates. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rmserve.client._core import Prompt
from rmserve.client.labels import SubmitResult, Suggestion
from rmserve.client.sync import RewardClient

__all__ = ["Judge", "label_id", "label_round"]

Judge = Callable[[Prompt, str, str], float]


def label_id(labeler: str, judge_name: str, guideline: str, prompt: Prompt, a: str, b: str) -> str:
    """The same comparison judged by the same judge under the same guideline gets the same id."""
    key = json.dumps([labeler, judge_name, guideline, prompt, a, b], ensure_ascii=False, sort_keys=True)
    return "rlaif-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _item(s: Suggestion, p_a: float, labeler: str, judge_name: str, guideline: str, tag: str) -> dict[str, Any]:
    if not 0.0 <= p_a <= 1.0:
        raise ValueError(f"the judge must return P(a is better) in [0, 1], got {p_a!r}")
    return {
        "id": label_id(labeler, judge_name, guideline, s.prompt, s.response_a, s.response_b),
        "prompt": s.prompt, "responses": [s.response_a, s.response_b], "choice": 0 if p_a >= 0.5 else 1,
        "labeler": labeler, "labeler_kind": "ai", "judge": judge_name, "guideline": guideline, "tag": tag,
        "rationale": f"judge P(a better) = {p_a:.3f}; model P(a better) = {s.prob:.3f}",
    }


def label_round(
    client: RewardClient,
    candidates: Sequence[Mapping[str, Any]],
    judge: Judge,
    *,
    labeler: str,
    judge_name: str,
    guideline: str = "",
    tag: str = "rlaif",
    k: int = 16,
    batch: int = 16,
    progress: Callable[[str], None] | None = None,
) -> SubmitResult:
    """One round: the k suggested comparisons, judged and submitted in batches of `batch`.

    Each batch is submitted as soon as it is judged, so a crash loses at most one
    batch of judge work; the SDK retries a submit on UNAVAILABLE/RESOURCE_EXHAUSTED,
    which is safe because the ids are fixed.
    """
    say = progress or (lambda msg: print(msg, file=sys.stderr))
    suggestions = client.suggest_comparisons(candidates, k)
    say(f"{len(suggestions)} comparisons suggested (best score {suggestions[0].score:.3f})" if suggestions
        else "nothing to label")
    accepted = duplicates = 0
    total = 0
    for start in range(0, len(suggestions), batch):
        chunk = suggestions[start:start + batch]
        items = [_item(s, float(judge(s.prompt, s.response_a, s.response_b)), labeler, judge_name, guideline, tag)
                 for s in chunk]
        r = client.submit_preferences(items)
        accepted, duplicates, total = accepted + r.accepted, duplicates + r.duplicates, r.total
        say(f"labelled {start + len(chunk)}/{len(suggestions)} (stored {accepted} new, {duplicates} already there)")
    return SubmitResult(accepted=accepted, duplicates=duplicates, total=total)
