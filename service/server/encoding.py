"""The one request form every door converts to, and its encoding into token ids.

A door (gRPC, HTTP, LabelService) turns what its caller sent into these plain
objects; the scoring core (core.py) encodes them here, on the tokenizer threads:
validation, chat template, truncation (engine/tokenization.py). So a sample
means the same thing whichever door it came through, and a new door writes
only its converter.

Message content has one meaning on every door (`message_text`): a string, or
OpenAI-style parts whose text parts are joined with "" (no separator, as the
parts were cut); any other part (an image, audio) is refused with InvalidInput
naming the message and the part, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rmserve.service.engine.tokenization import Encoded, PromptEncoder
from rmserve.service.server.errors import InvalidInput

Message = Mapping[str, str]          # {"role": ..., "content": ...}; content already a string
Prompt = str | Sequence[Message]  # prompt text, or the conversation before the reply


@dataclass(frozen=True, slots=True)
class Chat:
    """A conversation whose last message is the assistant's reply being scored."""

    messages: Sequence[Message]


@dataclass(frozen=True, slots=True)
class Text:
    """A prompt and the response to it, as text; the server applies the chat template.
    `maybe_rendered`: the prompt may already carry the template (slime with
    --apply-chat-template), then it is not applied twice (`PromptEncoder.is_rendered`)."""

    prompt: str
    response: str
    maybe_rendered: bool = False


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token ids as the policy produced them: no template, cut from the left to fit."""

    ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class Rendered:
    """Prompt + response text with the chat template already applied (OpenRLHF's query)."""

    text: str


Input = Chat | Text | Tokens | Rendered


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample to score; `input` None is a sample that set none (refused, named)."""

    input: Input | None
    id: str = ""


@dataclass(frozen=True, slots=True)
class Group:
    """One prompt and its completions (GRPO), scored in one batch with the prompt encoded
    once; `prompt` None is a group that set none (refused, named)."""

    prompt: Prompt | None
    completions: Sequence[str]
    id: str = ""


def message_text(content: Any, where: str) -> str:
    """A message's content as the text scored: a string (None: empty), or OpenAI-style
    parts whose text parts are joined with "". Any other part is refused by its index and type."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        for k, part in enumerate(content):
            if part.get("type") != "text":
                raise InvalidInput(f"{where}: content part {k} has type {str(part.get('type'))!r}, which cannot "
                                   "be scored; only text parts can (their texts are joined)")
            if not isinstance(part.get("text"), str):
                raise InvalidInput(f'{where}: content part {k} (a text part) needs a string "text"')
        return "".join(p["text"] for p in content)
    raise InvalidInput(f'{where}: "content" must be a string or a list of {{"type": "text", "text": ...}} parts')


def messages(raw: Sequence[Mapping[str, Any]], where: Callable[[int], str]) -> list[dict[str, str]]:
    """Messages as a door received them ({"role", "content"}), content normalised by
    `message_text`; `where(i)` names message i in errors."""
    return [{"role": str(m["role"]), "content": message_text(m["content"], where(i))} for i, m in enumerate(raw)]


def sample_name(index: int, sample_id: str = "") -> str:
    """How errors name a sample: its index, and its id when it has one."""
    return f"sample {index}" + (f" (id {sample_id!r})" if sample_id else "")


def encode_input(encoder: PromptEncoder, item: Input | None, where: str) -> Encoded:
    if isinstance(item, Chat):
        return encoder.conversation(item.messages, where)
    if isinstance(item, Text):
        if item.maybe_rendered and encoder.is_rendered(item.prompt):
            return encoder.rendered_reply(item.prompt, item.response, where)
        return encoder.prompt_response(item.prompt, item.response, where)
    if isinstance(item, Tokens):
        return encoder.token_ids(item.ids, where)
    if isinstance(item, Rendered):
        return encoder.rendered(item.text, where)
    raise InvalidInput(f"{where}: has no input; set one of conversation, text or tokens")


def encode_completion(encoder: PromptEncoder, prompt: Prompt, completion: str, where: str) -> Encoded:
    """One completion of a group encoded on its own (the prompt rendered and tokenised with
    it): what `PromptEncoder.group` must equal, id for id."""
    if isinstance(prompt, str):
        return encoder.prompt_response(prompt, completion, where)
    return encoder.conversation([*prompt, {"role": "assistant", "content": completion}], where)


def encode_samples(encoder: PromptEncoder, samples: Sequence[Sample], max_samples: int,
                   name: Callable[[int], str]) -> list[Encoded]:
    """Every sample's ids; `name(i)` names sample i in errors."""
    if len(samples) == 0:
        raise InvalidInput("the request has no samples")
    if len(samples) > max_samples:
        raise InvalidInput(
            f"the request has {len(samples)} samples; this server accepts at most {max_samples} per request "
            "(the Python SDK splits large inputs for you)"
        )
    return [encode_input(encoder, s.input, name(i)) for i, s in enumerate(samples)]


def completion_name(group: int, completion: int) -> str:
    return f"group {group} completion {completion}"


def encode_group(encoder: PromptEncoder, group: Group, gi: int) -> list[Encoded]:
    if not group.completions:
        raise InvalidInput(f"group {gi}: has no completions")
    if group.prompt is None:
        raise InvalidInput(f"group {gi}: has no prompt; set prompt_text or prompt_messages")
    # the prompt rendered and tokenised once for the group; ids equal encode_completion's
    return encoder.group(group.prompt, list(group.completions), lambda ci: completion_name(gi, ci))


def encode_groups(encoder: PromptEncoder, groups: Sequence[Group], max_samples: int, *,
                  skip_unreadable: bool = False) -> list[list[Encoded] | None]:
    """Every group's ids. With `skip_unreadable`, a group the model cannot encode (a role its
    template does not know, a completion over its token limit) is None instead of an error."""
    if len(groups) == 0:
        raise InvalidInput("the request has no groups")
    total = sum(len(g.completions) for g in groups)
    if total > max_samples:
        raise InvalidInput(
            f"the request has {total} completions; this server accepts at most {max_samples} per request"
        )
    if not skip_unreadable:
        return [encode_group(encoder, g, gi) for gi, g in enumerate(groups)]
    out: list[list[Encoded] | None] = []
    for gi, g in enumerate(groups):
        try:
            out.append(encode_group(encoder, g, gi))
        except InvalidInput:
            out.append(None)
    return out
