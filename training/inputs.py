"""What training reads: the encoded pairs and their split, the frozen features or frozen
layers' output, and, per member, the pairs as tensors and the function that embeds sequences.

Plain functions the training loop (training/trainer.py) calls once each; they report
through the loop's `Reporter` and record their wall time in its `timing` dict.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.service.data.preferences import Filters, SqliteStore, training_rows
from rmserve.service.data.train_config import TrainConfig, parse_augment
from rmserve.service.engine.backbone import Backbone, cache_dir, find_layers, load_backbone
from rmserve.service.engine.padding import pad_token_id
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training import frozen_states
from rmserve.training.augment import ORIGIN_PREFIX, augment_pairs, is_augmented, prompt_key
from rmserve.training.data import (
    DataError,
    DataReport,
    Pair,
    dataset_names,
    load_pairs,
    pairs_from_rows,
)
from rmserve.training.encoding import EncodedPairs, encode_pairs
from rmserve.training.events import ProgressEvent, Reporter
from rmserve.training.features import cached_features
from rmserve.training.frozen_states import FrozenStates
from rmserve.training.length import (
    balanced_weights,
    length_direction,
    project_out,
    uses_balance,
    uses_decorrelate,
)
from rmserve.training.schedule import bootstrap_counts, calibration_split, derive_seed
from rmserve.training.tuning import Tuned, embed, make_trainable

EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # sequence ids -> [len(ids), H] last-token embeddings


@dataclass
class TrainingData:
    """The pairs encoded exactly as serving encodes them, and the split the temperature is fitted on."""

    report: DataReport
    source: dict[str, Any]      # path or store, and a sha256 (manifest.training["data"])
    backbone: Backbone
    encoder: PromptEncoder
    pairs: EncodedPairs
    fingerprint: str            # of the encoded pairs: a resume must see the same
    fit: np.ndarray             # pair indices the members train on
    calib: np.ndarray           # held-out pair indices for the temperature (may be empty)
    split_note: str
    real: np.ndarray            # [P] bool: a real pair, not an augmentation (training/augment.py)
    fit_weight: np.ndarray      # [P] the weights the loss uses (pair weights, length-balanced if asked)
    augment: dict[str, Any] | None = None  # what augmentation built (report["data"]["augment"])

    @property
    def real_seqs(self) -> np.ndarray:
        """Sequence ids of real pairs' answers: what normalisation and OOD statistics describe."""
        r = self.real
        return np.unique(np.concatenate([self.pairs.chosen[r], self.pairs.rejected[r]]))


@dataclass
class Frozen:
    """What does not change while members train, and its entry in the report."""

    features: torch.Tensor | None = None    # [N, H] last-token features of the frozen backbone
    prefix: FrozenStates | None = None      # hidden states entering the first trained layer
    info: dict[str, Any] | None = None      # report["features"]
    length_dir: torch.Tensor | None = None  # --length-debias decorrelate: the direction heads must not read


@dataclass
class FitPairs:
    """One member's view of the fit pairs; the per-head bootstrap counts act as pair weights."""

    fit: torch.Tensor        # [F] indices of the fit pairs
    chosen: torch.Tensor     # [P] sequence id of every pair's chosen response
    rejected: torch.Tensor   # [P]
    weight: torch.Tensor     # [F] pair weights, on the device
    margin: torch.Tensor     # [F] BT margins, on the device
    counts: torch.Tensor     # [K, F] bootstrap multiplicities, on the device


def load_data(cfg: TrainConfig) -> TrainingData:
    """Read the pairs (file or store), add the augmentation, load the backbone, encode, split off
    the temperature's slice, and weigh the pairs (length-balanced if asked)."""
    pairs, report, source = _read_pairs(cfg)
    augment = None
    if cfg.augment:
        extra, augment = augment_pairs(pairs, parse_augment(cfg.augment, cfg.augment_share), seed=cfg.seed,
                                       exclude=_held_out_prompts(cfg), weight=cfg.augment_weight)
        pairs = pairs + extra
    backbone = load_backbone(cfg.backbone, num_layers=cfg.num_layers)
    encoder = PromptEncoder(backbone.tokenizer, min(cfg.max_tokens, backbone.max_positions))
    encoded = encode_pairs(pairs, encoder, report, strict=cfg.strict)
    for f in source.get("files", []):  # pairs left per file after encoding
        f["pairs"] = sum(1 for o in encoded.origin if o == f["origin"])
    if augment is not None:  # pairs left per kind after encoding (one longer than max_tokens is dropped)
        for kind, entry in augment["kinds"].items():
            kept = sum(1 for o in encoded.origin if o == ORIGIN_PREFIX + kind)
            entry["dropped"], entry["pairs"] = entry["pairs"] - kept, kept
        augment["pairs"] = sum(e["pairs"] for e in augment["kinds"].values())
    fingerprint = encoded.fingerprint()
    real = np.array([not is_augmented(o) for o in encoded.origin], dtype=bool) if encoded.origin \
        else np.ones(len(encoded), dtype=bool)
    # the temperature's slice is sized in real pairs (what it is fitted on); augmentations follow their row
    fit, calib, note = calibration_split(encoded.source, cfg.calib_frac, cfg.min_calib_pairs, cfg.seed, real)
    weight = encoded.weight
    if uses_balance(cfg.length_debias):
        lc, lr = encoded.response_lengths()
        groups = np.array(encoded.origin) if encoded.origin else np.zeros(len(encoded), dtype=object)
        weight = balanced_weights(encoded.weight, lc - lr, groups, real)
    return TrainingData(report, source, backbone, encoder, encoded, fingerprint, fit, calib, note,
                        real=real, fit_weight=weight, augment=augment)


def _held_out_prompts(cfg: TrainConfig) -> set[str]:
    """Prompt keys of every dev file: augmentation never touches or reuses them."""
    keys: set[str] = set()
    for path in cfg.dev_files:
        got, _ = load_pairs(Path(path))
        keys.update(prompt_key(p.prompt) for p in got)
    return keys


def _read_pairs(cfg: TrainConfig) -> tuple[list[Pair], DataReport, dict[str, Any]]:
    """The pairs, their report, and what identifies the source (the files or the store, with sha256s).

    Several files are read one after the other and their pairs concatenated, each pair's `origin`
    the file's dataset name (`dataset_names`: its folder's name, else its stem); `files` lists
    every file with its sha256 and counts (one file: also `path` and `sha256`, as before). The
    store's pairs have origin "store".
    """
    if not cfg.from_store:
        paths = [Path(p) for p in cfg.data_files]
        names = dataset_names(paths)
        pairs, report, files = [], DataReport(), []
        for path, name in zip(paths, names, strict=True):
            got, rep = load_pairs(path, strict=cfg.strict)
            for p in got:
                p.origin = name
            pairs += got
            report.add(rep)
            files.append({"path": str(path.resolve()), "origin": name,
                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                          "rows": rep.rows, "pairs_read": rep.pairs, "skipped": rep.skipped})
        source: dict[str, Any] = {"files": files}
        if len(files) == 1:
            source = {"path": files[0]["path"], "sha256": files[0]["sha256"], **source}
        return pairs, report, source
    store = SqliteStore(cfg.from_store)
    try:
        filters = Filters(**(cfg.store_filters or {}))
        rows = list(training_rows(store, filters))
    finally:
        store.close()
    pairs, report = pairs_from_rows(rows, strict=cfg.strict)
    for p in pairs:
        p.origin = "store"
    if not pairs:
        raise DataError(f"the preference store {cfg.from_store} has no usable pairs for {filters}\n{report.summary()}")
    digest = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for _, r in rows).encode()).hexdigest()
    return pairs, report, {"store": str(Path(cfg.from_store).resolve()), "filters": cfg.store_filters or {},
                           "sha256": digest}


def device_for(cfg: TrainConfig) -> torch.device:
    """CPU for heads on cached features (nothing to gain from a GPU); else CUDA when asked or available."""
    if cfg.finetune_layers == 0:
        return torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


# -- computed once: frozen features, or the frozen layers' output ------------------------------


def frozen_inputs(cfg: TrainConfig, data: TrainingData, device: torch.device, rep: Reporter,
                  should_stop: Callable[[], bool], timing: dict[str, float]) -> Frozen:
    """Frozen backbone: its features; trained last layers: the frozen layers' output, if cached."""
    if cfg.finetune_layers == 0:
        return _frozen_features(cfg, data, rep, should_stop, timing)
    if cfg.prefix_cache:
        return _prefix_states(cfg, data, device, rep, should_stop, timing)
    return Frozen()


def _frozen_features(cfg: TrainConfig, data: TrainingData, rep: Reporter, should_stop: Callable[[], bool],
                     timing: dict[str, float]) -> Frozen:
    n = len(data.pairs.seqs)
    t0 = time.monotonic()
    rep.phase("features", f"last-token features of {n} sequences (frozen backbone)")
    feats, key, hit = cached_features(
        data.backbone, data.encoder, data.pairs.seqs, cache_dir=_cache_dir(cfg), token_budget=cfg.token_budget,
        progress=_progress(rep, "features", t0), should_stop=should_stop,
    )
    secs = time.monotonic() - t0
    timing["features_s"] = secs
    info = {"cache_key": key, "cache_hit": hit, "sequences": n, "seconds": round(secs, 3),
            "seconds_per_pair": round(secs / max(1, len(data.pairs)), 5)}
    rep.phase("features", f"{'cache hit' if hit else 'computed'} in {secs:.1f}s (key {key})")
    return Frozen(features=feats, info=info)


def _prefix_states(cfg: TrainConfig, data: TrainingData, device: torch.device, rep: Reporter,
                   should_stop: Callable[[], bool], timing: dict[str, float]) -> Frozen:
    model = data.backbone.model
    n_blocks = len(find_layers(model)[1])
    first = n_blocks - min(cfg.finetune_layers, n_blocks) if cfg.finetune_layers > 0 else 0
    if first == 0 or data.backbone.pooling != "last":
        rep.phase("features", "no prefix cache: every layer is trained" if first == 0
                  else "no prefix cache: it supports last-token (decoder) backbones only")
        return Frozen()
    t0 = time.monotonic()
    model.to(device)
    seqs, pad = data.pairs.seqs, pad_token_id(data.backbone.tokenizer)
    rep.phase("features", f"hidden states entering layer {first} of {n_blocks} for {len(seqs)} sequences")
    states, key, hit = frozen_states.cached(model, seqs, first, cache_dir=_cache_dir(cfg), pad_id=pad,
                                            token_budget=cfg.token_budget, progress=_progress(rep, "features", t0),
                                            should_stop=should_stop)
    problem = frozen_states.check(model, states, seqs, list(range(min(2, len(seqs)))), pad_id=pad)
    secs = time.monotonic() - t0
    timing["prefix_s"] = secs
    info = {"prefix_first_layer": first, "cache_key": key, "cache_hit": hit,
            "sequences": len(seqs), "tokens": int(states.offsets[-1]), "seconds": round(secs, 3),
            "seconds_per_pair": round(secs / max(1, len(data.pairs)), 5), "problem": problem}
    if problem:
        rep.phase("features", f"prefix cache not usable for this architecture ({problem}); "
                              "training runs full forwards")
        return Frozen(info=info)
    return Frozen(prefix=states, info=info)


def _progress(rep: Reporter, phase: str, t0: float) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        eta = (time.monotonic() - t0) / done * (total - done)
        rep.emit(ProgressEvent("step", phase, step=done, total=total, eta_s=round(eta, 1)))

    return report


def _cache_dir(cfg: TrainConfig) -> Path | None:
    return None if cfg.feature_cache == "" else Path(cfg.feature_cache or cache_dir() / "features")


# -- per member: the pairs as tensors, and what the heads read ----------------------------------


def fit_pairs(data: TrainingData, k: int, seed: int, bootstrap: bool, device: torch.device) -> FitPairs:
    """The fit pairs as tensors; bootstrap multiplicities give each head its own resample."""
    pairs, fit = data.pairs, torch.as_tensor(data.fit)
    return FitPairs(
        fit=fit,
        chosen=torch.as_tensor(pairs.chosen),
        rejected=torch.as_tensor(pairs.rejected),
        weight=torch.as_tensor(data.fit_weight[data.fit], dtype=torch.float32, device=device),
        margin=torch.as_tensor(pairs.margin[data.fit], dtype=torch.float32, device=device),
        counts=bootstrap_counts(k, len(fit), seed, bootstrap).to(device),
    )


def member_inputs(cfg: TrainConfig, data: TrainingData, frozen: Frozen, seed: int,
                  device: torch.device) -> tuple[EmbedFn, Tuned | None, tuple | None]:
    """What the heads read for sequence ids: whitened cached features, or the partly trainable backbone.

    Returns (embed_fn, the trainable backbone or None, (mu, sd) of the whitening or None).
    """
    pairs = data.pairs
    if frozen.features is not None:
        features = frozen.features
        fit_seqs = torch.unique(torch.as_tensor(np.concatenate([pairs.chosen[data.fit], pairs.rejected[data.fit]])))
        mu = features[fit_seqs].mean(0)
        sd = features[fit_seqs].std(0)
        # a dimension constant on train gets sd = inf: whitened to 0 and weight 0 once folded back,
        # rather than an untrained weight / ~0 that would explode on a served sample
        sd = torch.where(sd > 1e-6 * float(sd.max()), sd, torch.full_like(sd, float("inf")))
        x = (features - mu) / sd  # conditioning for the heads; folded back into them at the end
        if uses_decorrelate(cfg.length_debias):
            real_fit = np.intersect1d(fit_seqs.numpy(), data.real_seqs)
            frozen.length_dir = length_direction(x[real_fit], torch.as_tensor(pairs.response_tokens[real_fit]))
            x = project_out(x, frozen.length_dir).float()
        return (lambda ids: x[ids]), None, (mu, sd)
    tuned = make_trainable(data.backbone.model, layers=cfg.finetune_layers, lora_rank=cfg.lora_rank,
                           lora_alpha=cfg.lora_alpha, seed=derive_seed(seed, "lora"))
    tuned.model.to(device)
    pad = pad_token_id(data.backbone.tokenizer)
    model, states, pooling = tuned.model, frozen.prefix, data.backbone.pooling

    def embed_fn(ids: torch.Tensor) -> torch.Tensor:
        if states is not None:  # only the trained layers run
            return frozen_states.embed_from(model, states, ids.tolist(), pooling="last", device=device, amp=True)
        return embed(model, [pairs.seqs[i] for i in ids.tolist()], pad_id=pad, pooling=pooling,
                     device=device, amp=True)

    return embed_fn, tuned, None
