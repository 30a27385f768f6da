"""Protobuf <-> the core's plain objects, for the gRPC services: the one place that reads
or writes rmserve.v1 scoring messages' fields (reward.py and labels.py convert here).

Each result field is one keyword in `result_pb`; each request form one branch in
`sample_of`. Message content on gRPC is a string, normalised by the same
`encoding.message_text` as the HTTP door's.
"""

from __future__ import annotations

from rmserve.service.server.core import Comparison, ModelInfo, ScoreOptions, ScoreResult
from rmserve.service.server.encoding import Chat, Group, Prompt, Sample, Text, Tokens, messages
from rmserve.service.server.monitor import RunState, StepSummary
from rmserve.v1 import reward_pb2 as pb


def _messages(conv: pb.Conversation, where: str) -> list[dict[str, str]]:
    return messages([{"role": m.role, "content": m.content} for m in conv.messages],
                    lambda i: f"{where}: message {i}")


def options_of(options: pb.ScoreOptions) -> ScoreOptions:
    return ScoreOptions(
        run_id=options.run_id, step=options.step if options.HasField("step") else None,
        return_members=options.return_members,
        uncertainty_penalty=options.uncertainty_penalty if options.HasField("uncertainty_penalty") else None,
    )


def sample_of(sample: pb.Sample) -> Sample:
    kind = sample.WhichOneof("input")
    if kind == "text":
        return Sample(Text(sample.text.prompt, sample.text.response), sample.id)
    if kind == "conversation":
        return Sample(Chat(_messages(sample.conversation, "sample")), sample.id)
    if kind == "tokens":
        return Sample(Tokens(sample.tokens.ids), sample.id)
    return Sample(None, sample.id)


def samples_of(samples) -> list[Sample]:
    return [sample_of(s) for s in samples]


def prompt_of(msg) -> Prompt | None:
    """The `prompt` oneof (prompt_text | prompt_messages) of a Group, Candidate or Preference."""
    which = msg.WhichOneof("prompt")
    if which == "prompt_messages":
        return _messages(msg.prompt_messages, "prompt")
    return msg.prompt_text if which == "prompt_text" else None


def set_prompt(msg, prompt: Prompt) -> None:
    if isinstance(prompt, str):
        msg.prompt_text = prompt
    else:
        msg.prompt_messages.CopyFrom(pb.Conversation(messages=[pb.Message(role=m["role"], content=m["content"])
                                                               for m in prompt]))


def groups_of(groups) -> list[Group]:
    return [Group(prompt_of(g), g.completions, g.id) for g in groups]


def compare_prompt(request: pb.CompareRequest) -> Prompt:
    """A Compare's prompt: its messages, else its text (empty when unset)."""
    prompt = prompt_of(request)
    return "" if prompt is None else prompt


def result_pb(r: ScoreResult) -> pb.ScoreResult:
    return pb.ScoreResult(
        id=r.id, reward=r.reward, std=r.std, min=r.min, conservative=r.conservative, num_tokens=r.num_tokens,
        truncated=r.truncated, epistemic=r.epistemic, ood_score=r.ood_score, ood=r.ood, members=r.members,
    )


def comparison_pb(c: Comparison) -> pb.CompareResponse:
    return pb.CompareResponse(prob=c.prob, member_probs=c.member_probs, a=result_pb(c.a), b=result_pb(c.b),
                              model_version=c.model_version)


def model_info_pb(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=m.name, version=m.version, kind=m.kind, num_members=m.num_members, num_heads=m.num_heads,
        backbone=m.backbone, max_tokens=m.max_tokens, dtype=m.dtype,
        normalization=pb.Normalization(shift=m.shift, scale=m.scale),
        default_uncertainty_penalty=m.default_uncertainty_penalty, has_epistemic=m.has_epistemic,
        max_samples_per_request=m.max_samples_per_request, backbone_layers=m.backbone_layers,
        ood_threshold=m.ood_threshold, ood_quantile=m.ood_quantile or 0.0, ood_calibrated_on=m.ood_calibrated_on or "",
    )


def run_pb(run: RunState, series: list[StepSummary], steps: int | None = None) -> pb.RunStatus:
    out = pb.RunStatus(run_id=run.run_id, steps=len(series) if steps is None else steps, alarm=run.alarm,
                       reason=run.reason, last_seen_unix=run.last_seen, alarm_step=run.alarm_step)
    for s in series:
        out.series.add(**{name: value for name, value in vars(s).items() if value is not None})
    return out
