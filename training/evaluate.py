"""Evaluate a served model on preference data, through the serving path.

The model is loaded with `load_model` and scored with `ScoringEngine`, the
conversations encoded by the model's own `PromptEncoder`: the numbers describe
what serving returns (normalisation, temperature, truncation included), not
what the trainer believed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.service.engine.ensemble import atomic_write_bytes
from rmserve.service.engine.model import RewardModel, load_model
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.training.data import dataset_names, load_pairs
from rmserve.training.encoding import encode_pairs
from rmserve.training.metrics import format_report, pair_report

# Margins within this of zero may change side with the kernels of the CPU or GPU
# that serves (bf16 GEMM tiling, AMX or not, attention path): 2x the largest
# drift measured between two valid bf16 paths on one CPU (0.051 on the default's
# dev pairs; bench/results/eval-reproducibility-2026-12-06.md), scaled by each
# dtype's mantissa for float16, and far above float32's ~1e-5. Measured on CPU's mixed bf16;
# plain bf16 on a GPU moves margins more, so its band may be too narrow (not measured here).
MARGIN_NOISE = {"bfloat16": 0.1, "float16": 0.02, "float32": 1e-3}


def default_report_path(model_dir: str | Path, data: str | Path) -> Path:
    """`<model>/eval_<data file stem>.json`: the report lives next to the checkpoint it describes."""
    return Path(model_dir) / f"eval_{Path(data).stem}.json"


def default_report_paths(model_dir: str | Path, datas: list[str | Path]) -> list[Path]:
    """`default_report_path` of each file; files whose stems are equal (a/dev.jsonl, b/dev.jsonl)
    get `eval_<dataset name>_<stem>.json` instead, so that no report overwrites another."""
    stems = Counter(Path(d).stem for d in datas)
    return [default_report_path(model_dir, d) if stems[Path(d).stem] == 1
            else Path(model_dir) / f"eval_{name}_{Path(d).stem}.json"
            for d, name in zip(datas, dataset_names(datas), strict=True)]


@dataclass
class PairRewards:
    """Every pair's normalised rewards as served: chosen/rejected are [P, K] (K heads)."""

    chosen: np.ndarray
    rejected: np.ndarray
    weight: np.ndarray
    head_names: list[str]
    epistemic_chosen: np.ndarray | None
    epistemic_rejected: np.ndarray | None
    data_report: dict[str, Any]
    chosen_tokens: np.ndarray | None = None     # [P] response tokens (prompt excluded), as encoded
    rejected_tokens: np.ndarray | None = None

    @property
    def margins(self) -> np.ndarray:
        """d = mean-over-heads reward of chosen minus rejected, per pair."""
        return self.chosen.mean(1) - self.rejected.mean(1)


def score_pairs(
    rm: RewardModel,
    data: str | Path,
    *,
    strict: bool = False,
    token_budget: int = 4096,
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> PairRewards:
    """Score both sides of every pair of `data` through the serving engine."""
    pairs, data_report = load_pairs(data, strict=strict)
    enc = encode_pairs(pairs, rm.encoder, data_report, strict=strict)
    engine = ScoringEngine(rm, token_budget=token_budget)

    # length-sorted chunks: the engine batches inside each, progress is seen between them
    order = sorted(range(len(enc.seqs)), key=lambda i: len(enc.seqs[i]))
    rewards = np.empty((len(enc.seqs), rm.num_heads), dtype=np.float64)
    epistemic = np.empty(len(enc.seqs)) if rm.has_epistemic else None
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        out = engine.score([enc.seqs[i] for i in idx])
        rewards[idx] = out.rewards
        if epistemic is not None and out.epistemic is not None:
            epistemic[idx] = out.epistemic
        if progress is not None:
            progress(min(start + chunk, len(order)), len(order))

    chosen_tokens, rejected_tokens = enc.response_lengths()
    return PairRewards(
        chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        chosen=rewards[enc.chosen], rejected=rewards[enc.rejected], weight=enc.weight,
        head_names=[f"{m.name}/head{j}" for m in rm.members for j in range(m.weight.shape[0])],
        epistemic_chosen=None if epistemic is None else epistemic[enc.chosen],
        epistemic_rejected=None if epistemic is None else epistemic[enc.rejected],
        data_report={**data_report.to_dict(), "sequences": len(enc.seqs), "truncated_sequences": enc.truncated},
    )


def evaluate(
    model: str | Path | RewardModel,
    data: str | Path,
    *,
    strict: bool = False,
    token_budget: int = 4096,
    chunk: int = 256,
    report_path: str | Path | None = None,
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Score every pair of `data` with `model` (a directory or a loaded model) -> report dict.

    The report is written as JSON to `report_path` (default: next to the model
    directory) unless write=False or the model was passed already loaded with no path.
    """
    t0 = time.monotonic()
    rm = model if isinstance(model, RewardModel) else load_model(model, dtype=dtype)
    pr = score_pairs(rm, data, strict=strict, token_budget=token_budget, chunk=chunk, progress=progress)
    report = pair_report(
        pr.chosen, pr.rejected, pr.weight, head_names=pr.head_names,
        epistemic_chosen=pr.epistemic_chosen, epistemic_rejected=pr.epistemic_rejected,
        tie_tolerance=MARGIN_NOISE.get(rm.dtype_name, 1e-3),
        chosen_tokens=pr.chosen_tokens, rejected_tokens=pr.rejected_tokens,
    )
    report.update({
        "model": {"name": rm.name, "version": rm.version, "source": rm.source, "kind": rm.kind, "dtype": rm.dtype_name},
        "data": str(data),
        "data_report": pr.data_report,
        "seconds": round(time.monotonic() - t0, 3),
    })
    target = report_path or (None if isinstance(model, RewardModel) else default_report_path(model, data))
    if write and target is not None:
        atomic_write_bytes(Path(target), (json.dumps(report, indent=2) + "\n").encode())
        report["report_path"] = str(target)
    return report


def evaluate_many(
    model: str | Path,
    datas: list[str | Path],
    *,
    strict: bool = False,
    token_budget: int = 4096,
    report_path: str | Path | None = None,
    write: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    dtype: str = "auto",
) -> list[dict[str, Any]]:
    """`evaluate` on each file with the model loaded once: one report per file, each written to its
    default path (`default_report_paths`); `report_path` only with a single file. Each report's
    `dataset` is the file's short name (`dataset_names`)."""
    datas = list(datas)
    if not datas:
        raise ValueError("no data file to evaluate on")
    if report_path is not None and len(datas) > 1:
        raise ValueError(f"--report names one file, but {len(datas)} data files were given: "
                         "leave it out to write each report next to the model (eval_<stem>.json)")
    names = dataset_names(datas)  # refuses a file given twice
    missing = [str(d) for d in datas if not Path(d).is_file()]
    if missing:
        raise FileNotFoundError(f"preference data {', '.join(missing)}: no such file")
    targets = [Path(report_path)] if report_path is not None else default_report_paths(model, datas)
    rm = load_model(model, dtype=dtype)
    reports = []
    for data, name, target in zip(datas, names, targets, strict=True):
        step = None if progress is None else (lambda done, total, name=name: progress(name, done, total))
        rep = evaluate(rm, data, strict=strict, token_budget=token_budget, report_path=target, write=False,
                       progress=step)
        rep["dataset"] = name
        if write:
            atomic_write_bytes(target, (json.dumps(rep, indent=2) + "\n").encode())
            rep["report_path"] = str(target)
        reports.append(rep)
    return reports


__all__ = ["MARGIN_NOISE", "PairRewards", "default_report_path", "default_report_paths", "evaluate",
           "evaluate_many", "format_report", "score_pairs"]
