"""Out-of-distribution score: how far a sample's last-token embedding lies from the training data's.

A member with OOD statistics stores the mean `mu` [H] of its training
embeddings and a whitening factor `W` [H, H] with `W W^T` = the inverse of
their (shrunk) covariance. The score is the Mahalanobis distance per dimension,

    ood_score(e) = || (e - mu) W || / sqrt(H)

about 1 for a typical training sample whatever H is, and large for text the
heads never saw (code, other languages, random tokens: docs/uncertainty.md has
the measurements that chose it over ensemble std and the epistemic term). The
model's score is the mean over members that have statistics; `ood` compares it
with a threshold that is a quantile of held-out in-distribution scores,
computed at training time (training/ood.py) and kept in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OodStats:
    mean: torch.Tensor    # [H] float32
    factor: torch.Tensor  # [H, H] float32: whitening, factor @ factor.T = inverse covariance

    def __post_init__(self) -> None:
        h = self.mean.shape[0]
        if self.mean.ndim != 1 or self.factor.shape != (h, h):
            raise ValueError(f"OOD statistics must be mean [H] and factor [H, H], got "
                             f"{tuple(self.mean.shape)} and {tuple(self.factor.shape)}")

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """[N, H] embeddings (any float dtype, any device) -> [N] float32 scores."""
        z = (features.float() - self.mean.to(features.device)) @ self.factor.to(features.device)
        return z.norm(dim=1) / math.sqrt(self.mean.shape[0])

    def to(self, device: str | torch.device) -> OodStats:
        return OodStats(self.mean.to(device), self.factor.to(device))


@dataclass(frozen=True)
class OodCalibration:
    """The model-level flag: `ood = ood_score > threshold`."""

    threshold: float
    quantile: float           # of the held-out in-distribution scores the threshold is
    calibrated_on: str        # what those scores came from (data set, split, count)
    num_calibration: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> OodCalibration:
        return cls(threshold=float(d["threshold"]), quantile=float(d["quantile"]),
                   calibrated_on=str(d.get("calibrated_on", "")), num_calibration=int(d.get("num_calibration", 0)))
