"""Pairs -> token ids, through the serving `PromptEncoder`.

Training must see exactly the token ids that serving will see (chat template,
left-truncated prompt, whole response), so this module only calls the
encoder: it never tokenizes on its own. Identical conversations (a response of a
ranked list appears in several pairs) are encoded and embedded once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from rmserve.service.engine.errors import InvalidInput
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training.augment import is_augmented
from rmserve.training.data import DataError, DataReport, Message, Pair


@dataclass
class EncodedPairs:
    seqs: list[list[int]]     # unique sequences
    chosen: np.ndarray        # [P] index into seqs
    rejected: np.ndarray      # [P]
    weight: np.ndarray        # [P] float64
    margin: np.ndarray        # [P] float64
    source: list[str]         # [P] file:line
    truncated: int            # unique sequences whose prompt was cut
    # [N] tokens of each sequence's response part (prompt excluded), as encoded for the model
    response_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    origin: list[str] = field(default_factory=list)  # [P] the dataset each pair came from (Pair.origin)

    def __len__(self) -> int:
        return len(self.chosen)

    def response_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Response tokens of each pair's chosen and of its rejected side: [P] each."""
        if len(self.response_tokens) != len(self.seqs):
            raise ValueError("these pairs were encoded without response lengths")
        return self.response_tokens[self.chosen], self.response_tokens[self.rejected]

    def origins(self) -> list[str]:
        """The datasets these pairs come from, in order of first appearance."""
        return list(dict.fromkeys(self.origin))

    def pair_lengths(self) -> np.ndarray:
        """Tokens of the longer side of each pair: what a batch of pairs pads to."""
        lens = np.array([len(s) for s in self.seqs])
        return np.maximum(lens[self.chosen], lens[self.rejected])

    def subset(self, idx: np.ndarray) -> EncodedPairs:
        """The pairs at `idx`; keeps the full sequence table (indices stay valid)."""
        return EncodedPairs(
            self.seqs, self.chosen[idx], self.rejected[idx], self.weight[idx], self.margin[idx],
            [self.source[i] for i in idx], self.truncated, self.response_tokens,
            [self.origin[i] for i in idx] if self.origin else [],
        )

    def fingerprint(self) -> str:
        """Hash of everything training reads: sequences, pairing, weights, margins, and which
        dataset each pair came from when there are several (a resume must see the same file list;
        one file may move, as its pairs' origin is then the only one: with augmentation, which
        pairs are augmented and of which kind, not the one file's name)."""
        h = hashlib.sha256()
        for s in self.seqs:
            h.update(np.asarray(s, dtype=np.int64).tobytes())
            h.update(b"|")
        for a in (self.chosen, self.rejected):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        for a in (self.weight, self.margin):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        if len({o for o in self.origin if not is_augmented(o)}) > 1:
            h.update(json.dumps(self.origin).encode())
        elif len(set(self.origin)) > 1:  # one data file and its augmentations
            h.update(json.dumps([o if is_augmented(o) else "" for o in self.origin]).encode())
        return h.hexdigest()


def encode_pairs(
    pairs: list[Pair], encoder: PromptEncoder, report: DataReport, *, strict: bool = False
) -> EncodedPairs:
    """Encode both sides of every pair; a side the encoder rejects skips the pair (reported).

    An augmented pair (training/augment.py) is no row of the data: if it cannot be encoded (a
    padded answer longer than the model reads) it is dropped, neither reported as an error of
    the data nor raised under `strict`; the augmentation report counts what was kept.
    """
    index: dict[str, int] = {}
    seqs: list[list[int]] = []
    cut: list[bool] = []
    response: list[int] = []
    keep, chosen, rejected = [], [], []

    def seq_id(msgs: list[Message], where: str) -> int:
        key = json.dumps(msgs, ensure_ascii=False)
        if key not in index:
            enc = encoder.conversation(msgs, where=where)
            index[key] = len(seqs)
            seqs.append(enc.ids)
            cut.append(enc.truncated)
            response.append(encoder.response_tokens(msgs, where=where))
        return index[key]

    for i, p in enumerate(pairs):
        try:
            c = seq_id(p.chosen_conversation, f"{p.source} (chosen)")
            r = seq_id(p.rejected_conversation, f"{p.source} (rejected)")
        except InvalidInput as e:
            if is_augmented(p.origin):
                continue
            if strict:
                raise DataError(str(e)) from None
            report.error("cannot encode", p.source, str(e).removeprefix(p.source).lstrip(" :"))
            continue
        keep.append(i)
        chosen.append(c)
        rejected.append(r)
    report.pairs = len(keep)
    if not keep:
        raise DataError(f"no pair could be encoded\n{report.summary()}")
    # drop sequences of pairs whose other side failed, so statistics see only used ones
    used = sorted(set(chosen) | set(rejected))
    remap = np.full(len(seqs), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return EncodedPairs(
        seqs=[seqs[i] for i in used],
        chosen=remap[np.array(chosen, dtype=np.int64)],
        rejected=remap[np.array(rejected, dtype=np.int64)],
        weight=np.array([pairs[i].weight for i in keep], dtype=np.float64),
        margin=np.array([pairs[i].margin for i in keep], dtype=np.float64),
        source=[pairs[i].source for i in keep],
        truncated=sum(cut[i] for i in used),
        response_tokens=np.array([response[i] for i in used], dtype=np.int64),
        origin=[pairs[i].origin for i in keep],
    )
