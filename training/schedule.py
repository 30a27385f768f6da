"""Seeds, data order, held-out split and learning-rate schedule: everything that makes a run reproducible.

Every random choice draws from its own generator seeded by `derive_seed(seed,
what, ...)`, never from torch's global RNG: runs are reproducible, resuming at
any step replays the same order, and a trainer running in a server thread does
not disturb (or get disturbed by) anything else in the process.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def calibration_split(
    sources: list[str], frac: float, min_pairs: int, seed: int, counted: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """(fit, held-out) pair indices, split by source row so a ranked list stays on one side.

    The held-out part of TRAIN fits the temperature (never dev). Returns an empty
    held-out set, with the reason, when it would hold fewer than `min_pairs`.
    `counted` [P] bool: the pairs that count towards `frac` and `min_pairs` (the real
    ones: the temperature is fitted on those only); the others (augmentations) go with
    their source's side. Default: every pair.
    """
    n_all = len(sources)
    counts = np.ones(n_all, dtype=bool) if counted is None else np.asarray(counted, dtype=bool)
    n = int(counts.sum())
    everything = np.arange(n_all)
    if frac <= 0:
        return everything, everything[:0], "no held-out split (calib_frac = 0)"
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s, []).append(i)
    keys = list(groups)
    order = torch.randperm(len(keys), generator=generator(seed, "calibration")).tolist()
    held: list[int] = []
    n_held = 0
    for j in order:
        if n_held >= frac * n:
            break
        held.extend(groups[keys[j]])
        n_held += int(counts[groups[keys[j]]].sum())
    if n_held < min_pairs:
        return everything, everything[:0], (
            f"no temperature: a {frac:.0%} held-out split has {n_held} pairs, fewer than {min_pairs}"
        )
    held_set = set(held)
    fit = np.array([i for i in range(n_all) if i not in held_set], dtype=np.int64)
    others = f" (and {len(held) - n_held} augmented pairs of theirs)" if len(held) > n_held else ""
    return fit, np.array(sorted(held), dtype=np.int64), f"{n_held} pairs of train held out for the temperature{others}"


def length_sorted_batches(
    lengths: np.ndarray, batch_size: int, g: torch.Generator, window: int = 64
) -> list[np.ndarray]:
    """Positions 0..n-1 in batches of similar length: shuffle, sort inside windows
    of `window` batches, cut, shuffle the batches. Little padding, still a random order."""
    n = len(lengths)
    perm = torch.randperm(n, generator=g).numpy()
    span = batch_size * window
    batches: list[np.ndarray] = []
    for start in range(0, n, span):
        chunk = perm[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def lr_scale(step: int, total: int, warmup_frac: float) -> float:
    """Linear warmup, then cosine decay to 10% (nanoGPT's schedule)."""
    warm = math.ceil(warmup_frac * total) if warmup_frac > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def bootstrap_counts(num_heads: int, n: int, seed: int, enabled: bool) -> torch.Tensor:
    """[K, n] multiplicities: head k trains on its own resample with replacement of the n pairs."""
    if not enabled:
        return torch.ones(num_heads, n)
    rows = [
        torch.bincount(torch.randint(n, (n,), generator=generator(seed, "bootstrap", k)), minlength=n)
        for k in range(num_heads)
    ]
    return torch.stack(rows).float()
