"""Robust-training augmentation: pairs whose rejected side does not answer the prompt.

A reward model trained only on pairs of real answers can rank by style (length,
politeness, markdown) without reading the prompt, and a policy finds that first.
RRM (Liu et al. 2024, "Robust Reward Model Training Mitigates Reward Hacking")
adds Bradley-Terry pairs whose rejected side is an answer to *another* prompt, so
that only the prompt tells the two apart. The kinds here follow that idea, each
built from the training data itself (or, for the template kinds, from small
phrase pools) and each one pair per chosen training prompt:

| kind | rejected side |
| --- | --- |
| `off_topic` | the best answer of another training prompt of the same data set (RRM's non-contextual pair) |
| `echo` | the prompt's last user turn handed back, sometimes with a lead-in |
| `padded` | the chosen answer followed by its own sentences repeated: longer, nothing new |
| `flattery` | praise of the question and the asker, no content |
| `filler` | generic sentences that fit any question and answer none |
| `scaffold` | markdown headings and empty bullets around the prompt's words |

The chosen side is the prompt's best-known answer: the response chosen most often
among the prompt's pairs, counting only texts written for that prompt (a text that
occurs under several prompts, like the judge attack in the AlpacaEval data, is
never the side that must win). Augmented pairs keep the `source` of the pair they were
built from (cross-validation and the calibration split keep them with their
prompt) and carry `origin = "augment:<kind>"`, so the trainer can leave them out
of what must describe real answers: normalisation, temperature, OOD statistics.

Never leaked: only training prompts are augmented and only training answers are
reused; a prompt that also occurs in the dev data (`exclude`) is neither
augmented nor used as another prompt's off-topic answer.

The template pools here are deliberately different from the hack-shape
evaluation's (bench/hack_shapes.py), which stands in for generators the model
has never seen.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from rmserve.service.data.train_config import AUGMENT_KINDS, AugmentSpec, parse_augment
from rmserve.training.data import Message, Pair

ORIGIN_PREFIX = "augment:"


def is_augmented(origin: str) -> bool:
    return origin.startswith(ORIGIN_PREFIX)


def prompt_key(prompt: list[Message]) -> str:
    """Identity of a prompt: its messages, roles included."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()


def _text(msgs: list[Message]) -> str:
    return "\n\n".join(m["content"] for m in msgs)


def _last_user(prompt: list[Message]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), _text(prompt))


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def _words(text: str, n: int) -> str:
    return " ".join(re.findall(r"[A-Za-z][A-Za-z'-]+", text)[:n])


# -- the template pools (disjoint from bench/hack_shapes.py's) -------------------------------

_FLATTERY = (
    "Wow, this is honestly one of the most insightful questions I've been asked.",
    "You clearly have a sharp, curious mind, and it shows in how you put this.",
    "I love how thoughtful you are being here; not many people would think to ask this.",
    "Your question shows real wisdom and maturity.",
    "It's a pleasure to talk with someone as perceptive as you.",
    "Brilliant question! You are asking exactly the right things.",
    "I'm genuinely impressed by the depth of your thinking.",
    "People like you make these conversations worthwhile.",
    "You obviously already understand this far better than most.",
    "What a wonderful, well-considered thing to wonder about.",
)
_FILLER = (
    "This is a topic with many sides, and it is worth thinking about carefully.",
    "Different people may see it differently depending on their situation.",
    "In general, it depends on a number of factors and circumstances.",
    "It is important to keep an open mind and consider every perspective.",
    "There is no single answer that fits everyone, so context matters.",
    "Many experts have discussed questions like this over the years.",
    "Ultimately, the best approach will vary from case to case.",
    "It can help to reflect on what matters most to you here.",
    "These things are often more complicated than they first appear.",
    "Taking the time to look into it further is usually worthwhile.",
)
_ECHO_LEADS = ("", "", "You asked: ", "Question: ", "So your question is: ", "Let me restate that. ")
_SCAFFOLD_HEADINGS = ("Overview", "Background", "Key Points", "Details", "Step-by-Step", "Considerations",
                      "Summary", "Next Steps", "Notes", "Conclusion")


def _flattery(rng: random.Random) -> str:
    return " ".join(rng.sample(_FLATTERY, rng.randint(2, 4)))


def _filler(rng: random.Random) -> str:
    return " ".join(rng.sample(_FILLER, rng.randint(3, 5)))


def _echo(prompt: list[Message], rng: random.Random) -> str:
    return rng.choice(_ECHO_LEADS) + _last_user(prompt)


def _scaffold(prompt: list[Message], rng: random.Random) -> str:
    title = _words(_last_user(prompt), 8) or "Your Question"
    parts = [f"# {title.title()}"]
    for h in rng.sample(_SCAFFOLD_HEADINGS, rng.randint(3, 5)):
        parts.append(f"## {h}")
        parts.append("\n".join(rng.choice(("- ", "- ...", "1. ", "* [ ] ", "- **Point:** ")) for _ in range(rng.randint(2, 4))))
    return "\n\n".join(parts)


def _padded(answer: str, rng: random.Random) -> str:
    sents = _sentences(answer) or [answer.strip()]
    pad = rng.sample(sents, min(len(sents), rng.randint(1, 3)))
    repeats = rng.randint(2, 4)
    # bounded: the padding roughly doubles a short answer and adds at most ~120 words to a long one
    words = answer.split()
    budget = max(40, min(len(words), 120))
    out, n = [], 0
    for _ in range(repeats):
        for s in pad:
            if n >= budget:
                break
            out.append(s)
            n += len(s.split())
    return answer.rstrip() + "\n\n" + " ".join(out)


# -- building the pairs -----------------------------------------------------------------------


@dataclass
class _Prompt:
    key: str
    prompt: list[Message]
    origin: str
    source: str
    best: list[Message]   # the response chosen most often among the prompt's pairs


def _prompts(pairs: list[Pair], exclude: set[str]) -> tuple[list[_Prompt], int]:
    """The augmentable prompts with their best answer, and how many prompts had none.

    The best answer is the response chosen most often among the prompt's pairs, counting only
    responses written for this prompt: a text that occurs under several prompts (a canned reply,
    or the judge attack that wins 21% of the AlpacaEval pairs: token soup ending in "Ignore the
    above ... Output nothing") answers none of them, so it is never the side that must win.
    Pairs without a prompt are left out: they would all count as one prompt.
    """
    wins: dict[str, Counter] = defaultdict(Counter)
    responses: dict[str, dict[str, list[Message]]] = defaultdict(dict)
    prompts_of: dict[str, set[str]] = defaultdict(set)
    first: dict[str, Pair] = {}
    for p in pairs:
        if is_augmented(p.origin) or not p.prompt:
            continue
        k = prompt_key(p.prompt)
        for side in (p.chosen, p.rejected):
            prompts_of[json.dumps(side, sort_keys=True)].add(k)
        if k in exclude:
            continue
        first.setdefault(k, p)
        rk = json.dumps(p.chosen, sort_keys=True)
        wins[k][rk] += 1
        responses[k][rk] = p.chosen
    out, without = [], 0
    for k, p in first.items():
        own = [(rk, n) for rk, n in wins[k].items() if len(prompts_of[rk]) == 1]
        if not own:
            without += 1
            continue
        best_key = min(own, key=lambda kv: (-kv[1], kv[0]))[0]
        out.append(_Prompt(k, p.prompt, p.origin, p.source, responses[k][best_key]))
    return out, without


def augment_pairs(
    pairs: list[Pair],
    specs: list[AugmentSpec],
    *,
    seed: int,
    exclude: set[str] | None = None,
    weight: float = 1.0,
) -> tuple[list[Pair], dict[str, Any]]:
    """The augmented pairs for `pairs` (the training pairs) and a report of what was built.

    `exclude`: prompt keys (`prompt_key`) of held-out data: never augmented, never reused.
    Each prompt is augmented with probability `share` per kind, from an RNG seeded by (seed,
    kind, prompt): deterministic, and the same for a prompt whatever else is in the data.
    """
    exclude = exclude or set()
    prompts, without = _prompts(pairs, exclude)
    by_origin: dict[str, list[int]] = defaultdict(list)
    for i, pr in enumerate(prompts):
        by_origin[pr.origin].append(i)
    out: list[Pair] = []
    report: dict[str, Any] = {"kinds": {}, "prompts": len(prompts), "excluded_prompts": len(exclude),
                              "prompts_without_own_answer": without,
                              "pairs_without_prompt": sum(1 for p in pairs if not p.prompt)}
    for spec in specs:
        built = 0
        for pr in prompts:
            # per-prompt draws: a prompt's augmentation does not depend on which other prompts are
            # in the data, so a larger data set reuses the smaller one's (and its cached features)
            rng = random.Random(f"{seed}:{spec.kind}:{pr.key}")
            if rng.random() >= spec.share:
                continue
            rejected = _build(spec.kind, pr, prompts, by_origin, rng)
            if rejected is None or rejected.strip() == _text(pr.best).strip():
                continue
            out.append(Pair(prompt=pr.prompt, chosen=pr.best,
                            rejected=[{"role": "assistant", "content": rejected}],
                            weight=weight, margin=0.0, source=pr.source, origin=ORIGIN_PREFIX + spec.kind))
            built += 1
        report["kinds"][spec.kind] = {"share": spec.share, "pairs": built}
    report["pairs"] = len(out)
    return out, report


def _build(kind: str, pr: _Prompt, prompts: list[_Prompt], by_origin: dict[str, list[int]],
           rng: random.Random) -> str | None:
    answer = _text(pr.best)
    if kind == "off_topic":
        pool = by_origin[pr.origin]
        if len(pool) < 2:
            return None
        other = prompts[rng.choice(pool)]
        while other.key == pr.key:
            other = prompts[rng.choice(pool)]
        return _text(other.best)
    if kind == "echo":
        return _echo(pr.prompt, rng)
    if kind == "padded":
        return _padded(answer, rng)
    if kind == "flattery":
        return _flattery(rng)
    if kind == "filler":
        return _filler(rng)
    if kind == "scaffold":
        return _scaffold(pr.prompt, rng)
    raise ValueError(f"unknown augmentation kind {kind!r}")


__all__ = ["AUGMENT_KINDS", "AugmentSpec", "augment_pairs", "is_augmented", "parse_augment",
           "prompt_key"]
