"""Typed results: frozen dataclasses, so callers never touch protobuf messages.

Results are immutable so that a trainer can cache or share them without
aliasing surprises; `ScoreResults` is still a plain `list` (one entry per
sample, in order) that also hands out numpy arrays of the batch fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["CompareResult", "ModelInfo", "ScoreArrays", "ScoreResult", "ScoreResults", "as_arrays"]


@dataclass(frozen=True)
class ScoreResult:
    """The ensemble's score for one sample (README.md, "API": each field defined)."""

    reward: float
    """Mean over heads, after normalisation."""
    std: float
    """Population std over heads: ensemble disagreement."""
    min: float
    """Worst head (worst-case optimisation)."""
    conservative: float
    """reward - lambda * std**2 (uncertainty-weighted optimisation)."""
    epistemic: float | None = None
    """Distance from the training distribution; None when the model has no statistics for it."""
    members: tuple[float, ...] | None = None
    """Per-head rewards; None unless `return_members=True`."""
    num_tokens: int = 0
    """Tokens actually scored."""
    truncated: bool = False
    """The prompt was cut from the left to fit the token limit."""
    id: str = ""
    """The caller's sample id, echoed back."""
    ood_score: float | None = None
    """Distance per dimension of the sample's embedding from the training data's (about 1 in
    distribution); None when the model has no statistics for it (docs/uncertainty.md)."""
    ood: bool | None = None
    """ood_score above the model's calibrated threshold (`ModelInfo.ood_threshold`); None without one."""
    model_version: str = ""
    """The model version that scored this sample (during a rolling activation, a call the SDK
    splits into several requests may be scored by two versions: docs/scaling.md)."""


@dataclass(frozen=True)
class ScoreArrays:
    """Batch fields of many `ScoreResult`s as numpy arrays (what a PPO loop wants)."""

    reward: np.ndarray
    std: np.ndarray
    min: np.ndarray
    conservative: np.ndarray
    epistemic: np.ndarray | None
    """float32, NaN where a result had none; None when no result had one."""
    members: np.ndarray | None
    """(num_samples, num_heads), or None unless every result carries members."""
    num_tokens: np.ndarray
    truncated: np.ndarray
    ood_score: np.ndarray | None = None
    """float32, NaN where a result had none; None when no result had one."""
    ood: np.ndarray | None = None
    """bool, where every result has a flag; None otherwise."""


def as_arrays(results: Iterable[ScoreResult]) -> ScoreArrays:
    """Stack the batch fields of `results` into numpy arrays, in order."""
    rs = list(results)

    def col(name: str, dtype: type) -> np.ndarray:
        return np.fromiter((getattr(r, name) for r in rs), dtype=dtype, count=len(rs))

    def optional(name: str) -> np.ndarray | None:
        if not any(getattr(r, name) is not None for r in rs):
            return None
        return np.array([np.nan if getattr(r, name) is None else getattr(r, name) for r in rs], np.float32)

    epi = optional("epistemic")
    members = None
    if rs and all(r.members is not None for r in rs) and len({len(r.members or ()) for r in rs}) == 1:
        members = np.array([r.members for r in rs], np.float32)
    return ScoreArrays(
        reward=col("reward", np.float32),
        std=col("std", np.float32),
        min=col("min", np.float32),
        conservative=col("conservative", np.float32),
        epistemic=epi,
        members=members,
        num_tokens=col("num_tokens", np.int64),
        truncated=col("truncated", np.bool_),
        ood_score=optional("ood_score"),
        ood=col("ood", np.bool_) if rs and all(r.ood is not None for r in rs) else None,
    )


class ScoreResults(list[ScoreResult]):
    """`list[ScoreResult]` (one per sample, in order) plus numpy views and the model version."""

    model_version: str

    def __init__(self, results: Iterable[ScoreResult] = (), model_version: str = ""):
        super().__init__(results)
        self.model_version = model_version

    def arrays(self) -> ScoreArrays:
        """All batch fields as numpy arrays."""
        return as_arrays(self)

    @property
    def model_versions(self) -> tuple[str, ...]:
        """Every model version that scored these results, in order of first appearance: one
        normally, two when a rolling activation landed between the requests of one call
        (`model_version` is then the last one)."""
        return tuple(dict.fromkeys(r.model_version for r in self if r.model_version))

    @property
    def rewards(self) -> np.ndarray:
        """The `reward` of every result, as float32 (the common case, without the other fields)."""
        return np.array([r.reward for r in self], np.float32)

    @property
    def stds(self) -> np.ndarray:
        return np.array([r.std for r in self], np.float32)


@dataclass(frozen=True)
class CompareResult:
    """P(a > b) = sigmoid(r_a - r_b), for the ensemble and per head."""

    prob: float
    member_probs: tuple[float, ...]
    a: ScoreResult
    b: ScoreResult
    model_version: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What the server is serving; `shift`/`scale` are the per-head normalisation."""

    name: str
    version: str
    kind: str
    num_members: int
    num_heads: int
    backbone: str
    max_tokens: int
    dtype: str
    shift: tuple[float, ...]
    scale: tuple[float, ...]
    default_uncertainty_penalty: float
    has_epistemic: bool
    max_samples_per_request: int
    backbone_layers: int = 0   # layers the backbone runs (its layer cut); 0 from servers that predate it
    ood_threshold: float | None = None
    """`ood` = `ood_score` > this; None when the model has no OOD statistics."""
    ood_quantile: float | None = None
    """The quantile of held-out in-distribution scores the threshold is (0.99: 1% false alarms)."""
    ood_calibrated_on: str = ""
    """What those held-out scores came from."""
