"""Frozen-backbone features: last-token embeddings computed once, through the serving engine, cached on disk.

With a frozen backbone the heads only ever see these [N, H] vectors, so the
expensive forward runs once per (data, backbone) and every later run (another
seed, another K, a resumed job) reads the cache. They come from
`ScoringEngine.features`, so the heads train on exactly what serving computes.
The cache is keyed per sequence (a hash of its token ids) under a hash of the
backbone's weights (not its path): a changed checkpoint at the same path cannot
serve stale features, and a new data file computes only its new sequences.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rmserve.service.engine.backbone import Backbone
from rmserve.service.engine.ensemble import atomic_save_tensors
from rmserve.service.engine.model import Member, RewardModel
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training.events import TrainingStopped

log = logging.getLogger(__name__)


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and every weight's bytes (~1 s per 500 MB)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sequences_fingerprint(seqs: list[list[int]]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def feature_engine(backbone: Backbone, encoder: PromptEncoder, token_budget: int) -> ScoringEngine:
    """An engine over the bare backbone (a dummy head): only `features()` is used."""
    h = backbone.hidden_size
    model = RewardModel(
        name="features", version="0", kind="heads",
        members=[Member("member0", backbone, torch.zeros(1, h), torch.zeros(1), None)],
        encoder=encoder, dtype=next(backbone.model.parameters()).dtype, max_tokens=encoder.max_tokens,
        uncertainty_penalty=0.0, shift=[0.0], scale=[1.0], source=backbone.name,
    )
    return ScoringEngine(model, token_budget=token_budget)


def compute_features(
    engine: ScoringEngine,
    seqs: list[list[int]],
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    chunk_tokens: int = 32768,
    member: int = 0,
) -> torch.Tensor:
    """engine.features over length-sorted chunks, so progress and cancellation are seen between chunks."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), engine.model.members[member].backbone.hidden_size)
    done, chunk, tokens = 0, [], 0
    for pos, i in enumerate(order):
        chunk.append(i)
        tokens += len(seqs[i])
        if tokens >= chunk_tokens or pos == len(order) - 1:
            if should_stop is not None and should_stop():
                raise TrainingStopped("stopped while computing features")
            out[chunk] = engine.features([seqs[j] for j in chunk], member=member)
            done += len(chunk)
            chunk, tokens = [], 0
            if progress is not None:
                progress(done, len(seqs))
    return out


def sequence_keys(seqs: list[list[int]]) -> torch.Tensor:
    """[N, 16] uint8: the first 16 bytes of each sequence's sha256 (of its int64 token ids)."""
    keys = np.zeros((len(seqs), 16), dtype=np.uint8)
    for i, s in enumerate(seqs):
        keys[i] = np.frombuffer(hashlib.sha256(np.asarray(s, dtype=np.int64).tobytes()).digest()[:16], np.uint8)
    return torch.from_numpy(keys)


class FeatureCache:
    """Last-token features keyed per sequence, in shards under `<dir>/<backbone key>/`.

    Each shard is a safetensors file with `keys` [n, 16] (sequence hashes) and `features`
    [n, H]; a lookup reads every shard of the backbone and computes only the sequences no
    shard holds, then writes those as one new shard. So adding a data file, an augmentation
    kind or a dev set computes only what is new. Shards are written atomically; an
    unreadable one is skipped (its sequences are recomputed), never trusted.
    """

    def __init__(self, root: Path, backbone: Backbone):
        self.backbone_key = backbone_fingerprint(backbone.model)[:32]
        self.dir = root / self.backbone_key
        self.hidden = backbone.hidden_size

    def _index(self) -> dict[bytes, tuple[Path, int]]:
        index: dict[bytes, tuple[Path, int]] = {}
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = f.get_tensor("keys").numpy()
                    shape = f.get_slice("features").get_shape()
                if keys.shape != (shape[0], 16) or shape[1] != self.hidden:
                    raise ValueError(f"keys {keys.shape} / features {shape} do not match")
            except Exception as e:  # a corrupt shard is recomputed, never trusted
                log.warning("ignoring unreadable feature shard %s: %s", path, e)
                continue
            for row, k in enumerate(keys):
                index.setdefault(k.tobytes(), (path, row))
        return index

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(features [N, H] with found rows filled, boolean mask of the rows found)."""
        out = torch.zeros(len(keys), self.hidden)
        found = np.zeros(len(keys), dtype=bool)
        index = self._index()
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys.numpy()):
            hit = index.get(k.tobytes())
            if hit is not None:
                by_shard.setdefault(hit[0], []).append((i, hit[1]))
        for path, rows in by_shard.items():
            feats = load_file(path)["features"]
            dst, src = zip(*rows, strict=True)
            out[list(dst)] = feats[list(src)].float()
            found[list(dst)] = True
        return out, found

    def store(self, keys: torch.Tensor, features: torch.Tensor) -> Path:
        digest = hashlib.sha256(keys.numpy().tobytes()).hexdigest()[:24]
        path = self.dir / f"shard-{digest}.safetensors"
        atomic_save_tensors(path, {"keys": keys.contiguous(), "features": features.contiguous()},
                            metadata={"n": str(len(keys))})
        return path


def cached_features(
    backbone: Backbone,
    encoder: PromptEncoder,
    seqs: list[list[int]],
    *,
    cache_dir: Path | None,
    token_budget: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, str, bool]:
    """(features [N, H], the backbone's cache key, whether every sequence was a cache hit).

    Progress counts only the sequences that must be computed.
    """
    keys = sequence_keys(seqs)
    cache = FeatureCache(cache_dir, backbone) if cache_dir is not None else None
    if cache is not None:
        feats, found = cache.lookup(keys)
    else:
        feats, found = torch.zeros(len(seqs), backbone.hidden_size), np.zeros(len(seqs), dtype=bool)
    missing = np.flatnonzero(~found)
    if len(missing):
        new = compute_features(feature_engine(backbone, encoder, token_budget), [seqs[i] for i in missing],
                               progress=progress, should_stop=should_stop)
        feats[torch.as_tensor(missing)] = new
        if cache is not None:
            # one shard per distinct new sequence (duplicates within seqs share a key)
            _, first = np.unique(keys[missing].numpy(), axis=0, return_index=True)
            cache.store(keys[missing][first], new[first])
    key = cache.backbone_key if cache is not None else "off"
    return feats, key, len(missing) == 0
