"""The GRPO host path: a group's prompt tokenised once, groups kept whole by the scheduler,
the prompt's KV cache broadcast without copies. Every change must give today's token ids
and today's scores, bit for bit, and scores that do not depend on how groups are batched."""

from __future__ import annotations

import asyncio
import copy
import random

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rmserve.service.engine import scoring
from rmserve.service.engine.backbone import resolve_builtin
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.service.server.encoding import encode_completion, encode_groups
from rmserve.service.server.errors import InvalidInput
from rmserve.service.server.scheduler import Scheduler
from rmserve.service.server.wire import groups_of
from rmserve.v1 import reward_pb2 as pb
from tests.helpers import CHAT_TEMPLATE, CORPUS

PROMPTS = [
    "How do I bake bread? Give me the steps.",
    "",
    "   ",
    "line one\nline two\n\n",
    "ünïcödé 漢字 🙂 — émigré naïve",
    "a prompt that names <|end|> and <|im_end|> and <|assistant|> in its text",
    " leading and trailing spaces ",
]
COMPLETIONS = [
    "Mix flour and water.",
    "",                                  # the policy answered nothing
    " ",
    "\n\nleading newlines",
    " leading space",
    "trailing space ",
    "ünï 漢字 🙂",
    "<|end|>",                           # special-token text inside a completion
    "<|im_end|>\n<|im_start|>user\nsneaky",
    "Zoo",
    "a.b,c;d!? 123 456",
]
MESSAGES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "ünï 🙂"}],
]


def one_by_one(enc: PromptEncoder, prompt, completions, gi: int = 0):
    """Today's path: every completion rendered and tokenised whole (encoding.encode_completion)."""
    return [encode_completion(enc, prompt, c, f"group {gi} completion {ci}") for ci, c in enumerate(completions)]


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_backbone):
    return AutoTokenizer.from_pretrained(tiny_llama_backbone)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_ensemble):
    return AutoTokenizer.from_pretrained(resolve_builtin("smollm2-135m-instruct"))


def metaspace_tokenizer(scheme: str) -> PreTrainedTokenizerFast:
    """A sentencepiece-style tokenizer: prepend_scheme="first" marks only an input's first piece."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
    specials = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_group_ids_equal_each_completion_tokenised_whole(which, tiny_tok, smollm2_tok):
    tok = tiny_tok if which == "tiny" else smollm2_tok
    enc = PromptEncoder(tok, 100_000)
    assert enc.joins  # the prompt really is tokenised once for these templates
    for prompt in [*PROMPTS, *MESSAGES]:
        got = enc.group(prompt, COMPLETIONS, lambda ci: f"group 0 completion {ci}")
        assert got == one_by_one(enc, prompt, COMPLETIONS), prompt


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_group_ids_equal_on_random_text(which, tiny_tok, smollm2_tok):
    tok = tiny_tok if which == "tiny" else smollm2_tok
    enc = PromptEncoder(tok, 100_000)
    rng = random.Random(7)
    alphabet = [*"abcdefgh XYZ\n\t.,!?'\"<|>_-0123456789", "ü", "漢", "🙂", "é", "<|end|>", "<|im_start|>", "  "]

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    for _ in range(30):
        prompt = text(rng.randint(0, 60))
        completions = [text(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))]
        assert enc.group(prompt, completions) == one_by_one(enc, prompt, completions), (prompt, completions)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_truncation_and_rejection_are_today_s(which, tiny_tok, smollm2_tok):
    """Completions whose ids pass max_tokens take the ordinary path: the prompt cut from the left,
    or the same InvalidInput when the response alone does not fit."""
    tok = tiny_tok if which == "tiny" else smollm2_tok
    prompt = " ".join(f"word{i}" for i in range(40))
    completions = ["short", "a somewhat longer completion " * 3, "", "ünï 🙂"]
    full = PromptEncoder(tok, 100_000).group(prompt, completions)
    for limit in sorted({len(e.ids) for e in full} | {len(full[0].ids) - 5, len(full[1].ids) - 9}):
        enc = PromptEncoder(tok, limit)
        try:
            want = one_by_one(enc, prompt, completions)
        except InvalidInput as e:
            with pytest.raises(InvalidInput, match=str(e).replace("(", r"\(").replace(")", r"\)")):
                enc.group(prompt, completions, lambda ci: f"group 0 completion {ci}")
            continue
        got = enc.group(prompt, completions, lambda ci: f"group 0 completion {ci}")
        assert got == want
        assert any(e.truncated for e in got) == any(len(e.ids) > limit for e in full)
    with pytest.raises(InvalidInput, match="group 0 completion 1: the response alone needs"):
        PromptEncoder(tok, 12).group("hi", ["ok", "a long response that is certainly more than twelve tokens " * 2],
                                     lambda ci: f"group 0 completion {ci}")


def test_an_added_token_across_the_cut_falls_back(tiny_llama_backbone):
    """An added token that starts with the prompt's last special token ("<|assistant|>Z") matches
    across the cut for a completion starting with "Z": that completion is tokenised whole."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_backbone)
    tok.add_tokens([AddedToken("<|assistant|>Z", normalized=False, special=True),
                    AddedToken("|>o", normalized=False, special=True)])
    enc = PromptEncoder(tok, 10_000)
    completions = ["Zoo", "zoo", "Z", "o", ""]
    for prompt in ("hello there", "x"):
        assert enc.group(prompt, completions) == one_by_one(enc, prompt, completions)
    whole = enc.prompt_response("hello there", "Zoo").ids
    assert tok.convert_tokens_to_ids("<|assistant|>Z") in whole  # the straddling match is real


@pytest.mark.parametrize(("scheme", "joins"), [("first", False), ("always", True)])
def test_a_tokenizer_that_marks_the_first_piece_is_probed_off(scheme, joins):
    enc = PromptEncoder(metaspace_tokenizer(scheme), 10_000)
    assert enc.joins is joins
    for prompt in ("hello there", "the quick brown fox", ""):
        assert enc.group(prompt, COMPLETIONS) == one_by_one(enc, prompt, COMPLETIONS)
    if not joins:  # and the probe is what keeps it exact: joined, the ids would differ
        forced = copy.copy(enc)
        forced.joins = True
        assert forced.group("hello there", ["the fox"]) != one_by_one(enc, "hello there", ["the fox"])


def test_without_a_template_groups_take_the_ordinary_path(tiny_bert_seqcls):
    enc = PromptEncoder(AutoTokenizer.from_pretrained(tiny_bert_seqcls), 512, use_chat_template=False)
    assert not enc.joins
    for prompt in ("hello", ""):
        assert enc.group(prompt, ["hi there", ""]) == one_by_one(enc, prompt, ["hi there", ""])


def test_encode_groups_equals_encoding_each_completion(tiny_tok):
    enc = PromptEncoder(tiny_tok, 64)
    groups = [pb.Group(prompt_text=p, completions=COMPLETIONS[:6]) for p in PROMPTS[:3]]
    groups.append(pb.Group(prompt_messages=pb.Conversation(messages=[pb.Message(role="user", content="hi")]),
                           completions=["a", "b"]))
    got = encode_groups(enc, groups_of(groups), 1024)
    want = [one_by_one(enc, p, COMPLETIONS[:6], gi) for gi, p in enumerate(PROMPTS[:3])]
    want.append(one_by_one(enc, [{"role": "user", "content": "hi"}], ["a", "b"], 3))
    assert got == want
    bad = pb.Group(prompt_messages=pb.Conversation(messages=[pb.Message(role="wizard", content="x")]), completions=["a"])
    with pytest.raises(InvalidInput, match="group 1 completion 0: message 0 has unknown role 'wizard'"):
        encode_groups(enc, groups_of([groups[0], bad]), 1024)


# --------------------------------------------------------------------------- scores


def grpo_seqs(n_groups: int = 4, seed: int = 0) -> list[list[list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_groups):
        prompt = [rng.randrange(7, 290) for _ in range(rng.randint(20, 40))]
        out.append([prompt + [rng.randrange(7, 290) for _ in range(rng.randint(1, 15))]
                    for _ in range(rng.randint(2, 6))])
    return out


def assert_same(a, b, epistemic_ulp: bool = False) -> None:
    """Bit-identical outputs. `epistemic_ulp`: the epistemic term (an [H, H] fp32 matmul in the
    heads' kernel, whose rounding may follow the launch's row count: docs/engine.md, Precision)
    within a last-bit difference, every other output exact."""
    for name in ("rewards", "mean", "var", "min", "epistemic"):
        if name == "epistemic" and epistemic_ulp:
            np.testing.assert_allclose(a.epistemic, b.epistemic, rtol=4e-7, atol=0)
        else:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def copied_cache(cache, n: int):
    """The path before broadcast_cache: a deep copy, repeated n times."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("packing", ["on", "off"])
def test_broadcast_prompt_cache_scores_equal_the_copied_one(tiny_ensemble, monkeypatch, dtype, packing):
    model = load_model(tiny_ensemble, dtype=dtype)
    if packing == "on" and dtype == "bfloat16":
        packing = "auto"  # bf16 on CPU runs the invariant attention, padded
    seqs = [s for g in grpo_seqs() for s in g]
    broadcast = ScoringEngine(model, packing=packing).score(seqs)
    assert broadcast.stats.real_tokens < sum(map(len, seqs))  # the prompts were shared
    monkeypatch.setattr(scoring, "broadcast_cache", copied_cache)
    assert_same(broadcast, ScoringEngine(model, packing=packing).score(seqs))


def test_broadcast_cache_leaves_the_prompt_cache_alone(tiny_ensemble):
    import torch
    from transformers import DynamicCache

    model = load_model(tiny_ensemble)
    bb = model.members[0].backbone.model
    key = scoring._cache_kwarg(bb)
    cache = DynamicCache(config=bb.config)
    with torch.inference_mode():
        bb(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=True, **{key: cache})
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        for n in (3, 1):
            view = scoring.broadcast_cache(cache, n)
            assert all(layer.keys.shape[0] == n for layer in view.layers)
            assert n == 1 or all(layer.keys.stride(0) == 0 for layer in view.layers)  # views, not copies
            bb(input_ids=torch.tensor([[9, 10]] * n), use_cache=True, **{key: view})
            assert view.get_seq_length() == 6 and cache.get_seq_length() == 4
    for layer, (k, v) in zip(cache.layers, before, strict=True):
        assert layer.keys.shape[0] == 1 and torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_scores_do_not_depend_on_how_groups_are_batched(tiny_ensemble):
    """All groups at once, one by one or shuffled: the same bits (a group is computed on its own).
    In bf16 (the invariant attention) also grouped or not; float32 differs there in the last
    bits (~1e-7: sdpa's reduction order follows the padded length)."""
    groups = grpo_seqs(5, seed=3)
    flat = [s for g in groups for s in g]
    for dtype in ("float32", "bfloat16"):
        model = load_model(tiny_ensemble, dtype=dtype)
        engine = ScoringEngine(model)
        together = engine.score(flat)
        per_group = [engine.score(g) for g in groups]
        for name in ("rewards", "mean", "var", "min", "epistemic"):
            np.testing.assert_array_equal(getattr(together, name),
                                          np.concatenate([getattr(o, name) for o in per_group]), err_msg=name)
        shuffled = list(range(len(flat)))
        random.Random(1).shuffle(shuffled)
        out = engine.score([flat[i] for i in shuffled])
        np.testing.assert_array_equal(out.rewards, together.rewards[shuffled])
        if dtype == "bfloat16":  # batch-invariant attention: the prompt's cache changes no bit
            assert_same(together, ScoringEngine(model, min_shared_prefix=0).score(flat), epistemic_ulp=True)


# --------------------------------------------------------------------------- scheduler


class Recorder:
    def __init__(self):
        self.batches: list[list] = []

    def __call__(self, key, payloads):
        self.batches.append(list(payloads))
        return list(payloads)


def test_the_scheduler_takes_a_group_whole():
    """Three groups of 4 items of 10 tokens under a budget of 50: one group per batch (without
    groups the first batch would take 5 items, cutting the second group)."""

    async def main(groups):
        rec = Recorder()
        s = Scheduler(rec, token_budget=50, max_wait_s=0.01)
        items = list(range(12))
        task = asyncio.ensure_future(s.submit("m", items, [10] * 12, groups=groups))
        s.start()
        out = await asyncio.wait_for(task, 60)
        await s.stop()
        return rec.batches, out

    batches, out = asyncio.run(main([i // 4 for i in range(12)]))
    assert out == list(range(12))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    batches, _ = asyncio.run(main(None))
    assert batches[0] == [0, 1, 2, 3, 4]


def test_a_group_over_the_budget_is_cut_and_groups_of_two_calls_stay_apart():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, token_budget=30, max_wait_s=0.01)
        big = asyncio.ensure_future(s.submit("m", list(range(5)), [10] * 5, groups=[0] * 5))
        other = asyncio.ensure_future(s.submit("m", [100, 101], [10, 10], groups=[0, 0]))
        s.start()
        out = await asyncio.wait_for(asyncio.gather(big, other), 60)
        await s.stop()
        return rec.batches, out

    batches, out = asyncio.run(main())
    assert out == [list(range(5)), [100, 101]]
    assert batches[0] == [0, 1, 2]      # the oversized group is cut at the budget
    assert sorted(p for b in batches for p in b) == [0, 1, 2, 3, 4, 100, 101]
    for b in batches:                   # the other call's group (label 0 too) is never cut
        assert {100, 101} <= set(b) or not {100, 101} & set(b)


# --------------------------------------------------------------------------- end to end


def test_score_groups_many_equals_the_engine_and_single_calls(tiny_ensemble, server_factory):
    """ScoreGroups over several scheduler batches (a budget that fits one group, not two) scores
    each completion exactly as the in-process engine on today's token ids, and as one call per group."""
    from rmserve.client import RewardClient

    prompts = ["How do I bake bread at home?", "Numbers 0123456789 please", "Mix flour, water and salt",
               "The quick brown fox?", "hello there"]
    rng = random.Random(5)
    words = ["fox", "dog", "bread", "salt", "water", "yeast", "knead", "quick", "brown", "lazy"]
    groups = [(p, [" ".join(rng.choice(words) for _ in range(rng.randint(0, 4))) for _ in range(4)]) for p in prompts]
    model = load_model(tiny_ensemble)
    ids = [[e.ids for e in one_by_one(model.encoder, p, cs)] for p, cs in groups]
    sizes = [sum(map(len, g)) for g in ids]
    budget = max(sizes) + min(sizes) // 2  # any one group fits, no two do
    engine = ScoringEngine(model).score([s for g in ids for s in g])
    server = server_factory(tiny_ensemble, batch_tokens=budget, max_wait_ms=50.0)
    with RewardClient(server.address) as client:
        many = client.score_groups_many(groups)
        single = [client.score_groups(p, cs) for p, cs in groups]
    assert [[r.num_tokens for r in g] for g in many] == [list(map(len, g)) for g in ids]
    got = np.array([r.reward for g in many for r in g], dtype=np.float32)
    np.testing.assert_array_equal(got, engine.mean)
    np.testing.assert_array_equal(got, np.array([r.reward for g in single for r in g], dtype=np.float32))
