"""The scoring engine: token ids in, per-sample rewards and uncertainty out.

CPU path: sequences sorted by length and cut into right-padded batches under a
token budget (padded tokens counted), so little compute goes to padding; one
backbone forward per batch, then one `last_token_scores` launch that gathers
the last real token (from lengths, never from the pad token) and computes the
heads and their statistics.

The engine knows nothing of gRPC or of the queue: it is called from one worker
thread with a list of sequences and returns arrays.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rmserve.kernels import last_token_scores
from rmserve.service.model import Member, RewardModel
from rmserve.service.prefix import PrefixGroup, find_prefix_groups


@dataclass
class BatchStats:
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0    # real + padding actually computed
    forward_s: float = 0.0


@dataclass
class EngineOutput:
    rewards: np.ndarray              # [N, K] float32, K = all heads of all members
    mean: np.ndarray                 # [N]
    var: np.ndarray                  # [N]
    min: np.ndarray                  # [N]
    epistemic: np.ndarray | None     # [N]
    stats: BatchStats = field(default_factory=BatchStats)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def plan_batches(lengths: list[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into length-sorted batches whose padded size fits the budget.

    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # sorted ascending, so the newest sequence is the batch's longest
        if cur and ((len(cur) + 1) * lengths[i] > token_budget or len(cur) == max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class ScoringEngine:
    """`min_shared_prefix`: sequences sharing at least this many leading tokens
    (a GRPO group's prompt) have that prefix encoded once; 0 turns sharing off."""

    def __init__(self, model: RewardModel, *, token_budget: int = 4096, max_batch: int = 256, min_shared_prefix: int = 16):
        self.model = model
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.min_shared_prefix = min_shared_prefix

    @torch.inference_mode()
    def score(self, seqs: list[list[int]]) -> EngineOutput:
        if not seqs:
            raise ValueError("score() needs at least one sequence")
        stats = BatchStats()
        per_member = [self._score_member(m, seqs, stats) for m in self.model.members]
        rewards = torch.cat([r for r, _ in per_member], dim=1)
        eps = [e for _, e in per_member if e is not None]
        epistemic = torch.stack(eps).mean(0) if eps else None
        return EngineOutput(
            rewards=rewards.numpy(),
            mean=rewards.mean(1).numpy(),
            var=rewards.var(1, unbiased=False).numpy(),
            min=rewards.min(1).values.numpy(),
            epistemic=None if epistemic is None else epistemic.numpy(),
            stats=stats,
        )

    @torch.inference_mode()
    def features(self, seqs: list[list[int]], member: int = 0) -> torch.Tensor:
        """Last-token (or pooled) embeddings [N, H] in float32: what the heads read."""
        m = self.model.members[member]
        out = torch.empty(len(seqs), m.backbone.hidden_size)
        for idx in plan_batches([len(s) for s in seqs], self.token_budget, self.max_batch):
            hidden, lengths = self._forward(m, [seqs[i] for i in idx])
            out[idx] = hidden[torch.arange(len(idx)), lengths - 1].float()
        return out

    def _score_member(self, m: Member, seqs: list[list[int]], stats: BatchStats):
        k = m.weight.shape[0]
        rewards = torch.empty(len(seqs), k)
        epistemic = torch.empty(len(seqs)) if m.unc_factor is not None else None

        def put(idx: list[int], hidden: torch.Tensor, lengths: torch.Tensor) -> None:
            out = last_token_scores(hidden, m.weight, m.bias, lengths=lengths, unc_factor=m.unc_factor)
            rewards[idx] = out.rewards
            if epistemic is not None:
                epistemic[idx] = out.epistemic

        groups, alone = [], list(range(len(seqs)))
        if self.min_shared_prefix > 0 and m.backbone.pooling == "last":  # causal: a prefix's KV is its own
            groups, alone = find_prefix_groups(seqs, self.min_shared_prefix)
        t0 = time.perf_counter()
        for g in groups:
            self._score_shared_prefix(m, seqs, g, put, stats)
        for sub in plan_batches([len(seqs[i]) for i in alone], self.token_budget, self.max_batch):
            idx = [alone[i] for i in sub]
            batch = [seqs[i] for i in idx]
            hidden, lengths = self._forward(m, batch)
            put(idx, hidden, lengths)
            stats.batches += 1
            stats.real_tokens += sum(len(s) for s in batch)
            stats.padded_tokens += len(batch) * max(len(s) for s in batch)
        stats.forward_s += time.perf_counter() - t0
        return rewards, epistemic

    def _score_shared_prefix(self, m: Member, seqs: list[list[int]], g: PrefixGroup, put, stats: BatchStats) -> None:
        """Encode the group's prefix once, then its suffixes against the expanded KV cache."""
        p = g.prefix_len
        prefix = torch.tensor([seqs[g.members[0]][:p]])
        cache = m.backbone.model(input_ids=prefix, use_cache=True).past_key_values
        suffixes = [seqs[i][p:] for i in g.members]
        stats.real_tokens += p
        stats.padded_tokens += p
        for sub in plan_batches([len(s) for s in suffixes], self.token_budget, self.max_batch):
            batch = [suffixes[i] for i in sub]
            lengths = torch.tensor([len(s) for s in batch])
            t = int(lengths.max())
            ids = torch.full((len(batch), t), m.backbone.tokenizer.pad_token_id or 0, dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
            mask = torch.cat([torch.ones(len(batch), p, dtype=torch.long),
                              (torch.arange(t)[None, :] < lengths[:, None]).long()], dim=1)
            group_cache = copy.deepcopy(cache)
            group_cache.batch_repeat_interleave(len(batch))
            out = m.backbone.model(
                input_ids=ids, attention_mask=mask, **{_cache_kwarg(m.backbone.model): group_cache},
                position_ids=(p + torch.arange(t))[None, :].expand(len(batch), t), use_cache=True,
            )
            put([g.members[i] for i in sub], out.last_hidden_state, lengths)
            stats.batches += 1
            stats.real_tokens += int(lengths.sum())
            stats.padded_tokens += len(batch) * t

    def _forward(self, m: Member, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded forward. Returns (hidden [B, T, H], lengths [B])."""
        lengths = torch.tensor([len(s) for s in batch])
        t = int(lengths.max())
        pad = m.backbone.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), t), pad, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out = m.backbone.model(input_ids=ids, attention_mask=mask)
        if m.backbone.pooling == "cls":
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
            return pooled[:, None, :], torch.ones(len(batch), dtype=torch.long)
        return out.last_hidden_state, lengths
