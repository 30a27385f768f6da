"""Samples -> token ids: chat template, truncation policy, limits.

Truncation policy (documented in the README): a sample is a prompt followed by
the response being scored. When it is longer than `max_tokens`, the prompt is
cut from the left (its oldest turns go first) and the response is kept whole,
because the reward is read at the response's last token. Leading special tokens
(BOS/CLS) are kept. If the response alone does not fit, the sample is rejected
with a message that says how many tokens it needs. Pre-tokenised samples have
no known prompt boundary: they are cut from the left.

Empty content is scored, not rejected: a policy can and does answer with
nothing, and a reward model must be able to say how bad that is (rejecting it
would fail a whole PPO batch, or let a policy that stops at once go
unpenalised). An empty response, system or user message is rendered by the
chat template like any other. Only a sample with nothing to score at all (no
messages, no token ids) is invalid.

Groups (GRPO: one prompt, N completions) are encoded with the prompt's part
tokenised once (`PromptEncoder.group`): each completion's text is rendered by
the chat template as before, and only what follows the prompt's last special
token is tokenised per completion. That is exact, not an approximation: a fast
tokenizer splits its input at added (special) tokens first and tokenises the
pieces between them independently, so the ids before that token cannot depend
on the completion. Each group checks that nothing could make the join differ
(an added token straddling the join, a template that rewrites the prompt), a
probe at construction checks the tokenizer itself (a pre-tokenizer that treats
the first piece of an input specially), and a completion that needs truncating
goes through the ordinary path. Every id equals what `conversation` gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rmserve.service.engine.errors import InvalidInput

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool


def _fallback_render(messages: Sequence[dict[str, str]]) -> tuple[str, int]:
    """Plain 'role: content' lines for tokenizers without a chat template."""
    prefix = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
    last = messages[-1]
    return prefix + f"{last['role']}: {last['content']}", len(prefix)


def _boundary(full: str, prefix: str) -> int:
    """Where the response part of `full` starts: after the rendered prompt. Templates normally
    render the prompt as a prefix of the whole; where one does not (it rewrites earlier
    turns), the common prefix is the boundary."""
    if full.startswith(prefix):
        return len(prefix)
    n = 0
    while n < min(len(full), len(prefix)) and full[n] == prefix[n]:
        n += 1
    return n


def _lead(offsets: Sequence[tuple[int, int]]) -> int:
    """Leading special tokens (BOS/CLS): empty spans at the start."""
    lead = 0
    while lead < len(offsets) and tuple(offsets[lead]) == (0, 0):
        lead += 1
    return lead


def _prompt_end(offsets: Sequence[tuple[int, int]], boundary: int) -> int:
    """Index of the first response token: past the leading specials and the tokens that end
    at or before the prompt's character `boundary`."""
    end = _lead(offsets)
    while end < len(offsets) and offsets[end][1] <= boundary and tuple(offsets[end]) != (0, 0):
        end += 1
    return end


class PromptEncoder:
    """Turns validated samples into token ids for one tokenizer and token limit."""

    def __init__(self, tokenizer, max_tokens: int, *, use_chat_template: bool = True):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("rmserve needs a fast (Rust) tokenizer: it uses offsets to find the prompt boundary")
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.vocab_size = len(tokenizer)
        self.templated = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self._tail = self._template_tail()
        self._markers = self._template_markers()
        self._added = self._added_tokens()
        self.joins = self._joins_exactly()  # whether groups tokenise their prompt once (see group())

    # -- public ---------------------------------------------------------------

    def conversation(self, messages: Sequence[dict[str, str]], where: str = "sample") -> Encoded:
        self._check_messages(messages, where)
        text, boundary = self._render(messages)
        return self._encode(text, boundary, where)

    def response_tokens(self, messages: Sequence[dict[str, str]], where: str = "sample") -> int:
        """How many of `conversation(messages)`'s ids belong to the response (after the rendered
        prompt). The response is never cut, so the count holds for truncated samples too. Only
        evaluation reads it (pairs split by response length), so serving never pays for it."""
        self._check_messages(messages, where)
        text, boundary = self._render(messages)
        enc = self.tokenizer(
            text, add_special_tokens=not self.templated, return_offsets_mapping=True, return_attention_mask=False
        )
        offsets: list[tuple[int, int]] = enc["offset_mapping"]
        return len(offsets) - _prompt_end(offsets, boundary)

    def prompt_response(self, prompt: str, response: str, where: str = "sample") -> Encoded:
        messages = ([{"role": "user", "content": prompt}] if prompt.strip() else []) + [
            {"role": "assistant", "content": response}
        ]
        text, boundary = self._render(messages)
        return self._encode(text, boundary, where)

    def group(self, prompt: str | Sequence[dict[str, str]], responses: Sequence[str],
              where: Callable[[int], str] = lambda i: f"completion {i}") -> list[Encoded]:
        """Each response to one prompt (text, as `prompt_response`, or messages, as
        `conversation` with the response appended as the assistant's turn), with the
        prompt rendered and tokenised once: the ids equal those of the one-by-one calls."""
        if isinstance(prompt, str):
            head = [{"role": "user", "content": prompt}] if prompt.strip() else []
        else:
            head = [dict(m) for m in prompt]
            self._check_messages([*head, {"role": "assistant", "content": ""}], where(0))
        if not responses:
            return []
        prefix = self._render_prompt([dict(m) for m in head])
        shared = self._shared_head(prefix) if self.joins else None
        texts = [self._render_full([*map(dict, head), {"role": "assistant", "content": r}]) for r in responses]
        if shared is None:
            return [self._encode(t, _boundary(t, prefix), where(i)) for i, t in enumerate(texts)]
        head_text, head_ids, straddle = shared
        cut = len(head_text)
        clean = [i for i, t in enumerate(texts)
                 if t.startswith(head_text) and not any(t.startswith(s, cut - k) for s, k in straddle)]
        # the rest of every clean text in one tokenizer call (one Rust encode_batch)
        rests = self.tokenizer([texts[i][cut:] for i in clean], add_special_tokens=False,
                               return_attention_mask=False)["input_ids"] if clean else []
        joined = {i: head_ids + rest for i, rest in zip(clean, rests, strict=True)}
        out = []
        for i, t in enumerate(texts):
            ids = joined.get(i)
            if ids is not None and len(ids) <= self.max_tokens:
                out.append(Encoded(ids, False))
            else:  # truncation, or no clean cut: the ordinary path
                out.append(self._encode(t, _boundary(t, prefix), where(i)))
        return out

    def rendered(self, text: str, where: str = "sample") -> Encoded:
        """Text whose chat template is already applied (OpenRLHF sends the policy's decoded
        prompt + response, special tokens kept): tokenised as it is, no second template and
        no added special tokens; cut from the left like token ids (the response's end is
        what is scored)."""
        if not text:
            raise InvalidInput(f"{where}: the text is empty: there is nothing to score")
        text += self._turn_tail(text)
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return self.token_ids(ids, where)

    def rendered_reply(self, prompt: str, response: str, where: str = "sample") -> Encoded:
        """A rendered prompt (generation prompt included) and the reply's text as a sampler
        returns it, without the end-of-turn token: the turn is closed as the template closes
        it, so the reward is read where it is for the same conversation over gRPC."""
        text = prompt + response
        if self._tail is not None and not text.endswith(self._tail[0]):
            text += self._tail[0]
        return self.rendered(text, where)

    def is_rendered(self, text: str) -> bool:
        """Whether `text` already carries the chat template: it holds one of the template's
        special tokens (SmolLM2/Qwen "<|im_start|>", Llama "<|start_header_id|>"). slime sends
        the prompt rendered when it runs with --apply-chat-template, plain otherwise."""
        return any(t and t in text for t in self._markers)

    def _turn_tail(self, text: str) -> str:
        """What the chat template writes after a reply's end-of-turn token (SmolLM2/Qwen: "\\n"
        after <|im_end|>) when `text` stops right after that token, as a generating policy
        does: then the reward is read at the same token as for the conversation over gRPC."""
        if self._tail is None:
            return ""
        end_of_turn, tail = self._tail
        return tail if text.endswith(end_of_turn) else ""

    def _template_tail(self) -> tuple[str, str] | None:
        """(end-of-turn marker, what follows it) in this template's assistant turn, if anything does."""
        if not self.templated:
            return None
        sentinel = "\u2063rmserve\u2063"
        full = self.tokenizer.apply_chat_template([{"role": "assistant", "content": sentinel}], tokenize=False)
        after = full[full.rfind(sentinel) + len(sentinel):]  # e.g. "<|im_end|>\n"
        stripped = after.rstrip()
        return (stripped, after[len(stripped):]) if stripped and after != stripped else None

    def _template_markers(self) -> tuple[str, ...]:
        """The special tokens this chat template writes around messages (a rendered prompt holds them)."""
        if not self.templated:
            return ()
        scaffold = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False)
        special = set(self.tokenizer.all_special_tokens) | {
            t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        return tuple(sorted(t for t in special if t and t in scaffold))

    def token_ids(self, ids: Sequence[int], where: str = "sample") -> Encoded:
        if len(ids) == 0:
            raise InvalidInput(f"{where}: token_ids is empty")
        bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidInput(f"{where}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        ids = list(ids)
        if len(ids) > self.max_tokens:
            return Encoded(ids[-self.max_tokens :], True)
        return Encoded(ids, False)

    # -- internals ------------------------------------------------------------

    def _check_messages(self, messages: Sequence[dict[str, str]], where: str) -> None:
        if not messages:
            raise InvalidInput(f"{where}: conversation has no messages")
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise InvalidInput(
                    f"{where}: message {i} has unknown role {m['role']!r}; use one of {sorted(ROLES)}"
                )
        if messages[-1]["role"] != "assistant":
            raise InvalidInput(
                f"{where}: the last message is the response being scored and must have role 'assistant', "
                f"got {messages[-1]['role']!r}"
            )

    def _render(self, messages: Sequence[dict[str, str]]) -> tuple[str, int]:
        """Full text and the character index where the response part starts."""
        if not self.templated:
            return _fallback_render(messages)
        msgs = [dict(m) for m in messages]
        full = self._render_full(msgs)
        return full, _boundary(full, self._render_prompt(msgs[:-1]))

    def _render_full(self, msgs: list[dict[str, str]]) -> str:
        if not self.templated:
            return _fallback_render(msgs)[0]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False)

    def _render_prompt(self, head: list[dict[str, str]]) -> str:
        """The prompt's part of a rendered conversation whose last turn is the response."""
        if not self.templated:  # the fallback writes "role: content\n" per earlier turn
            return "".join(f"{m['role']}: {m['content']}\n" for m in head)
        if not head:
            return ""
        return self.tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)

    # -- groups: the prompt tokenised once --------------------------------------

    def _added_tokens(self) -> dict[str, object]:
        """Every added token's text -> its AddedToken (special or not: both split the input)."""
        if not self.templated:
            return {}
        return {t.content: t for t in self.tokenizer.added_tokens_decoder.values() if t.content}

    def _shared_head(self, prefix: str) -> tuple[str, list[int], list[tuple[str, int]]] | None:
        """(H, ids of H, added tokens that could straddle the end of H) for a rendered prompt:
        H is the prompt's text up to and including its last special token, where the
        tokenizer's input is cut whatever follows. None where the prompt has no usable one."""
        end, marker = -1, None
        for m in self._markers:
            tok = self._added.get(m)
            if tok is None or getattr(tok, "rstrip", False) or getattr(tok, "single_word", False):
                continue  # rstrip/single_word tokens match depending on the text after them
            at = prefix.rfind(m)
            if at >= 0 and at + len(m) > end:
                end, marker = at + len(m), m
        if marker is None:
            return None
        head = prefix[:end]
        ids = self.tokenizer(head, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if not ids or ids[-1] != self.tokenizer.convert_tokens_to_ids(marker):
            return None  # the marker was not matched where it stands: no clean cut there
        # an added token t whose first k characters end H could match across the cut
        straddle = [(t, k) for t in self._added for k in range(1, len(t)) if head.endswith(t[:k])]
        return head, ids, straddle

    def _joins_exactly(self) -> bool:
        """Whether this tokenizer gives the ids of a whole text as the ids of its head (cut
        right after a special token) joined to those of the rest. Fast tokenizers split at
        added tokens and tokenise the pieces apart, but a pre-tokenizer may still treat the
        first piece of an input differently (Metaspace's prepend_scheme="first"); probed."""
        if not self.templated:  # no special tokens in the rendered text to cut at
            return False
        try:
            return self._probe_joins()
        except Exception:  # a template that refuses the probe's conversations: never join
            return False

    def _probe_joins(self) -> bool:
        prompts = ["hi", "Hello there!\n\n", "  two  spaces ", "\u00fcn\u00efc\u00f6d\u00e9 \u6f22\u5b57 \U0001f642"]
        replies = ["x", " y", "\n\nz", "", "\u00fcn\u00efc\u00f6d\u00e9 \u6f22\u5b57 \U0001f642 ", "a.b,c;d"]
        for p in prompts:
            head = [{"role": "user", "content": p}]
            shared = self._shared_head(self._render_prompt(head))
            if shared is None:
                continue
            for r in replies:
                text = self._render_full([*head, {"role": "assistant", "content": r}])
                whole = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
                cut = len(shared[0])
                if not text.startswith(shared[0]) or whole != shared[1] + self.tokenizer(
                        text[cut:], add_special_tokens=False, return_attention_mask=False)["input_ids"]:
                    return False
        return True

    def _encode(self, text: str, boundary: int, where: str) -> Encoded:
        enc = self.tokenizer(
            text, add_special_tokens=not self.templated, return_offsets_mapping=True, return_attention_mask=False
        )
        ids: list[int] = enc["input_ids"]
        offsets: list[tuple[int, int]] = enc["offset_mapping"]
        if not ids:  # only without a chat template, which always adds its markers
            raise InvalidInput(f"{where}: renders to no tokens: there is nothing to score")
        if len(ids) <= self.max_tokens:
            return Encoded(ids, False)
        lead = _lead(offsets)  # leading special tokens (BOS/CLS) have empty spans and are kept
        prompt_end = _prompt_end(offsets, boundary)
        n_cut = len(ids) - self.max_tokens
        if n_cut > prompt_end - lead:
            need = len(ids) - (prompt_end - lead)
            raise InvalidInput(
                f"{where}: the response alone needs {need} tokens but this model scores at most "
                f"{self.max_tokens} per sample; shorten the response"
            )
        return Encoded(ids[:lead] + ids[lead + n_cut :], True)
