"""Protobuf messages <-> engine inputs and outputs.

Runs on the tokenizer threads: validation and encoding of every sample of a
request, then building the result messages from engine rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rmserve.service.engine.tokenization import Encoded, PromptEncoder
from rmserve.service.server.errors import InvalidInput
from rmserve.v1 import reward_pb2 as pb


@dataclass(frozen=True)
class Row:
    """One sample's engine output."""

    rewards: np.ndarray          # [K]
    mean: float
    var: float
    min: float
    epistemic: float | None
    ood_score: float | None = None


def _messages(conv: pb.Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conv.messages]


def encode_sample(encoder: PromptEncoder, sample: pb.Sample, index: int) -> Encoded:
    where = f"sample {index}" + (f" (id {sample.id!r})" if sample.id else "")
    kind = sample.WhichOneof("input")
    if kind == "conversation":
        return encoder.conversation(_messages(sample.conversation), where)
    if kind == "text":
        return encoder.prompt_response(sample.text.prompt, sample.text.response, where)
    if kind == "tokens":
        return encoder.token_ids(sample.tokens.ids, where)
    raise InvalidInput(f"{where}: has no input; set one of conversation, text or tokens")


def encode_samples(encoder: PromptEncoder, samples, max_samples: int) -> list[Encoded]:
    if len(samples) == 0:
        raise InvalidInput("the request has no samples")
    if len(samples) > max_samples:
        raise InvalidInput(
            f"the request has {len(samples)} samples; this server accepts at most {max_samples} per request "
            "(the Python SDK splits large inputs for you)"
        )
    return [encode_sample(encoder, s, i) for i, s in enumerate(samples)]


def encode_completion(encoder: PromptEncoder, prompt_text: str | None, prompt_messages, completion: str, where: str) -> Encoded:
    """A prompt (text or messages) followed by one completion as the assistant turn."""
    if prompt_messages is not None:
        msgs = [*_messages(prompt_messages), {"role": "assistant", "content": completion}]
        return encoder.conversation(msgs, where)
    return encoder.prompt_response(prompt_text or "", completion, where)


def encode_groups(encoder: PromptEncoder, groups, max_samples: int) -> list[list[Encoded]]:
    if len(groups) == 0:
        raise InvalidInput("the request has no groups")
    total = sum(len(g.completions) for g in groups)
    if total > max_samples:
        raise InvalidInput(
            f"the request has {total} completions; this server accepts at most {max_samples} per request"
        )
    out = []
    for gi, g in enumerate(groups):
        if not g.completions:
            raise InvalidInput(f"group {gi}: has no completions")
        which = g.WhichOneof("prompt")
        if which is None:
            raise InvalidInput(f"group {gi}: has no prompt; set prompt_text or prompt_messages")
        # the prompt rendered and tokenised once for the group; ids equal encode_completion's
        prompt = _messages(g.prompt_messages) if which == "prompt_messages" else g.prompt_text
        out.append(encoder.group(prompt, list(g.completions), lambda ci, gi=gi: f"group {gi} completion {ci}"))
    return out


def result_pb(row: Row, enc: Encoded, *, lam: float, members: bool, sample_id: str = "",
              ood_threshold: float | None = None) -> pb.ScoreResult:
    r = pb.ScoreResult(
        id=sample_id,
        reward=row.mean,
        std=float(np.sqrt(max(row.var, 0.0))),
        min=row.min,
        conservative=row.mean - lam * row.var,
        num_tokens=len(enc.ids),
        truncated=enc.truncated,
    )
    if row.epistemic is not None:
        r.epistemic = row.epistemic
    if row.ood_score is not None:
        r.ood_score = row.ood_score
        if ood_threshold is not None:
            r.ood = row.ood_score > ood_threshold
    if members:
        r.members.extend(row.rewards.tolist())
    return r
