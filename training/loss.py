"""The Bradley-Terry loss with per-pair margin, weights and optional reward centring."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Mean over heads of each head's weighted mean of -log σ(r_c - r_r - margin).

    r_*: [B] or [B, K] (K heads). margin: [B]. weight: [B] or [B, K] (pair
    weight × the head's bootstrap count). Each head is normalised by its own
    weight in the batch, so a head whose bootstrap sample holds few of these
    pairs is not scaled down. `center_coef` adds coef × weighted mean of
    (r_c + r_r)², TRL's `center_rewards_coefficient`, which pins the reward
    scale's free offset near zero.
    """
    rc = r_chosen if r_chosen.ndim == 2 else r_chosen[:, None]
    rr = r_rejected if r_rejected.ndim == 2 else r_rejected[:, None]
    d = rc - rr
    if margin is not None:
        d = d - margin.to(d.dtype)[:, None]
    w = torch.ones_like(d) if weight is None else weight.to(d.dtype)
    if w.ndim == 1:
        w = w[:, None]
    w = w.expand_as(d)
    per_pair = -F.logsigmoid(d)
    if center_coef:
        per_pair = per_pair + center_coef * (rc + rr) ** 2
    total = w.sum(0)
    head_loss = (w * per_pair).sum(0) / total.clamp_min(1e-12)
    return head_loss.mean()
