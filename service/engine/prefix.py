"""Find sequences that share a token prefix, so the engine encodes it once.

GRPO scores N completions of one prompt: most of their tokens are the prompt.
The engine runs a shared prefix once, expands its KV cache to the group and
runs only the suffixes. This module only decides the groups, from token ids:
sort the sequences, take the longest common prefix (LCP) of neighbours, and
split the sorted run where splitting saves more prefix tokens than it loses
(a run whose neighbours all share >= L tokens saves (n - 1) * L as one group;
its sub-runs that share more may save more apart).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

_WINDOW = 256


@dataclass(frozen=True)
class PrefixGroup:
    prefix_len: int
    members: list[int]      # indices into the input sequences


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_prefix_groups(seqs: Sequence[Sequence[int]], min_prefix: int = 16) -> tuple[list[PrefixGroup], list[int]]:
    """(groups sharing >= min_prefix tokens, indices left alone).

    Every sequence keeps at least its last token outside the prefix: that is
    where its score is read.
    """
    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))
    # usable shared length of neighbours: the LCP, capped so both keep a suffix token
    adj = [
        min(_lcp(seqs[a], seqs[b]), len(seqs[a]) - 1, len(seqs[b]) - 1)
        for a, b in itertools.pairwise(order)
    ]
    groups: list[PrefixGroup] = []
    alone: list[int] = []

    def best(lo: int, hi: int) -> tuple[int, list[PrefixGroup]]:
        """Savings and groups for order[lo:hi], whose neighbours share adj[lo:hi-1]."""
        if hi - lo < 2:
            return 0, []
        shared = min(adj[lo : hi - 1])
        if shared < min_prefix:  # split at the weakest links, solve each side
            total, out, start = 0, [], lo
            for k in range(lo, hi - 1):
                if adj[k] < min_prefix:
                    s, g = best(start, k + 1)
                    total, out, start = total + s, out + g, k + 1
            s, g = best(start, hi)
            return total + s, out + g
        whole = (hi - lo - 1) * shared
        total, out, start = 0, [], lo
        for k in range(lo, hi - 1):
            if adj[k] == shared:
                s, g = best(start, k + 1)
                total, out, start = total + s, out + g, k + 1
        s, g = best(start, hi)
        if total + s > whole:
            return total + s, out + g
        return whole, [PrefixGroup(shared, [order[i] for i in range(lo, hi)])]

    # Windows of the sorted order bound the recursion depth (one level per
    # distinct LCP length along a chain); a group cut by a window edge only
    # loses one shared prefix.
    for lo in range(0, len(order), _WINDOW):
        groups += best(lo, min(lo + _WINDOW, len(order)))[1]
    grouped = {i for g in groups for i in g.members}
    alone = [i for i in range(len(seqs)) if i not in grouped]
    return groups, alone
