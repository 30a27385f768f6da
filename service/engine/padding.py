"""Right-padded batches of token ids: the one place that builds them.

Right padding keeps every sequence at positions 0..n-1, so a sequence's last
real token is at `lengths - 1` (never found by searching for the pad token,
which is EOS in many models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 where it has none: padded positions are masked
    out of attention and never read, so any valid id will do."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, T] long, attention_mask [B, T] long, lengths [B] long), T the longest length."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    t = int(lengths.max())
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    if device is not None:
        return ids.to(device), mask.to(device), lengths.to(device)
    return ids, mask, lengths
