"""After the members: normalisation, temperature, epistemic and OOD statistics, the ensemble
directory (manifest last), the dev evaluation and the training report.

Plain functions; `finalize` calls them in order and is what the training loop
(training/trainer.py) calls once every member is trained.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.backbone import Backbone, find_layers
from rmserve.service.engine.ensemble import (
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    save_member,
    write_manifest,
)
from rmserve.service.engine.ood import OodCalibration, OodStats
from rmserve.training.events import Reporter
from rmserve.training.inputs import TrainingData
from rmserve.training.linear_heads import ExactFit
from rmserve.training.members import Member
from rmserve.training.metrics import pair_report
from rmserve.training.ood import fit_ood, split_pairs
from rmserve.training.stats import epistemic_factor, fit_normalisation, fit_temperature


@dataclass
class Scores:
    """Every training sequence's normalised per-head rewards, and what serving needs to reproduce them."""

    norm: np.ndarray                    # [N, heads]: mean 0, std 1 per head (then / temperature)
    shift: list[float]
    scale: list[float]
    names: list[str]                    # member{m}/head{j}, one per column
    factors: list[torch.Tensor]         # epistemic factor per member
    epistemic: torch.Tensor             # [N] mean over members

    def fold_temperature(self, t: float) -> None:
        """Served rewards come out calibrated: the temperature goes into scale."""
        if t != 1.0:
            self.scale = [s * t for s in self.scale]
            self.norm = self.norm / t


@dataclass
class Calibration:
    """The temperature and the reports it was fitted on."""

    temperature: float = 1.0
    before: dict[str, Any] | None = None        # held-out slice before the temperature
    cross_fitted: dict[str, Any] | None = None  # out-of-fold rewards on train (no held-out slice)


def finalize(cfg: TrainConfig, out: Path, data: TrainingData, members: list[Member], features: dict[str, Any] | None,
             exact: ExactFit, rep: Reporter, timing: dict[str, float]) -> tuple[EnsembleManifest, dict[str, Any]]:
    """Normalise, fit the temperature, write the ensemble (manifest last), evaluate dev; the report."""
    rep.phase("finalize", "normalisation, temperature, epistemic statistics")
    scores = normalised_scores(members, cfg.lambda0, data.real_seqs)
    calibration = temperature(data, scores, exact.cross_fitted)
    scores.fold_temperature(calibration.temperature)
    ood_stats, ood_cal = ood(cfg, data, members, rep)
    specs = save_members(cfg, out, data.backbone, members, scores.factors, ood_stats)
    train_metrics = scores_report(data, real_only(data, data.fit), scores)
    calib = real_only(data, data.calib)
    calib_metrics = scores_report(data, calib, scores) if len(calib) else None
    aug_fit = data.fit[~data.real[data.fit]]
    augmented = scores_report(data, aug_fit, scores) if len(aug_fit) else None
    manifest = manifest_of(cfg, out, data, specs, scores, calibration.temperature, train_metrics, calib_metrics,
                           ood_cal)
    write_manifest(out, manifest)  # last: the directory is complete from here on
    dev = evaluate_dev(cfg, out, rep, timing)
    return manifest, report(cfg, out, data, manifest, features, exact.info, calibration, train_metrics,
                            calib_metrics, dev, augmented)


def real_only(data: TrainingData, idx: np.ndarray) -> np.ndarray:
    """The real pairs (not augmentations) among the pair indices `idx`."""
    return idx[data.real[idx]]


def normalised_scores(members: list[Member], lambda0: float, rows: np.ndarray) -> Scores:
    """Rewards of every training sequence, per head to mean 0 / std 1 over the real answers (`rows`:
    augmented non-answers would stretch the scale), and the epistemic statistics of those answers."""
    raw = torch.cat([mem.embeddings.double() @ mem.weight.double().T + mem.bias.double() for mem in members], 1)
    shift, scale = fit_normalisation(raw.numpy()[rows])
    norm = (raw.numpy() - shift) / np.array(scale)
    names = [f"member{m}/head{j}" for m, mem in enumerate(members) for j in range(mem.weight.shape[0])]
    factors = [epistemic_factor(mem.embeddings[torch.as_tensor(rows)], lambda0) for mem in members]
    epi = torch.stack([(mem.embeddings @ f).norm(dim=1) for mem, f in zip(members, factors, strict=True)]).mean(0)
    return Scores(norm, shift, scale, names, factors, epi)


def scores_report(data: TrainingData, idx: np.ndarray, scores: Scores) -> dict[str, Any]:
    """The metrics of the pairs at `idx` under the current (normalised, maybe tempered) scores."""
    c, r, w = data.pairs.chosen, data.pairs.rejected, data.pairs.weight
    return pair_report(scores.norm[c[idx]], scores.norm[r[idx]], w[idx], head_names=scores.names,
                       epistemic_chosen=scores.epistemic[c[idx]].numpy(),
                       epistemic_rejected=scores.epistemic[r[idx]].numpy(), **split_by(data, idx))


def split_by(data: TrainingData, idx: np.ndarray) -> dict[str, Any]:
    """pair_report's length and dataset arguments for the pairs at `idx` (per dataset when several)."""
    lc, lr = data.pairs.response_lengths()
    origin = data.pairs.origin
    return {"chosen_tokens": lc[idx], "rejected_tokens": lr[idx],
            "groups": [origin[i] for i in idx] if origin else None}


def per_dataset_equal(data: TrainingData, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The pair weights at `idx`, rescaled so that every data set weighs the same in total: one
    temperature serves them all, and the largest set would otherwise set it alone (3476 helpful
    pairs against 1510 harmless ones left HH overconfident: out-of-fold ECE 0.070)."""
    wi = np.asarray(w, dtype=np.float64)[idx].copy()
    if not data.pairs.origin:
        return wi
    origin = np.array(data.pairs.origin, dtype=object)[idx]
    sets, total = np.unique(origin), wi.sum()
    for o in sets:
        m = origin == o
        wi[m] *= total / len(sets) / wi[m].sum()
    return wi


def temperature(data: TrainingData, scores: Scores,
                cross_fitted: tuple[torch.Tensor, torch.Tensor] | None) -> Calibration:
    """T on the held-out slice; without one, on the exact heads' out-of-fold rewards; else 1."""
    c, r, w = data.pairs.chosen, data.pairs.rejected, data.pairs.weight
    calib = real_only(data, data.calib)  # the temperature describes real pairs, never augmentations
    if len(calib):
        before = scores_report(data, calib, scores)
        d = scores.norm[c[calib]].mean(1) - scores.norm[r[calib]].mean(1)
        return Calibration(fit_temperature(d, per_dataset_equal(data, calib, w)), before=before)
    if cross_fitted is None:
        return Calibration()
    real = data.real[data.fit]
    rc_oof, rr_oof = (t.numpy()[real] for t in cross_fitted)
    fit = data.fit[real]
    t = fit_temperature(rc_oof.mean(1) - rr_oof.mean(1), per_dataset_equal(data, fit, w))
    return Calibration(t, cross_fitted=pair_report(rc_oof / t, rr_oof / t, w[fit], head_names=scores.names,
                                                   **split_by(data, fit)))


def ood(cfg: TrainConfig, data: TrainingData, members: list[Member],
        rep: Reporter) -> tuple[list[OodStats | None], OodCalibration | None]:
    """OOD statistics of every member's training embeddings, the flag's threshold on held-out pairs."""
    if cfg.ood_quantile is None:
        return [None] * len(members), None
    # real answers only: an augmentation's non-answer is what the flag should find unusual
    fit_idx, held_idx = split_pairs(data.pairs.chosen[data.real], data.pairs.rejected[data.real],
                                    cfg.ood_holdout, cfg.seed)
    if len(held_idx) < 20 or len(fit_idx) < 2:
        rep.phase("finalize", f"too few held-out responses ({len(held_idx)}) for an OOD threshold: none")
        return [None] * len(members), None
    where = (f"{', '.join(cfg.data_files) or 'the preference store'}: {len(held_idx)} responses of a held-out "
             f"{cfg.ood_holdout:.0%} of the training pairs (seed {cfg.seed})")
    stats, cal, info = fit_ood([m.embeddings for m in members], fit_idx, held_idx,
                               quantile=cfg.ood_quantile, calibrated_on=where, seed=cfg.seed)
    rep.phase("finalize", f"OOD threshold {cal.threshold:.3f} ({cal.quantile:.0%} of {len(held_idx)} "
                          f"held-out responses; shrinkage {info['shrinkage']})")
    return stats, cal


def adapter_record(cfg: TrainConfig, backbone: Backbone, mem: Member) -> dict[str, Any]:
    """What a fine-tuned member changed: which layers and how (the manifest keeps it)."""
    if mem.delta is None:
        return {}
    prefix = find_layers(backbone.model)[0] + "."
    layers = sorted({int(n[len(prefix):].split(".")[0]) for n in mem.delta
                     if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()})
    return {"adapter": f"lora-r{cfg.lora_rank}" if cfg.lora_rank > 0 else "full", "trained_layers": layers}


def save_members(cfg: TrainConfig, out: Path, backbone: Backbone, members: list[Member],
                 factors: list[torch.Tensor], ood_stats: list[OodStats | None]) -> list[MemberSpec]:
    """Each member's directory (heads, delta, epistemic factor, OOD statistics); their manifest entries."""
    backbone_ref = cfg.backbone if cfg.backbone.startswith("builtin:") else str(Path(cfg.backbone).resolve())
    specs = []
    for m, (mem, f, o) in enumerate(zip(members, factors, ood_stats, strict=True)):
        spec = MemberSpec(name=f"member{m}", backbone=backbone_ref, pooling=backbone.pooling,
                          num_layers=cfg.num_layers, **adapter_record(cfg, backbone, mem))
        save_member(out, spec, MemberTensors(mem.weight, mem.bias, mem.delta, f, o))
        specs.append(spec)
    return specs


def manifest_of(cfg: TrainConfig, out: Path, data: TrainingData, specs: list[MemberSpec], scores: Scores,
                temperature: float, train_metrics: dict[str, Any], calib_metrics: dict[str, Any] | None,
                ood_cal: OodCalibration | None) -> EnsembleManifest:
    """The manifest: shift/scale with T folded in, serving defaults, and the training metadata."""
    version = cfg.version or (datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + data.fingerprint[:8])
    return EnsembleManifest(
        name=cfg.name or out.resolve().name, version=version, kind=cfg.kind, members=specs,
        shift=list(scores.shift), scale=list(scores.scale), uncertainty_penalty=cfg.uncertainty_penalty,
        max_tokens=data.encoder.max_tokens, dtype=cfg.serve_dtype, chat_template=True,
        training=metadata(cfg, data, temperature, train_metrics, calib_metrics),
        ood=asdict(ood_cal) if ood_cal is not None else None,
    )


def metadata(cfg: TrainConfig, data: TrainingData, temperature: float, fit: dict,
             calib: dict | None) -> dict[str, Any]:
    """manifest.training: config, data identity, temperature, headline metrics, versions, finish time."""
    import transformers

    def headline(rep: dict | None) -> dict | None:
        return None if rep is None else {k: rep[k] for k in ("pairs", "accuracy", "ece", "brier", "auroc_std")}

    return {
        "trainer": "rmserve.training/1",
        "config": cfg.to_dict(),
        "augment": data.augment,
        "length_debias": cfg.length_debias,
        "data": {**data.source, "fingerprint": data.fingerprint, "pairs": len(data.pairs),
                 "skipped": data.report.skipped},
        "temperature": temperature,
        "lambda0": cfg.lambda0,
        "train_metrics": headline(fit),
        "calibration_metrics": headline(calib),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def evaluate_dev(cfg: TrainConfig, out: Path, rep: Reporter, timing: dict[str, float]) -> dict[str, Any] | None:
    """Each dev file scored through the serving engine from the directory just written, by dataset name."""
    if not cfg.dev_files:
        return None
    from rmserve.training.evaluate import evaluate_many

    rep.phase("eval", f"evaluating {out} on {', '.join(cfg.dev_files)} through the serving engine")
    t0 = time.monotonic()
    devs = evaluate_many(out, cfg.dev_files, token_budget=cfg.token_budget)
    timing["dev_eval_s"] = time.monotonic() - t0
    return {d["dataset"]: d for d in devs}


def report(cfg: TrainConfig, out: Path, data: TrainingData, manifest: EnsembleManifest,
           features: dict[str, Any] | None, heads: dict[str, Any] | None, calibration: Calibration,
           train_metrics: dict[str, Any], calib_metrics: dict[str, Any] | None,
           dev: dict[str, Any] | None, augmented: dict[str, Any] | None = None) -> dict[str, Any]:
    """train_report.json (the loop adds `timing`).

    `dev` is the dev report of a single dev file (None with several); `dev_sets` has every dev
    file's report by dataset name. `data.files` counts rows and pairs per training file; with
    several files, each metrics block has the same report per dataset in `per_origin`.
    """
    pairs = data.pairs
    return {
        "ensemble": str(out), "name": manifest.name, "version": manifest.version,
        "config": cfg.to_dict(),
        "data": {**data.report.to_dict(), "sequences": len(pairs.seqs), "truncated_sequences": pairs.truncated,
                 "fit_pairs": len(data.fit), "calibration_pairs": len(data.calib),
                 "files": data.source.get("files"), "augment": data.augment,
                 "real_pairs": int(data.real.sum())},
        "features": features,
        "heads": heads,
        "temperature": calibration.temperature,
        "train": train_metrics,
        "train_augmented": augmented,  # the augmented fit pairs, apart (per kind in per_origin)
        "calibration_split_before_temperature": calibration.before,
        "calibration_split": calib_metrics,
        "cross_fitted": calibration.cross_fitted,
        "dev": next(iter(dev.values())) if dev and len(dev) == 1 else None,
        "dev_sets": dev,
    }
