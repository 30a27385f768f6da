"""The backend contract: what a backend implements (a `Trunk`) and what the engine does for it.

A backend implements one thing: the last-token embeddings of a planned batch, per member
(`Trunk.forward`). Everything else is `Engine`'s, the same for every backend:

- planning: sequences sorted by length and cut into batches under the token budget
  (`plan_batches`: padded tokens for a trunk that pads, real tokens for one that packs);
- out-of-memory: a batch that runs out of memory is split in half and retried, down to one
  sequence (`EngineOutOfMemory` then);
- shared prefixes (a GRPO group's prompt) encoded once, for a trunk that can
  (`Trunk.encode_prefix`, engine/prefix.py finds the groups);
- the heads (engine/heads.py: one kernel launch per member and batch, OOD scores) and the
  ensemble's statistics, and the batch statistics the server exports.

docs/backends.md ("Adding a backend") walks through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rmserve.kernels import LastTokenScores
from rmserve.service.engine.errors import EngineOutOfMemory, RMServeError
from rmserve.service.engine.heads import (
    BatchStats,
    EngineOutput,
    LastTokenIndex,
    MemberHeads,
    engine_output,
    member_scores,
)
from rmserve.service.engine.prefix import find_prefix_groups

log = logging.getLogger(__name__)


def plan_batches(lengths: Sequence[int], token_budget: int | None, max_batch: int | None = None, *,
                 packed: bool = False) -> list[list[int]]:
    """Indices grouped into length-sorted batches under a token budget.

    Padded (`packed=False`): a batch costs its size x its longest sequence, so sorting keeps
    padding small. Packed: a batch costs its real tokens; the sort only makes the plan
    deterministic and keeps each batch's longest sequence (which sizes the attention kernel's
    grid) close to the rest. A sequence longer than the budget gets a batch of its own.
    `token_budget=None`: one batch in input order (a trunk that batches itself, e.g. vLLM).
    """
    if token_budget is None:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        # sorted ascending, so the newest sequence is the batch's longest
        cost = total + lengths[i] if packed else (len(cur) + 1) * lengths[i]
        if cur and (cost > token_budget or len(cur) == max_batch):
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def computed_tokens(batch: Sequence[Sequence[int]], packed: bool) -> int:
    """Tokens a batch computes: its real tokens packed, batch x longest padded."""
    return sum(map(len, batch)) if packed else len(batch) * max(map(len, batch))


def is_oom(err: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; other backends a RuntimeError that says so
    (the CPU allocator's words are "can't allocate memory"). An error a backend already
    classified (an RMServeError, e.g. vLLM's failures) is not retried."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if isinstance(err, RMServeError) or not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


@dataclass
class Embeddings:
    """A trunk's forward: each served member's hidden states (in `Trunk.members` order) and where
    each sequence's last token sits in them."""

    hidden: list[torch.Tensor]
    index: LastTokenIndex


class Trunk:
    """One forward serving some members of a model: what a backend implements.

    Required: `members` (the members one forward serves), `device` (where `forward` returns
    hidden states; the heads run there) and `forward`. The rest has defaults: no prefix
    sharing, a fixed token budget, nothing to free after running out of memory.
    """

    members: Sequence[MemberHeads]
    device: torch.device
    packed: bool = False            # the token budget counts real tokens (a packed stream), not padded rows
    shares_prefixes: bool = False   # encode_prefix and forward(prefix=...) work

    def forward(self, batch: list[list[int]], prefix: Any = None) -> Embeddings:
        """The last-token embeddings of `batch` (token ids), per member. `prefix`: what
        `encode_prefix` returned for tokens every sequence of `batch` continues (the batch
        then holds the suffixes and is planned padded)."""
        raise NotImplementedError

    def encode_prefix(self, prefix: list[int]) -> Any:
        """Run `prefix` once; what `forward(batch, prefix=...)` continues from."""
        raise NotImplementedError(f"{type(self).__name__} does not share prefixes")

    def measure_budget(self, fraction: float) -> int | None:
        """Tokens per forward that fit `fraction` of free memory, measured; None: keep the configured budget."""
        return None

    def free_memory(self) -> None:
        """Return cached memory after an out-of-memory error (before the halves run)."""


class Engine:
    """Scores token-id sequences of a RewardModel over its trunks: `score(seqs) -> EngineOutput`.

    `token_budget`: tokens per forward (see plan_batches; None: one batch per call);
    `memory_fraction`: where a trunk measures its memory (CUDA), the budget is replaced once by
    what fits this fraction of it (None keeps `token_budget`); `min_shared_prefix`: sequences
    sharing at least this many leading tokens have them encoded once, on trunks that can
    (0 turns sharing off).
    """

    def __init__(self, model: Any, trunks: Sequence[Trunk], *, token_budget: int | None = 4096,
                 max_batch: int | None = 256, min_shared_prefix: int = 0, memory_fraction: float | None = None):
        self.model = model
        self.trunks = list(trunks)
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.min_shared_prefix = min_shared_prefix
        self.memory_fraction = memory_fraction
        self._budget_sized = memory_fraction is None

    # ------------------------------------------------------------------ API

    @torch.inference_mode()
    def score(self, seqs: list[list[int]]) -> EngineOutput:
        if not seqs:
            raise ValueError("score() needs at least one sequence")
        self._ensure_budget()
        stats = BatchStats()
        by_member = {}
        for trunk in self.trunks:
            for m, out in zip(trunk.members, self._score_trunk(trunk, seqs, stats), strict=True):
                by_member[id(m)] = out
        return engine_output([by_member[id(m)] for m in self.model.members], stats)

    @torch.inference_mode()
    def features(self, seqs: list[list[int]], member: int = 0) -> torch.Tensor:
        """Last-token (or pooled) embeddings [N, H] in float32 on the host: what the heads read."""
        self._ensure_budget()
        m = self.model.members[member]
        trunk = next(t for t in self.trunks if any(x is m for x in t.members))
        which = next(i for i, x in enumerate(trunk.members) if x is m)
        out = torch.empty(len(seqs), m.weight.shape[1], device=trunk.device)

        def run(idx: list[int]) -> None:
            emb = trunk.forward([seqs[i] for i in idx])
            out[idx] = emb.index.gather(emb.hidden[which].to(trunk.device)).float()

        for idx in plan_batches([len(s) for s in seqs], self.token_budget, self.max_batch, packed=trunk.packed):
            self._split_on_oom(trunk, idx, run, BatchStats())
        return out.cpu()

    # ------------------------------------------------------------- the loop

    def _score_trunk(self, trunk: Trunk, seqs: list[list[int]], stats: BatchStats
                     ) -> list[tuple[LastTokenScores, torch.Tensor | None]]:
        """For each member of the trunk: every sequence's rewards, their mean/var/min over the
        member's heads, its epistemic term and its OOD score, on the trunk's device."""
        n, dev = len(seqs), trunk.device
        outs = []
        for m in trunk.members:
            scores = LastTokenScores(
                rewards=torch.empty(n, m.weight.shape[0], device=dev),
                mean=torch.empty(n, device=dev),
                var=torch.empty(n, device=dev),
                min=torch.empty(n, device=dev),
                epistemic=torch.empty(n, device=dev) if m.unc_factor is not None else None,
            )
            outs.append((scores, torch.empty(n, device=dev) if m.ood is not None else None))

        def put(idx: list[int], emb: Embeddings) -> None:
            for m, (scores, ood), hidden in zip(trunk.members, outs, emb.hidden, strict=True):
                # a sharded trunk's member layers may end on another device (engine/sharded.py)
                got, member_ood = member_scores(m, hidden.to(dev), emb.index)
                for name in ("rewards", "mean", "var", "min", "epistemic"):
                    buf = getattr(scores, name)
                    if buf is not None:
                        buf[idx] = getattr(got, name)
                if ood is not None:
                    ood[idx] = member_ood

        groups, alone = [], list(range(n))
        if self.min_shared_prefix > 0 and trunk.shares_prefixes:
            groups, alone = find_prefix_groups(seqs, self.min_shared_prefix)
        for g in groups:
            p = g.prefix_len
            state = trunk.encode_prefix(seqs[g.members[0]][:p])
            stats.real_tokens += p
            stats.padded_tokens += p
            self._run_planned(trunk, [seqs[i][p:] for i in g.members], g.members, put, stats, state)
        self._run_planned(trunk, [seqs[i] for i in alone], alone, put, stats)
        return outs

    def _run_planned(self, trunk: Trunk, batch_seqs: list[list[int]], positions: list[int],
                     put: Callable[[list[int], Embeddings], None], stats: BatchStats, prefix: Any = None) -> None:
        """`batch_seqs` (the sequences at `positions` of the call, or their suffixes after
        `prefix`) planned into batches, each forwarded and scored, split on out-of-memory."""
        packed = trunk.packed and prefix is None

        def run(sub: list[int]) -> None:
            batch = [batch_seqs[i] for i in sub]
            put([positions[i] for i in sub], trunk.forward(batch, prefix))
            stats.batches += 1
            stats.real_tokens += sum(map(len, batch))
            stats.padded_tokens += computed_tokens(batch, packed)

        for sub in plan_batches([len(s) for s in batch_seqs], self.token_budget, self.max_batch, packed=packed):
            self._split_on_oom(trunk, sub, run, stats)

    def _split_on_oom(self, trunk: Trunk, idx: list[int], run: Callable[[list[int]], None], stats: BatchStats) -> None:
        """run(idx); on out-of-memory, run each half (recursively) instead of failing the batch."""
        try:
            run(idx)
            return
        except RuntimeError as err:
            if not is_oom(err):
                raise
            if len(idx) == 1:
                raise EngineOutOfMemory(
                    f"one sequence does not fit in memory on {trunk.device} even alone; "
                    "lower the per-sample token limit (--max-tokens) or serve a smaller dtype"
                ) from err
        # outside the except block: the exception's traceback pins the failed batch's activations
        trunk.free_memory()
        stats.oom_splits += 1
        log.warning("out of memory on a batch of %d sequences; splitting it in half", len(idx))
        half = len(idx) // 2
        self._split_on_oom(trunk, idx[:half], run, stats)
        self._split_on_oom(trunk, idx[half:], run, stats)

    def _ensure_budget(self) -> None:
        """Once, where trunks measure their memory: the token budget that fits every one of them."""
        if self._budget_sized:
            return
        self._budget_sized = True
        budgets = [b for t in self.trunks if (b := t.measure_budget(self.memory_fraction)) is not None]
        if budgets:
            self.token_budget = min(budgets)
            log.info("token budget sized from measured memory: %d tokens per forward", self.token_budget)
