"""Fused last-token scoring: gather -> K heads -> mean/var/min/conservative/epistemic.

This file holds the torch reference and the dispatcher; the Triton kernel is
added beside them (Liger-Kernel style: kernel + launcher + reference in one file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LastTokenScores:
    rewards: torch.Tensor              # [B, K] float32
    mean: torch.Tensor                 # [B]
    var: torch.Tensor                  # [B] population variance over heads
    min: torch.Tensor                  # [B]
    conservative: torch.Tensor         # [B] mean - lam * var
    epistemic: torch.Tensor | None     # [B] ||L^T e||, or None


def _last_index(hidden: torch.Tensor, lengths: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    if cu_seqlens is not None:
        if hidden.ndim != 2:
            raise ValueError("with cu_seqlens, hidden must be packed [T_total, H]")
        return cu_seqlens[1:].long() - 1
    if lengths is None or hidden.ndim != 3:
        raise ValueError("give hidden [B, T, H] with lengths [B], or hidden [T_total, H] with cu_seqlens [B+1]")
    return lengths.long() - 1


def last_token_scores_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    shift: float = 0.0,
    scale: float = 1.0,
    unc_factor: torch.Tensor | None = None,
    lam: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> LastTokenScores:
    """Plain torch; `compute_dtype=torch.float64` makes it the test oracle."""
    idx = _last_index(hidden, lengths, cu_seqlens)
    if cu_seqlens is not None:
        last = hidden[idx]
    else:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    e = last.to(compute_dtype)
    rewards = (e @ weight.to(compute_dtype).T + bias.to(compute_dtype) - shift) / scale
    mean = rewards.mean(dim=1)
    var = rewards.var(dim=1, unbiased=False)
    epistemic = None
    if unc_factor is not None:
        epistemic = (e @ unc_factor.to(compute_dtype)).norm(dim=1)
    out_dtype = torch.float32 if compute_dtype != torch.float64 else torch.float64
    return LastTokenScores(
        rewards=rewards.to(out_dtype),
        mean=mean.to(out_dtype),
        var=var.to(out_dtype),
        min=rewards.min(dim=1).values.to(out_dtype),
        conservative=(mean - lam * var).to(out_dtype),
        epistemic=None if epistemic is None else epistemic.to(out_dtype),
    )


def last_token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    shift: float = 0.0,
    scale: float = 1.0,
    unc_factor: torch.Tensor | None = None,
    lam: float = 0.0,
) -> LastTokenScores:
    """Rewards and ensemble statistics at each sequence's last real token.

    hidden is [B, T, H] right-padded with `lengths` [B], or packed [T_total, H]
    with `cu_seqlens` [B+1]. reward_k = (e . weight_k + bias_k - shift) / scale.
    """
    return last_token_scores_reference(
        hidden, weight, bias, lengths=lengths, cu_seqlens=cu_seqlens, shift=shift, scale=scale,
        unc_factor=unc_factor, lam=lam,
    )
