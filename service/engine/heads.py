"""The heads: backend-neutral scoring of last-token embeddings, the same on every backend.

A member's heads are K linear rewards over the last real token's embedding, with the
served normalisation `(w.e + b - shift) / scale` folded into `weight` and `bias` at load
(`fold_normalisation`), an optional epistemic factor L (`||L^T e||`) and optional OOD
statistics (engine/ood.py). One `last_token_scores` launch per member and batch gathers the
last tokens and computes the rewards with their mean/var/min over the member's heads;
`engine_output` combines the members into the ensemble's result on the host.

Nothing here knows how the embeddings were computed: the torch, ONNX Runtime, accelerate and
vLLM backends all hand their trunk's output to these functions (engine/contract.py runs them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from rmserve.kernels import LastTokenScores, last_token_scores
from rmserve.service.engine.errors import EnsembleFormatError
from rmserve.service.engine.ood import OodStats


class MemberHeads(Protocol):
    """What the heads of one member are (engine/model.py `Member` is one)."""

    weight: torch.Tensor              # [K, H] float32, normalisation folded in
    bias: torch.Tensor                # [K]
    unc_factor: torch.Tensor | None   # [H, H]
    ood: OodStats | None


@dataclass(frozen=True)
class LastTokenIndex:
    """Where each sequence's last real token sits in a trunk's hidden states.

    Exactly one of: `lengths` [B] for right-padded hidden states [B, T, H] (the last token at
    row lengths - 1), or `cu_seqlens` [B+1] for a packed stream [T_total, H] (the last token at
    cu_seqlens[1:] - 1). Rows that already are the last tokens ([B, H]: ONNX, vLLM) are a packed
    stream of length-1 sequences (`LastTokenIndex.rows`).
    """

    lengths: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @classmethod
    def rows(cls, n: int, device: torch.device | str = "cpu") -> LastTokenIndex:
        return cls(cu_seqlens=torch.arange(n + 1, device=device))

    def kernel_kwargs(self) -> dict[str, torch.Tensor | None]:
        return {"lengths": self.lengths, "cu_seqlens": self.cu_seqlens}

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each sequence's last row [B, H] of `hidden`."""
        if self.cu_seqlens is not None:
            return hidden[self.cu_seqlens[1:].long() - 1]
        lengths = self.lengths
        return hidden[torch.arange(lengths.shape[0], device=hidden.device), lengths - 1]


@dataclass
class BatchStats:
    """What one `score` call computed; the server exports the token counts as metrics."""

    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0    # real + padding actually computed
    oom_splits: int = 0       # batches split in half after running out of memory


@dataclass
class EngineOutput:
    rewards: np.ndarray              # [N, K] float32, K = all heads of all members
    mean: np.ndarray                 # [N]
    var: np.ndarray                  # [N]
    min: np.ndarray                  # [N]
    epistemic: np.ndarray | None     # [N]
    stats: BatchStats = field(default_factory=BatchStats)
    ood_score: np.ndarray | None = None  # [N]; None unless every member has OOD statistics


def fold_normalisation(weight: torch.Tensor, bias: torch.Tensor, shift: Sequence[float], scale: Sequence[float]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads whose plain output is the normalised reward (w.e + b - shift) / scale: the kernel
    then needs no normalisation arguments."""
    s = torch.tensor(list(scale), dtype=torch.float32)
    if (s <= 0).any():
        raise EnsembleFormatError("normalisation scale must be positive for every head")
    return weight / s[:, None], (bias - torch.tensor(list(shift), dtype=torch.float32)) / s


def member_scores(m: MemberHeads, hidden: torch.Tensor, index: LastTokenIndex
                  ) -> tuple[LastTokenScores, torch.Tensor | None]:
    """One member's heads on a trunk's hidden states (one `last_token_scores` launch: rewards,
    mean/var/min over its heads, epistemic term) and its OOD score (None without statistics)."""
    dev = hidden.device
    unc = m.unc_factor.to(dev) if m.unc_factor is not None else None
    out = last_token_scores(hidden, m.weight.to(dev), m.bias.to(dev), unc_factor=unc, **index.kernel_kwargs())
    ood = m.ood.score(index.gather(hidden)) if m.ood is not None else None  # [B, H] x [H, H]
    return out, ood


def combine_member_stats(
    counts: Sequence[int],
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    minima: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ensemble's mean, population variance and min over all K = sum(K_m) heads,
    from each member's own over its K_m heads (what the kernel computes per launch).

        mean = sum_m K_m mean_m / K
        var  = sum_m K_m (var_m + (mean_m - mean)^2) / K     (law of total variance)
        min  = min over members of min_m

    Exact, and stable: every term is non-negative, unlike E[x^2] - mean^2, which
    cancels when |mean| >> std. One member's statistics are returned as they are.
    Tensors [N], computed in their own dtype.
    """
    if len(means) == 1:
        return means[0], variances[0], minima[0]
    k = sum(counts)
    mean = sum(c * m for c, m in zip(counts, means, strict=True)) / k
    var = sum(c * (v + (m - mean) ** 2) for c, m, v in zip(counts, means, variances, strict=True)) / k
    return mean, var, torch.stack(list(minima)).amin(0)


def engine_output(scored: Sequence[tuple[LastTokenScores, torch.Tensor | None]], stats: BatchStats) -> EngineOutput:
    """Every member's scores (in member order) as the ensemble's EngineOutput on the host: all
    heads' rewards side by side, the kernel's per-member statistics combined over all heads, the
    epistemic term averaged over the members that have one, the OOD score over all members (None
    unless every member has one)."""
    per_member = [s for s, _ in scored]
    oods = [o for _, o in scored]
    ood = torch.stack([o.cpu() for o in oods]).mean(0).numpy() if all(o is not None for o in oods) else None
    rewards = torch.cat([s.rewards.cpu() for s in per_member], dim=1)
    # The kernel's per-member statistics (one source of truth), combined on the host in
    # float64: N values, so it costs nothing.
    host = [[getattr(s, name).cpu().double() for s in per_member] for name in ("mean", "var", "min")]
    mean, var, low = combine_member_stats([s.rewards.shape[1] for s in per_member], *host)
    eps = [s.epistemic.cpu() for s in per_member if s.epistemic is not None]
    epistemic = torch.stack(eps).mean(0) if eps else None
    return EngineOutput(
        rewards=rewards.float().numpy(),
        mean=mean.float().numpy(),
        var=var.float().numpy(),
        min=low.float().numpy(),
        epistemic=None if epistemic is None else epistemic.float().numpy(),
        stats=stats,
        ood_score=ood,
    )
