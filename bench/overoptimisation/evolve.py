"""Experiment 2: a stronger optimiser than best-of-n, feeding the run monitor step by step.

An evolutionary text search stands in for an RL policy (a 2-core CPU cannot run
PPO on a 135M model for tens of steps, and a search that edits text directly
pushes much harder on the reward than best-of-64). Per prompt it keeps a
population of `population` responses; at every step it makes `offspring`
children, each a parent with 1-3 word-level edits:

  insert      a span of 1-4 words at a random position
  substitute  replace 1-3 words with a span
  delete      remove 1-3 words
  splice      the parent's head and another member's tail

Spans come from HH-harmless train responses (either side) and from the prompt's
own policy samples, so the search can find both what a harmless answer says and
what merely scores high. The children are the step's "rollouts": they are scored
through the real server with `run_id` and `step` (the monitor sees them as a
training run's samples); the population becomes the best `population` of parents
and children by the run's objective ((μ+λ) selection). The population is what
the run has learnt, so its gold mean is the run's true reward (the gold scores
only the children that enter it: the gold forward is the costliest part).

Step 0 scores `offspring` policy samples per prompt, the population's seed, so
the monitor's baseline starts at the unoptimised policy as an RL run's would.

Runs (run_id = objective, or uwo-λ):
  mean     the proxy's ensemble mean: what over-optimises
  uwo-λ    mean − λ·var over heads (Coste et al.'s uncertainty-weighted objective)
  wco      the worst head
  gold     the gold reward itself: a healthy run whose reward gain is real
  policy   no selection: every step is fresh policy samples (no optimisation at all)
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from models import GoldScorer
from policy import Prompt
from serving import ProxyScores, ProxyServer

_WORD = re.compile(r"\S+")


class Vocabulary:
    """Where edits draw their words: spans of train responses and of the prompt's own samples,
    the most frequent words of train responses, and (with probability `junk`) single tokens of
    the backbone's vocabulary. Train text keeps the search where the gold was trained; the
    tokens let it leave that distribution, which is where a proxy can be gamed."""

    def __init__(self, train_responses: Sequence[str], tokens: Sequence[str] = (), junk: float = 0.0,
                 common: int = 300, seed: int = 0):
        self.rng = random.Random(seed)
        self.texts = [t.split() for t in train_responses if len(t.split()) >= 2]
        counts = Counter(w for t in self.texts for w in t)
        self.common = [w for w, _ in counts.most_common(common)]
        self.tokens = [t for t in tokens if t]
        self.junk = junk if self.tokens else 0.0

    def span(self, local: Sequence[list[str]]) -> list[str]:
        if self.rng.random() < self.junk:
            return [self.rng.choice(self.tokens)]
        r = self.rng.random()
        if r < 0.2:
            return [self.rng.choice(self.common)]
        source = self.rng.choice(self.texts) if r < 0.7 or not local else self.rng.choice(local)
        if not source:
            return [self.rng.choice(self.common)]
        k = self.rng.randint(1, min(4, len(source)))
        i = self.rng.randrange(len(source) - k + 1)
        return source[i : i + k]


def mutate(words: list[str], others: Sequence[list[str]], local: Sequence[list[str]], vocab: Vocabulary,
           max_words: int) -> list[str]:
    """One child of `words`: 1-3 edits (see the module docstring); never empty, at most `max_words`."""
    rng = vocab.rng
    w = list(words)
    for _ in range(1 + (rng.random() < 0.5) + (rng.random() < 0.25)):
        op = rng.random()
        if op < 0.35 or not w:                                    # insert
            i = rng.randint(0, len(w))
            w[i:i] = vocab.span(local)
        elif op < 0.65:                                           # substitute
            i = rng.randrange(len(w))
            w[i : i + rng.randint(1, 3)] = vocab.span(local)
        elif op < 0.85 and len(w) > 3:                            # delete
            i = rng.randrange(len(w))
            del w[i : i + rng.randint(1, 3)]
        elif others:                                              # splice with another member
            o = rng.choice(others)
            w = w[: rng.randint(0, len(w))] + o[rng.randint(0, len(o)) :]
    return (w or [rng.choice(vocab.common)])[:max_words]


@dataclass
class StepRecord:
    step: int
    # the step's scored samples, the children (what the monitor saw)
    proxy_mean: float
    std_mean: float
    gold_mean: float | None  # only where every child got a gold score (gold and policy runs, step 0)
    # the population after selection (what the run would deploy): its gold is the run's true reward
    pop_proxy: float
    pop_std: float
    pop_gold: float
    pop_corr_proxy_gold: float
    pop_words: float
    samples: dict[str, list[float]] = field(default_factory=dict)  # proxy reward and std per child


@dataclass
class RunResult:
    run_id: str
    objective: str
    steps: list[StepRecord]
    status: dict[str, Any]
    seconds: float
    examples: list[dict[str, Any]]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else 0.0


def run_search(
    run_id: str,
    objective: str,
    prompts: Sequence[Prompt],
    pool: Sequence[Sequence[str]],
    proxy: ProxyServer,
    gold: GoldScorer,
    vocab: Vocabulary,
    *,
    steps: int,
    population: int,
    offspring: int,
    uwo_lambda: float,
    max_words: int = 64,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> RunResult:
    """One optimisation run (see the module docstring); `pool[i]` are prompt i's policy samples."""
    rng = np.random.default_rng(seed)
    vocab.rng.seed(seed)
    local = [[s.split() for s in samples] for samples in pool]

    def fitness(p: ProxyScores, g: np.ndarray) -> np.ndarray:
        return {"mean": lambda: p.mean, "uwo": lambda: p.mean - uwo_lambda * p.var, "wco": lambda: p.min,
                "gold": lambda: g, "policy": lambda: np.zeros_like(g)}[objective]()

    pops: list[list[str]] = []
    pop_scores: list[tuple[ProxyScores, np.ndarray]] = []
    records: list[StepRecord] = []
    t0 = time.time()
    for step in range(steps + 1):
        if step == 0 or objective == "policy":   # fresh policy samples
            children = [[pool[i][j] for j in rng.choice(len(pool[i]), offspring, replace=False)]
                        for i in range(len(prompts))]
        else:
            children = []
            for i in range(len(prompts)):
                words = [r.split() for r in pops[i]]
                kids = []
                for _ in range(offspring):
                    a = int(rng.integers(len(words)))
                    others = words[:a] + words[a + 1 :]
                    kids.append(" ".join(mutate(words[a], others, local[i], vocab, max_words)))
                children.append(kids)
        scored = proxy.score_groups([(p.messages, kids) for p, kids in zip(prompts, children, strict=True)],
                                    run_id=run_id, step=step)
        # The gold is the costliest forward: score every child only where selection needs it
        # (the gold run) or it is cached (policy samples); otherwise only the children that
        # enter the population, whose gold mean is the run's true reward.
        full_gold = objective == "gold" or step == 0 or objective == "policy"
        golds = [gold.score([(p.key, p.messages, r) for r in kids]) if full_gold else np.full(len(kids), np.nan)
                 for p, kids in zip(prompts, children, strict=True)]
        # selection: the best `population` distinct responses of parents + children
        carry = bool(pops) and objective != "policy"
        new_pops, new_scores = [], []
        for i, p in enumerate(prompts):
            cand = (pops[i] if carry else []) + children[i]
            ps = ProxyScores.concat(([pop_scores[i][0]] if carry else []) + [scored[i]])
            gs = np.concatenate(([pop_scores[i][1]] if carry else []) + [golds[i]])
            order = np.argsort(-fitness(ps, gs), kind="stable")
            keep, seen = [], set()
            for j in order:
                if cand[j] not in seen:
                    seen.add(cand[j])
                    keep.append(int(j))
                if len(keep) == population:
                    break
            kept_gold = gs[keep]
            missing = np.isnan(kept_gold)
            if missing.any():
                kept_gold[missing] = gold.score([(p.key, p.messages, cand[j]) for j, m in zip(keep, missing,
                                                                                            strict=True) if m])
            new_pops.append([cand[j] for j in keep])
            new_scores.append((ps.take(keep), kept_gold))
        pops, pop_scores = new_pops, new_scores
        all_p = ProxyScores.concat(scored)
        all_g = np.concatenate(golds)
        pop_p = ProxyScores.concat([s for s, _ in pop_scores])
        pop_g = np.concatenate([g for _, g in pop_scores])
        rec = StepRecord(
            step=step, proxy_mean=float(all_p.mean.mean()), std_mean=float(all_p.std.mean()),
            gold_mean=None if not full_gold else float(all_g.mean()),
            pop_proxy=float(pop_p.mean.mean()), pop_std=float(pop_p.std.mean()), pop_gold=float(pop_g.mean()),
            pop_corr_proxy_gold=_corr(pop_p.mean, pop_g),
            pop_words=float(np.mean([len(r.split()) for pop in pops for r in pop])),
            samples={"reward": all_p.mean.round(5).tolist(), "std": all_p.std.round(5).tolist()},
        )
        records.append(rec)
        if step % 5 == 0 or step == steps:
            log(f"  [{run_id}] step {step:3d}: children proxy {rec.proxy_mean:+.3f} std {rec.std_mean:.3f} "
                f"| population proxy {rec.pop_proxy:+.3f} std {rec.pop_std:.3f} gold {rec.pop_gold:+.3f} "
                f"words {rec.pop_words:.0f} ({time.time() - t0:.0f}s)")
    examples = []
    for i in range(min(3, len(prompts))):
        examples.append({"prompt": prompts[i].messages[-1]["content"][:200], "best": pops[i][0],
                         "proxy": float(pop_scores[i][0].mean[0]), "std": float(pop_scores[i][0].std[0]),
                         "gold": float(pop_scores[i][1][0])})
    return RunResult(run_id, objective, records, proxy.run_status(run_id), time.time() - t0, examples)
