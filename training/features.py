"""Frozen-backbone features: last-token embeddings computed once, through the serving engine, cached on disk.

With a frozen backbone the heads only ever see these [N, H] vectors, so the
expensive forward runs once per (data, backbone) and every later run (another
seed, another K, a resumed job) reads the cache. They come from
`ScoringEngine.features`, so the heads train on exactly what serving computes.
The cache key hashes the token ids and the backbone's weights (not its path):
a changed checkpoint at the same path cannot serve stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
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
    """(features [N, H], cache key, whether it was a cache hit)."""
    key = hashlib.sha256(
        (backbone_fingerprint(backbone.model) + sequences_fingerprint(seqs)).encode()
    ).hexdigest()[:32]
    path = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            feats = load_file(path)["features"]
            if feats.shape == (len(seqs), backbone.hidden_size):
                return feats, key, True
        except Exception as e:  # a corrupt cache file is recomputed, never trusted
            log.warning("ignoring unreadable feature cache %s: %s", path, e)
    feats = compute_features(
        feature_engine(backbone, encoder, token_budget), seqs, progress=progress, should_stop=should_stop
    )
    if path is not None:
        atomic_save_tensors(path, {"features": feats}, metadata={"backbone": backbone.name, "n": str(len(seqs))})
    return feats, key, False
