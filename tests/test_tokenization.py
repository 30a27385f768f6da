"""Chat rendering, truncation policy and input validation of PromptEncoder."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.service.server.errors import InvalidInput


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_backbone):
    return AutoTokenizer.from_pretrained(tiny_llama_backbone)


def conv(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def test_conversation_uses_the_chat_template(tokenizer):
    enc = PromptEncoder(tokenizer, 512).conversation(conv("hello there", "hi"))
    expected = tokenizer.apply_chat_template(conv("hello there", "hi"), tokenize=False)
    assert tokenizer.decode(enc.ids) == expected
    assert not enc.truncated


def test_prompt_response_equals_the_two_turn_conversation(tokenizer):
    e = PromptEncoder(tokenizer, 512)
    assert e.prompt_response("hello there", "hi").ids == e.conversation(conv("hello there", "hi")).ids


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(60))
    full = PromptEncoder(tokenizer, 10_000).conversation(conv(prompt, "the quick brown fox"))
    limit = len(full.ids) - 25
    cut = PromptEncoder(tokenizer, limit).conversation(conv(prompt, "the quick brown fox"))
    assert cut.truncated and len(cut.ids) == limit
    # the kept part is exactly the last `limit` tokens: the prompt lost its oldest tokens
    assert cut.ids == full.ids[-limit:]
    assert tokenizer.decode(cut.ids).endswith("<|assistant|>the quick brown fox<|end|>\n")
    assert "word0 " not in tokenizer.decode(cut.ids)


def test_response_that_cannot_fit_is_rejected_with_its_size(tokenizer):
    e = PromptEncoder(tokenizer, 8)
    with pytest.raises(InvalidInput, match=r"response alone needs \d+ tokens .* at most 8"):
        e.conversation(conv("hi", "a long response that is certainly more than eight tokens long"))


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "no messages"),
        ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'wizard'"),
        ([{"role": "user", "content": "x"}], "must have role 'assistant'"),
    ],
)
def test_bad_conversations(tokenizer, messages, match):
    with pytest.raises(InvalidInput, match=match):
        PromptEncoder(tokenizer, 64).conversation(messages)


def test_token_ids_are_checked_and_cut_from_the_left(tokenizer):
    e = PromptEncoder(tokenizer, 4)
    assert e.token_ids([1, 2, 3]).ids == [1, 2, 3]
    cut = e.token_ids([1, 2, 3, 4, 5, 6])
    assert cut.ids == [3, 4, 5, 6] and cut.truncated
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        e.token_ids([1, len(tokenizer)])
    with pytest.raises(InvalidInput, match="empty"):
        e.token_ids([])


@pytest.mark.parametrize("messages", [
    conv("hello there", ""),                                   # the policy answered nothing
    conv("hello there", "   "),                                # or only whitespace
    [{"role": "system", "content": ""}, *conv("hello", "hi")],  # an empty system message
    conv("", "hi"),                                            # an empty user turn
])
def test_empty_content_is_rendered_by_the_template_and_scored(tokenizer, messages):
    enc = PromptEncoder(tokenizer, 512).conversation(messages)
    expected = tokenizer.apply_chat_template(messages, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):  # transformers 5 returns an encoding
        expected = expected["input_ids"]
    assert enc.ids == list(expected) and not enc.truncated


def test_an_empty_response_to_a_prompt_is_the_two_turn_conversation(tokenizer):
    e = PromptEncoder(tokenizer, 512)
    assert e.prompt_response("hi", "").ids == e.conversation(conv("hi", "")).ids


def test_without_a_template_an_empty_reply_still_has_tokens_to_score(tiny_bert_seqcls):
    # without a chat template the fallback renders 'assistant: ' — still content, so scored
    e = PromptEncoder(AutoTokenizer.from_pretrained(tiny_bert_seqcls), 512, use_chat_template=False)
    assert len(e.prompt_response("", "").ids) > 0


def test_tokenizer_without_template_uses_plain_role_lines(tiny_bert_seqcls):
    tok = AutoTokenizer.from_pretrained(tiny_bert_seqcls)
    e = PromptEncoder(tok, 512, use_chat_template=False)
    enc = e.conversation(conv("hello", "hi there"))
    assert tok.decode(enc.ids) == "user: hello\nassistant: hi there"
