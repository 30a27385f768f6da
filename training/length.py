"""Length debiasing (`--length-debias`): a reward that cannot buy preference with length.

Preference labels reward longer answers (the AlpacaEval judge prefers the longer
answer in 82% of its pairs), and a Bradley-Terry model learns length first: a
policy then pads. Methods, chosen by cross-validation on train
(docs/training.md, "Length debiasing"):

- `balance`: pair weights such that, within each data set, the pairs whose
  chosen answer is the longer weigh as much in total as those whose chosen
  answer is the shorter (equal-length pairs keep their weight). Length then
  predicts nothing on the weighted data. Works for every ensemble kind.
- `decorrelate`: the heads are constrained to have zero covariance with the
  response length over the training answers: the (whitened) features'
  covariance direction with length is projected out before the fit, and
  every head is orthogonal to it. Frozen features only.
- `balance+decorrelate`: both.

Augmented pairs (training/augment.py) are left as they are: they exist to be
won by the real answer, whatever its length.
"""

from __future__ import annotations

import numpy as np
import torch

from rmserve.service.data.train_config import LengthDebias


def uses_balance(method: str) -> bool:
    return "balance" in method.split("+")


def uses_decorrelate(method: str) -> bool:
    return "decorrelate" in method.split("+")


def balanced_weights(weight: np.ndarray, length_diff: np.ndarray, groups: np.ndarray,
                     real: np.ndarray) -> np.ndarray:
    """Pair weights with, per group (data set), equal total weight on chosen-longer and chosen-shorter
    real pairs; the group's total is kept. A group with only one of the two sides is left alone."""
    w = np.asarray(weight, dtype=np.float64).copy()
    for g in np.unique(groups[real]):
        m = real & (groups == g)
        longer, shorter = m & (length_diff > 0), m & (length_diff < 0)
        wl, ws = w[longer].sum(), w[shorter].sum()
        if wl <= 0 or ws <= 0:
            continue
        half = (wl + ws) / 2
        w[longer] *= half / wl
        w[shorter] *= half / ws
    return w


def length_direction(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Unit vector u along Cov(x, length) over the rows of x [N, H]: a head w with w . u = 0 has
    zero covariance with length on these rows (log1p of the length: answers of 5 and 50 tokens
    differ more than answers of 500 and 545)."""
    v = torch.log1p(lengths.double())
    v = v - v.mean()
    c = (x.double() - x.double().mean(0)).T @ v / len(v)
    n = c.norm()
    if not torch.isfinite(n) or n <= 0:
        raise ValueError("response lengths do not vary over the training answers: nothing to decorrelate")
    return c / n


def project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x with its component along unit vector u removed (rows, or one vector)."""
    u = u.to(x.dtype)
    return x - (x @ u).unsqueeze(-1) * u if x.ndim == 2 else x - (x @ u) * u


__all__ = ["LengthDebias", "balanced_weights", "length_direction", "project_out", "uses_balance",
           "uses_decorrelate"]
