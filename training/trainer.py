"""Train a reward-model ensemble with the Bradley-Terry loss and write it as an ensemble directory.

`train(config, progress=, should_stop=)` reads top to bottom:

1. data: parse the JSONL, encode every conversation with the serving encoder,
   hold out a slice of TRAIN (by source row) to fit the temperature;
2. frozen features (heads on a frozen backbone): last-token embeddings once,
   through the serving engine, cached on disk; or, when the last N layers are
   trained, the frozen layers' output once (prefix cache);
3. members: `heads` trains one backbone with K heads, each on its own bootstrap
   resample and init; `members` trains K backbones (last N layers or LoRA),
   each with its own seed, init and data order, one after the other. Chosen and
   rejected of a pair share a forward batch; batches are length-sorted;
   gradients accumulate over `grad_accum` micro-batches; bf16 autocast on GPU.
   `head_solver=lbfgs` solves each head exactly instead (frozen features only);
4. finalize: per-head shift/scale (train rewards mean 0, std 1), temperature
   on the held-out slice (without one: on the exact heads' out-of-fold rewards)
   folded into scale, epistemic factor per member, heads/deltas/factors
   written, manifest last, then the dev evaluation through the serving engine
   and `train_report.json`.

Each step returns what it computed and the next takes it as an argument
(`_Frozen`, `_ExactFit`, `_Scores`, `_Calibration`); `_Job` keeps only the
job-wide context that run() sets once (data, backbone, split, device, schedule).

It runs in the caller's thread, holds no global state (own RNGs, no torch
global settings), reports through `progress`, polls `should_stop` after every
optimizer step (then writes a checkpoint and raises TrainingStopped), and
checkpoints every `checkpoint_every_s` and at each epoch end so `resume=True`
continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.service.data.preferences import Filters, SqliteStore, training_rows
from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.backbone import Backbone, cache_dir, find_layers, load_backbone
from rmserve.service.engine.ensemble import (
    MANIFEST,
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    atomic_write_bytes,
    save_member,
    write_manifest,
)
from rmserve.service.engine.ood import OodCalibration, OodStats
from rmserve.service.engine.padding import pad_token_id
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training import checkpoint, frozen_states
from rmserve.training.data import DataError, DataReport, Pair, load_pairs, pairs_from_rows
from rmserve.training.encoding import EncodedPairs, encode_pairs
from rmserve.training.events import ProgressCallback, ProgressEvent, Reporter, TrainingStopped
from rmserve.training.features import cached_features
from rmserve.training.frozen_states import FrozenStates
from rmserve.training.linear_heads import choose_l2, cross_fitted_rewards, fit_bt_head
from rmserve.training.loss import bt_loss
from rmserve.training.metrics import pair_report
from rmserve.training.ood import fit_ood, split_pairs
from rmserve.training.schedule import (
    bootstrap_counts,
    calibration_split,
    derive_seed,
    generator,
    length_sorted_batches,
    lr_scale,
)
from rmserve.training.stats import epistemic_factor, fit_normalisation, fit_temperature
from rmserve.training.tuning import Tuned, embed, embed_all, make_trainable

REPORT = "train_report.json"
LOG = "train_log.jsonl"
CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    out: Path
    manifest: EnsembleManifest
    report: dict[str, Any]


@dataclass
class _Member:
    """A trained member in raw embedding space (before normalisation)."""

    weight: torch.Tensor                    # [K, H]
    bias: torch.Tensor                      # [K]
    delta: dict[str, torch.Tensor] | None   # trained backbone tensors
    embeddings: torch.Tensor                # [N, H] of every training sequence, final backbone


@dataclass
class _Frozen:
    """Step 2's output: what does not change while members train, and its entry in the report."""

    features: torch.Tensor | None = None    # [N, H] last-token features of the frozen backbone
    prefix: FrozenStates | None = None      # hidden states entering the first trained layer
    info: dict[str, Any] | None = None      # report["features"]


@dataclass
class _ExactFit:
    """What an exact (lbfgs) head fit hands to finalize; empty for gradient-trained heads."""

    info: dict[str, Any] | None = None                              # report["heads"]
    cross_fitted: tuple[torch.Tensor, torch.Tensor] | None = None  # out-of-fold (chosen, rejected) rewards


@dataclass
class _FitPairs:
    """One member's view of the fit pairs; the per-head bootstrap counts act as pair weights."""

    fit: torch.Tensor        # [F] indices of the fit pairs
    chosen: torch.Tensor     # [P] sequence id of every pair's chosen response
    rejected: torch.Tensor   # [P]
    weight: torch.Tensor     # [F] pair weights, on the device
    margin: torch.Tensor     # [F] BT margins, on the device
    counts: torch.Tensor     # [K, F] bootstrap multiplicities, on the device


@dataclass
class _Trainable:
    """What AdamW steps for one member: the heads and, for `members`, the trainable backbone part."""

    weight: torch.nn.Parameter          # [K, H]
    bias: torch.nn.Parameter            # [K]
    tuned: Tuned | None
    opt: torch.optim.Optimizer
    base_lrs: list[float]               # per param group, before the schedule's scale
    params: list[torch.nn.Parameter]    # every optimised tensor, for gradient clipping


@dataclass
class _Window:
    """Loss/accuracy since the last `step` event and the last timed checkpoint; spans epochs."""

    every: int                          # optimizer steps between step events
    steps_at_start: int
    t_start: float = field(default_factory=time.monotonic)
    last_ckpt: float = field(default_factory=time.monotonic)
    loss: float = 0.0
    acc: float = 0.0
    w: float = 0.0
    n: int = 0


@dataclass
class _Scores:
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
class _Calibration:
    """The temperature and the reports it was fitted on."""

    temperature: float = 1.0
    before: dict[str, Any] | None = None        # held-out slice before the temperature
    cross_fitted: dict[str, Any] | None = None  # out-of-fold rewards on train (no held-out slice)


def train(
    config: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train, write the ensemble to `config.out`, return the manifest and the report.

    Raises TrainingStopped when `should_stop()` turned True (a checkpoint was
    written); other errors are also reported as an `error` event before they propagate.
    """
    job = _Job(config, progress, should_stop)
    try:
        return job.run()
    except TrainingStopped:
        raise
    except Exception as e:
        job.rep.emit(ProgressEvent("error", job.rep.current_phase, message=f"{type(e).__name__}: {e}"))
        raise


class _Job:
    def __init__(self, cfg: TrainConfig, progress: ProgressCallback | None, should_stop: Callable[[], bool] | None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / CHECKPOINT
        self.should_stop = should_stop or (lambda: False)
        self.resumed = self._prepare_out()
        self.serial = self.resumed[0].get("serial", 0) if self.resumed else 0
        self.rep = Reporter(progress, self.out / LOG)
        self.step = 0            # optimizer steps over all members, this job (resumed ones included)
        self.timing: dict[str, float] = {}
        # set once by run(), steps 1-3, before anything reads them (loading inside run() reports its errors)
        self.data_report: DataReport
        self.data_source: dict[str, Any]
        self.backbone: Backbone
        self.encoder: PromptEncoder
        self.data: EncodedPairs
        self.fingerprint: str
        self.fit: np.ndarray     # pair indices the members train on
        self.calib: np.ndarray   # held-out pair indices for the temperature (may be empty)
        self.device: torch.device
        self.k: int              # heads per member
        self.steps_per_epoch: int
        self.total: int          # optimizer steps over all members

    # -- 0. the output directory ------------------------------------------------------

    def _prepare_out(self) -> tuple[dict, dict] | None:
        cfg, out = self.cfg, self.out
        if cfg.resume:
            found = checkpoint.load(self.ckpt_dir)
            if found is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
            diffs = cfg.differences(found[0]["config"])
            if diffs:
                raise ValueError(f"--resume: the checkpoint was trained with different {', '.join(diffs)}")
            return found
        existing = [p for p in (out / MANIFEST, self.ckpt_dir) if p.exists()]
        if existing and not cfg.overwrite:
            raise FileExistsError(
                f"{out} already holds {existing[0].name}; pass overwrite (--overwrite) to replace it "
                "or resume (--resume) to continue its checkpoint"
            )
        if existing:  # an ensemble we wrote: the manifest goes first, so it is never half-replaced
            (out / MANIFEST).unlink(missing_ok=True)
            for p in [*out.glob("member[0-9]*"), self.ckpt_dir, *out.glob("eval_*.json")]:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for name in (REPORT, LOG):
            (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        return None

    # -- the job, top to bottom ------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        t0 = time.monotonic()
        source = f"the preference store {cfg.from_store}" if cfg.from_store else cfg.data
        self.rep.emit(ProgressEvent("start", "data", message=f"{cfg.kind} x{cfg.num_heads} on {source}"))

        # 1. data, encoded exactly as serving encodes
        pairs, self.data_report, self.data_source = _load_data(cfg)
        self.backbone = load_backbone(cfg.backbone, num_layers=cfg.num_layers)
        self.encoder = PromptEncoder(self.backbone.tokenizer, min(cfg.max_tokens, self.backbone.max_positions))
        self.data = encode_pairs(pairs, self.encoder, self.data_report, strict=cfg.strict)
        self.fingerprint = self.data.fingerprint()
        if self.resumed and self.resumed[0]["fingerprint"] != self.fingerprint:
            raise ValueError("--resume: the training data (after encoding) differs from the checkpoint's")
        self.fit, self.calib, split_note = calibration_split(
            self.data.source, cfg.calib_frac, cfg.min_calib_pairs, cfg.seed
        )
        self.rep.phase("data", f"{self.data_report.summary()}\n{len(self.data.seqs)} sequences "
                               f"({self.data.truncated} truncated); {split_note}")
        self.timing["data_s"] = time.monotonic() - t0

        # 2. what does not change during training, computed once: frozen features, or frozen layers' output
        self.device = self._device()
        frozen = self._frozen()

        # 3. members
        n_members, self.k = (1, cfg.num_heads) if cfg.kind == "heads" else (cfg.num_heads, 1)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.fit) / cfg.batch_size) / cfg.grad_accum)
        self.total = n_members * cfg.epochs * self.steps_per_epoch
        if cfg.head_solver == "lbfgs":  # one exact fit per head (plus the CV fits), no epochs
            self.steps_per_epoch, self.total = self.k, self.k
        t1 = time.monotonic()
        members, exact = self._train_members(n_members, frozen)
        self.timing["train_s"] = time.monotonic() - t1

        # 4. normalisation, temperature, epistemic statistics, the ensemble directory, the reports
        result = self._finalize(members, frozen.info, exact)
        self.timing["total_s"] = time.monotonic() - t0
        result.report["timing"] = {k: round(v, 3) for k, v in self.timing.items()}
        atomic_write_bytes(self.out / REPORT, (json.dumps(result.report, indent=2) + "\n").encode())
        if not cfg.keep_checkpoint:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        self.rep.emit(ProgressEvent("done", "finalize", step=self.total, total=self.total, report=result.report,
                                    message=f"wrote {self.out}"))
        return result

    def _device(self) -> torch.device:
        if self.cfg.finetune_layers == 0:
            return torch.device("cpu")  # heads on cached features: nothing to gain from a GPU
        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available")
        return torch.device("cuda" if self.cfg.device != "cpu" and torch.cuda.is_available() else "cpu")

    # -- 2. frozen features --------------------------------------------------------------

    def _frozen(self) -> _Frozen:
        """Frozen backbone: its features; trained last layers: the frozen layers' output, if cached."""
        if self.cfg.finetune_layers == 0:
            return self._frozen_features()
        if self.cfg.prefix_cache:
            return self._prefix_states()
        return _Frozen()

    def _frozen_features(self) -> _Frozen:
        cfg = self.cfg
        cache = self._cache_dir()
        n = len(self.data.seqs)
        t0 = time.monotonic()

        self.rep.phase("features", f"last-token features of {n} sequences (frozen backbone)")
        feats, key, hit = cached_features(
            self.backbone, self.encoder, self.data.seqs, cache_dir=cache, token_budget=cfg.token_budget,
            progress=self._progress("features", t0), should_stop=self.should_stop,
        )
        secs = time.monotonic() - t0
        self.timing["features_s"] = secs
        info = {"cache_key": key, "cache_hit": hit, "sequences": n, "seconds": round(secs, 3),
                "seconds_per_pair": round(secs / max(1, len(self.data)), 5)}
        self.rep.phase("features", f"{'cache hit' if hit else 'computed'} in {secs:.1f}s (key {key})")
        return _Frozen(features=feats, info=info)

    def _progress(self, phase: str, t0: float) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            eta = (time.monotonic() - t0) / done * (total - done)
            self.rep.emit(ProgressEvent("step", phase, step=done, total=total, eta_s=round(eta, 1)))

        return report

    def _cache_dir(self) -> Path | None:
        return None if self.cfg.feature_cache == "" else Path(self.cfg.feature_cache or cache_dir() / "features")

    def _prefix_states(self) -> _Frozen:
        cfg, model = self.cfg, self.backbone.model
        n_blocks = len(find_layers(model)[1])
        first = n_blocks - min(cfg.finetune_layers, n_blocks) if cfg.finetune_layers > 0 else 0
        if first == 0 or self.backbone.pooling != "last":
            self.rep.phase("features", "no prefix cache: every layer is trained" if first == 0
                           else "no prefix cache: it supports last-token (decoder) backbones only")
            return _Frozen()
        t0 = time.monotonic()
        model.to(self.device)
        seqs, pad = self.data.seqs, pad_token_id(self.backbone.tokenizer)
        self.rep.phase("features", f"hidden states entering layer {first} of {n_blocks} for {len(seqs)} sequences")
        states, key, hit = frozen_states.cached(model, seqs, first, cache_dir=self._cache_dir(), pad_id=pad,
                                         token_budget=cfg.token_budget, progress=self._progress("features", t0),
                                         should_stop=self.should_stop)
        problem = frozen_states.check(model, states, seqs, list(range(min(2, len(seqs)))), pad_id=pad)
        secs = time.monotonic() - t0
        self.timing["prefix_s"] = secs
        info = {"prefix_first_layer": first, "cache_key": key, "cache_hit": hit,
                "sequences": len(seqs), "tokens": int(states.offsets[-1]), "seconds": round(secs, 3),
                "seconds_per_pair": round(secs / max(1, len(self.data)), 5), "problem": problem}
        if problem:
            self.rep.phase("features", f"prefix cache not usable for this architecture ({problem}); "
                                       "training runs full forwards")
            return _Frozen(info=info)
        return _Frozen(prefix=states, info=info)

    # -- 3. members ----------------------------------------------------------------------

    def _train_members(self, n_members: int, frozen: _Frozen) -> tuple[list[_Member], _ExactFit]:
        """Members one after the other; those the checkpoint holds are loaded, not retrained."""
        done = self.resumed[0]["members_done"] if self.resumed else 0
        members: list[_Member] = []
        exact = _ExactFit()  # the last exact fit's, as every member uses the same solver and split
        for m in range(n_members):
            if m < done:
                members.append(self._load_member(m))
                self.step += self.cfg.epochs * self.steps_per_epoch
                continue
            member, exact = self._train_member(m, frozen)
            members.append(member)
            self._save_member(m, member)
        return members, exact

    def _train_member(self, m: int, frozen: _Frozen) -> tuple[_Member, _ExactFit]:
        """One member from its init to its last epoch, or from where the checkpoint stopped."""
        cfg, spe = self.cfg, self.steps_per_epoch
        seed = derive_seed(cfg.seed, "member", m)
        pairs = self._fit_pairs(seed)
        embed_fn, tuned, whitening = self._inputs(seed, frozen)
        if cfg.head_solver == "lbfgs":
            return self._fit_exact_heads(m, seed, pairs, embed_fn, whitening, frozen)
        trainable = self._trainable(seed, tuned)
        epoch0, step0 = self._start(m, trainable, len(pairs.fit))
        lengths = self.data.pair_lengths()[self.fit]
        window = _Window(every=cfg.log_every or max(1, self.total // 200), steps_at_start=self.step)

        for epoch in range(epoch0, cfg.epochs):
            batches = length_sorted_batches(lengths, cfg.batch_size, generator(seed, "order", epoch))
            for s in range(step0 if epoch == epoch0 else 0, spe):
                scale = lr_scale(epoch * spe + s, cfg.epochs * spe, cfg.warmup_frac)
                group = batches[s * cfg.grad_accum : (s + 1) * cfg.grad_accum]
                self._optimizer_step(trainable, scale, group, pairs, embed_fn, window)
                self._log_step(m, epoch, s, trainable.base_lrs[-1] * scale, window)
                self._checkpoint_or_stop(m, epoch, s, trainable, window)
            self.rep.emit(ProgressEvent("epoch", "train", step=self.step, total=self.total, member=m, epoch=epoch))

        return self._finish_member(m, trainable.weight, trainable.bias, tuned, whitening, frozen), _ExactFit()

    def _fit_pairs(self, seed: int) -> _FitPairs:
        """The fit pairs as tensors; bootstrap multiplicities give each head its own resample."""
        data, fit = self.data, torch.as_tensor(self.fit)
        return _FitPairs(
            fit=fit,
            chosen=torch.as_tensor(data.chosen),
            rejected=torch.as_tensor(data.rejected),
            weight=torch.as_tensor(data.weight[self.fit], dtype=torch.float32, device=self.device),
            margin=torch.as_tensor(data.margin[self.fit], dtype=torch.float32, device=self.device),
            counts=bootstrap_counts(self.k, len(fit), seed, self.cfg.use_bootstrap).to(self.device),
        )

    def _inputs(
        self, seed: int, frozen: _Frozen
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Tuned | None, tuple | None]:
        """What the heads read for sequence ids: whitened cached features, or the partly trainable backbone.

        Returns (embed_fn, the trainable backbone or None, (mu, sd) of the whitening or None).
        """
        data = self.data
        if frozen.features is not None:
            features = frozen.features
            fit_seqs = torch.unique(torch.as_tensor(np.concatenate([data.chosen[self.fit], data.rejected[self.fit]])))
            mu = features[fit_seqs].mean(0)
            sd = features[fit_seqs].std(0)
            # a dimension constant on train gets sd = inf: whitened to 0 and weight 0 once folded back,
            # rather than an untrained weight / ~0 that would explode on a served sample
            sd = torch.where(sd > 1e-6 * float(sd.max()), sd, torch.full_like(sd, float("inf")))
            x = (features - mu) / sd  # conditioning for the heads; folded back into them at the end
            return (lambda ids: x[ids]), None, (mu, sd)
        cfg = self.cfg
        tuned = make_trainable(self.backbone.model, layers=cfg.finetune_layers, lora_rank=cfg.lora_rank,
                               lora_alpha=cfg.lora_alpha, seed=derive_seed(seed, "lora"))
        tuned.model.to(self.device)
        pad = pad_token_id(self.backbone.tokenizer)
        model, states, device, pooling = tuned.model, frozen.prefix, self.device, self.backbone.pooling

        def embed_fn(ids: torch.Tensor) -> torch.Tensor:
            if states is not None:  # only the trained layers run
                return frozen_states.embed_from(model, states, ids.tolist(), pooling="last", device=device, amp=True)
            return embed(model, [data.seqs[i] for i in ids.tolist()], pad_id=pad, pooling=pooling,
                         device=device, amp=True)

        return embed_fn, tuned, None

    def _trainable(self, seed: int, tuned: Tuned | None) -> _Trainable:
        """AdamW over K heads, each with its own init, and the trainable backbone part at its own lr."""
        cfg = self.cfg
        init = torch.randn(self.k, self.backbone.hidden_size, generator=generator(seed, "init")) * 0.02
        weight = torch.nn.Parameter(init.to(self.device))
        bias = torch.nn.Parameter(torch.zeros(self.k, device=self.device))
        groups = [{"params": [weight, bias], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if tuned is not None:
            groups.append({"params": tuned.parameters(), "lr": cfg.backbone_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups)
        return _Trainable(weight, bias, tuned, opt, base_lrs=[g["lr"] for g in opt.param_groups],
                          params=[p for g in opt.param_groups for p in g["params"]])

    def _start(self, m: int, trainable: _Trainable, n_pairs: int) -> tuple[int, int]:
        """(epoch, step) member m starts at: (0, 0), or the checkpoint's; the job's step count follows."""
        epoch0, step0 = 0, 0
        if self.resumed and self.resumed[0].get("current", {}).get("member") == m:
            epoch0, step0 = self._restore(trainable)
        per_member = self.cfg.epochs * self.steps_per_epoch
        self.step = m * per_member + epoch0 * self.steps_per_epoch + step0
        self.rep.phase("train", f"member {m}: {self.k} head(s), {n_pairs} pairs, {per_member} steps")
        return epoch0, step0

    def _optimizer_step(self, trainable: _Trainable, scale: float, group: list, pairs: _FitPairs,
                        embed_fn: Callable[[torch.Tensor], torch.Tensor], window: _Window) -> None:
        """Gradients accumulated over `grad_accum` micro-batches, clipped, one AdamW step."""
        cfg = self.cfg
        for g, base in zip(trainable.opt.param_groups, trainable.base_lrs, strict=True):
            g["lr"] = base * scale
        for rows_np in group:
            rows = torch.as_tensor(rows_np)
            pidx = pairs.fit[rows]
            e = embed_fn(torch.cat([pairs.chosen[pidx], pairs.rejected[pidx]]))  # chosen and rejected in one batch
            r = e @ trainable.weight.T + trainable.bias
            rc, rr = r[: len(rows)], r[len(rows) :]
            rows_d = rows.to(self.device)
            w = pairs.counts[:, rows_d].T * pairs.weight[rows_d, None]
            loss = bt_loss(rc, rr, margin=pairs.margin[rows_d], weight=w, center_coef=cfg.center_coef)
            (loss / len(group)).backward()
            with torch.no_grad():
                d = rc.mean(1) - rr.mean(1)
                window.loss += loss.item() / len(group)
                window.acc += float((pairs.weight[rows_d] * (d > 0)).sum())
                window.w += float(pairs.weight[rows_d].sum())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable.params, cfg.max_grad_norm)
        trainable.opt.step()
        trainable.opt.zero_grad(set_to_none=True)
        self.step += 1
        window.n += 1

    def _log_step(self, m: int, epoch: int, s: int, lr: float, window: _Window) -> None:
        """A `step` event every `log_every` steps and at the member's last one, averaged over the window."""
        last = epoch == self.cfg.epochs - 1 and s == self.steps_per_epoch - 1
        if self.step % window.every != 0 and not last:
            return
        rate = (time.monotonic() - window.t_start) / max(1, self.step - window.steps_at_start)
        self.rep.emit(ProgressEvent(
            "step", "train", step=self.step, total=self.total, member=m, epoch=epoch,
            loss=round(window.loss / window.n, 5), accuracy=round(window.acc / max(window.w, 1e-12), 4),
            lr=lr, eta_s=round(rate * (self.total - self.step), 1),
        ))
        window.loss, window.acc, window.w, window.n = 0.0, 0.0, 0.0, 0

    def _checkpoint_or_stop(self, m: int, epoch: int, s: int, trainable: _Trainable, window: _Window) -> None:
        """Checkpoint at each epoch end, every `checkpoint_every_s`, and when asked to stop (then raise)."""
        epoch_end = s + 1 == self.steps_per_epoch
        position = (epoch + 1, 0) if epoch_end else (epoch, s + 1)
        stop = self.should_stop()
        if stop or epoch_end or time.monotonic() - window.last_ckpt > self.cfg.checkpoint_every_s:
            self._checkpoint(m, position, trainable)
            window.last_ckpt = time.monotonic()
        if stop:
            self.rep.emit(ProgressEvent("stopped", "train", step=self.step, total=self.total, member=m,
                                        message=f"checkpoint in {self.ckpt_dir}; resume to continue"))
            raise TrainingStopped(f"stopped at step {self.step}/{self.total}; checkpoint in {self.ckpt_dir}")

    def _fit_exact_heads(self, m: int, seed: int, pairs: _FitPairs, embed_fn: Callable[[torch.Tensor], torch.Tensor],
                         whitening: tuple | None, frozen: _Frozen) -> tuple[_Member, _ExactFit]:
        """Frozen features: each head's L2 logistic regression solved exactly (training/linear_heads.py)."""
        pw, margin = pairs.weight, pairs.margin
        dx = (embed_fn(pairs.chosen[pairs.fit]) - embed_fn(pairs.rejected[pairs.fit])).double()
        sources = [self.data.source[i] for i in self.fit]  # folds by source row: a ranked list stays together
        l2, info = self._head_l2(seed, dx, pairs, sources)
        cross_fitted = None if len(self.calib) else self._cross_fitted(seed, l2, pairs, embed_fn, sources)
        weights = []
        t0 = time.monotonic()
        for j in range(self.k):
            w = fit_bt_head(dx, pairs.counts[j].double() * pw.double(), l2=l2, margin=margin)
            weights.append(w.float())
            self.step += 1
            d = dx @ w
            self.rep.emit(ProgressEvent(
                "step", "train", step=self.step, total=self.total, member=m,
                loss=round(float((pw * torch.nn.functional.softplus(margin - d.float())).sum() / pw.sum()), 5),
                accuracy=round(float((pw * (d > 0)).sum() / pw.sum()), 4),
                eta_s=round((time.monotonic() - t0) / (j + 1) * (self.k - j - 1), 1),
            ))
        member = self._finish_member(m, torch.stack(weights), torch.zeros(self.k), None, whitening, frozen)
        return member, _ExactFit(info, cross_fitted)

    def _head_l2(self, seed: int, dx: torch.Tensor, pairs: _FitPairs,
                 sources: list) -> tuple[float, dict[str, Any]]:
        """The L2 strength, `--head-l2` or chosen by grouped CV on train, and its report["heads"] entry."""
        l2 = self.cfg.head_l2
        if l2 is not None:
            return l2, {"solver": "lbfgs", "l2": l2, "chosen_by": "--head-l2"}
        choice = choose_l2(dx, pairs.weight.double(), seed=derive_seed(seed, "cv"), groups=sources)
        l2 = choice.l2
        info = {"solver": "lbfgs", "l2": l2, "chosen_by": f"{choice.folds}-fold CV NLL on train",
                "cv_accuracy": {str(g): round(v, 4) for g, v in choice.cv_accuracy.items()},
                "cv_nll": {str(g): round(v, 5) for g, v in choice.cv_nll.items()}}
        self.rep.phase("train", f"L2 {l2:g} chosen by {choice.folds}-fold CV on train "
                                f"(CV accuracy {choice.cv_accuracy[l2]:.3f})")
        return l2, info

    def _cross_fitted(self, seed: int, l2: float, pairs: _FitPairs,
                      embed_fn: Callable[[torch.Tensor], torch.Tensor],
                      sources: list) -> tuple[torch.Tensor, torch.Tensor]:
        """No held-out slice: out-of-fold rewards of the train pairs, so the temperature sees unseen pairs."""
        self.rep.phase("train", "out-of-fold rewards on train (5 folds) for the temperature")
        chosen, rejected = pairs.chosen[pairs.fit], pairs.rejected[pairs.fit]
        seqs = torch.unique(torch.cat([chosen, rejected]))
        where = torch.full((len(self.data.seqs),), -1, dtype=torch.long)
        where[seqs] = torch.arange(len(seqs))
        return cross_fitted_rewards(
            embed_fn(seqs), where[chosen], where[rejected], pairs.counts.double() * pairs.weight.double(),
            l2=l2, margin=pairs.margin, seed=derive_seed(seed, "cv"), groups=sources)

    def _finish_member(self, m: int, weight: torch.Tensor, bias: torch.Tensor, tuned: Tuned | None,
                       whitening: tuple | None, frozen: _Frozen) -> _Member:
        """Heads back in raw embedding space; for a trained backbone: its delta and final embeddings."""
        w_out, b_out = weight.detach().float().cpu(), bias.detach().float().cpu()
        if tuned is None:
            mu, sd = whitening
            w_out = w_out / sd
            return _Member(w_out, b_out - w_out @ mu, None, frozen.features)
        cfg = self.cfg
        delta = tuned.finish()
        t0 = time.monotonic()
        self.rep.phase("finalize", f"member {m}: embeddings of {len(self.data.seqs)} training sequences")
        if frozen.prefix is not None:
            emb = frozen_states.embed_all_from(tuned.base, frozen.prefix, device=self.device,
                                               token_budget=cfg.token_budget)
        else:
            emb = embed_all(tuned.base, self.data.seqs, pad_id=pad_token_id(self.backbone.tokenizer),
                            pooling=self.backbone.pooling, device=self.device, token_budget=cfg.token_budget)
        self.timing["embeddings_s"] = self.timing.get("embeddings_s", 0.0) + time.monotonic() - t0
        tuned.restore()
        tuned.base.to("cpu")
        return _Member(w_out, b_out, {n: t.cpu() for n, t in delta.items()}, emb)

    # -- checkpoints -------------------------------------------------------------------

    def _checkpoint(self, m: int, position: tuple[int, int], trainable: _Trainable) -> None:
        tensors, opt_meta = checkpoint.optimizer_to_tensors(trainable.opt)
        tensors = {k: v.cpu() for k, v in tensors.items()}
        tensors["head.weight"], tensors["head.bias"] = trainable.weight.detach().cpu(), trainable.bias.detach().cpu()
        if trainable.tuned is not None:
            tensors.update({f"param.{n}": t.cpu() for n, t in trainable.tuned.trainable_state().items()})
        state = self._state(members_done=m)
        state["current"] = {"member": m, "epoch": position[0], "step": position[1], "optimizer": opt_meta}
        checkpoint.save(self.ckpt_dir, state, tensors)
        self.rep.emit(ProgressEvent("checkpoint", "train", step=self.step, total=self.total, member=m))

    def _state(self, members_done: int) -> dict[str, Any]:
        self.serial += 1
        return {"serial": self.serial, "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                "members_done": members_done}

    def _restore(self, trainable: _Trainable) -> tuple[int, int]:
        state, tensors = self.resumed
        cur = state["current"]
        with torch.no_grad():
            trainable.weight.copy_(tensors["head.weight"])
            trainable.bias.copy_(tensors["head.bias"])
        if trainable.tuned is not None:
            trainable.tuned.load_trainable_state({n: tensors[f"param.{n}"].to(self.device) for n in trainable.tuned.names})
        checkpoint.optimizer_from_tensors(trainable.opt, tensors, cur["optimizer"])
        self.rep.phase("train", f"resumed member {cur['member']} at epoch {cur['epoch']}, step {cur['step']}")
        return cur["epoch"], cur["step"]

    def _save_member(self, m: int, mem: _Member) -> None:
        tensors = {"weight": mem.weight, "bias": mem.bias, "embeddings": mem.embeddings}
        if mem.delta:
            tensors.update({f"delta.{n}": t for n, t in mem.delta.items()})
        checkpoint.save_member(self.ckpt_dir, m, tensors)
        checkpoint.save(self.ckpt_dir, self._state(members_done=m + 1), {})

    def _load_member(self, m: int) -> _Member:
        t = checkpoint.load_member(self.ckpt_dir, m)
        delta = {n.removeprefix("delta."): v for n, v in t.items() if n.startswith("delta.")} or None
        self.rep.phase("train", f"member {m} restored from the checkpoint")
        return _Member(t["weight"], t["bias"], delta, t["embeddings"])

    # -- 4. finalize ---------------------------------------------------------------------------

    def _finalize(self, members: list[_Member], features: dict[str, Any] | None, exact: _ExactFit) -> TrainResult:
        """Normalise, fit the temperature, write the ensemble (manifest last), evaluate dev, report."""
        self.rep.phase("finalize", "normalisation, temperature, epistemic statistics")
        scores = self._scores(members)
        calibration = self._temperature(scores, exact.cross_fitted)
        scores.fold_temperature(calibration.temperature)
        ood_stats, ood_cal = self._ood(members)
        specs = self._save_members(members, scores.factors, ood_stats)
        train_metrics = self._pair_report(self.fit, scores)
        calib_metrics = self._pair_report(self.calib, scores) if len(self.calib) else None
        manifest = self._write_manifest(specs, scores, calibration.temperature, train_metrics, calib_metrics,
                                        ood_cal)
        dev = self._evaluate_dev()
        report = self._report(manifest, features, exact.info, calibration, train_metrics, calib_metrics, dev)
        return TrainResult(self.out, manifest, report)

    def _scores(self, members: list[_Member]) -> _Scores:
        """Rewards of every training sequence, per head to mean 0 / std 1, and the epistemic statistics."""
        raw = torch.cat([mem.embeddings.double() @ mem.weight.double().T + mem.bias.double() for mem in members], 1)
        shift, scale = fit_normalisation(raw.numpy())
        norm = (raw.numpy() - shift) / np.array(scale)
        names = [f"member{m}/head{j}" for m, mem in enumerate(members) for j in range(mem.weight.shape[0])]
        factors = [epistemic_factor(mem.embeddings, self.cfg.lambda0) for mem in members]
        epi = torch.stack([(mem.embeddings @ f).norm(dim=1) for mem, f in zip(members, factors, strict=True)]).mean(0)
        return _Scores(norm, shift, scale, names, factors, epi)

    def _pair_report(self, idx: np.ndarray, scores: _Scores) -> dict[str, Any]:
        c, r, w = self.data.chosen, self.data.rejected, self.data.weight
        return pair_report(scores.norm[c[idx]], scores.norm[r[idx]], w[idx], head_names=scores.names,
                           epistemic_chosen=scores.epistemic[c[idx]].numpy(),
                           epistemic_rejected=scores.epistemic[r[idx]].numpy())

    def _temperature(self, scores: _Scores, cross_fitted: tuple[torch.Tensor, torch.Tensor] | None) -> _Calibration:
        """T on the held-out slice; without one, on the exact heads' out-of-fold rewards; else 1."""
        c, r, w = self.data.chosen, self.data.rejected, self.data.weight
        if len(self.calib):
            before = self._pair_report(self.calib, scores)
            d = scores.norm[c[self.calib]].mean(1) - scores.norm[r[self.calib]].mean(1)
            return _Calibration(fit_temperature(d, w[self.calib]), before=before)
        if cross_fitted is None:
            return _Calibration()
        rc_oof, rr_oof = (t.numpy() for t in cross_fitted)
        t = fit_temperature(rc_oof.mean(1) - rr_oof.mean(1), w[self.fit])
        return _Calibration(t, cross_fitted=pair_report(rc_oof / t, rr_oof / t, w[self.fit], head_names=scores.names))

    def _ood(self, members: list[_Member]) -> tuple[list[OodStats | None], OodCalibration | None]:
        """OOD statistics of every member's training embeddings, the flag's threshold on held-out pairs."""
        cfg = self.cfg
        if cfg.ood_quantile is None:
            return [None] * len(members), None
        fit_idx, held_idx = split_pairs(self.data.chosen, self.data.rejected, cfg.ood_holdout, cfg.seed)
        if len(held_idx) < 20 or len(fit_idx) < 2:
            self.rep.phase("finalize", f"too few held-out responses ({len(held_idx)}) for an OOD threshold: none")
            return [None] * len(members), None
        where = (f"{self.cfg.data or 'the preference store'}: {len(held_idx)} responses of a held-out "
                 f"{cfg.ood_holdout:.0%} of the training pairs (seed {cfg.seed})")
        stats, cal, info = fit_ood([m.embeddings for m in members], fit_idx, held_idx,
                                   quantile=cfg.ood_quantile, calibrated_on=where, seed=cfg.seed)
        self.rep.phase("finalize", f"OOD threshold {cal.threshold:.3f} ({cal.quantile:.0%} of {len(held_idx)} "
                                   f"held-out responses; shrinkage {info['shrinkage']})")
        return stats, cal

    def _adapter_record(self, mem: _Member) -> dict[str, Any]:
        """What a fine-tuned member changed: which layers and how (the manifest keeps it)."""
        if mem.delta is None:
            return {}
        prefix = find_layers(self.backbone.model)[0] + "."
        layers = sorted({int(n[len(prefix):].split(".")[0]) for n in mem.delta
                         if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()})
        return {"adapter": f"lora-r{self.cfg.lora_rank}" if self.cfg.lora_rank > 0 else "full",
                "trained_layers": layers}

    def _save_members(self, members: list[_Member], factors: list[torch.Tensor],
                      ood: list[OodStats | None]) -> list[MemberSpec]:
        cfg = self.cfg
        backbone_ref = cfg.backbone if cfg.backbone.startswith("builtin:") else str(Path(cfg.backbone).resolve())
        specs = []
        for m, (mem, f, o) in enumerate(zip(members, factors, ood, strict=True)):
            spec = MemberSpec(name=f"member{m}", backbone=backbone_ref, pooling=self.backbone.pooling,
                              num_layers=cfg.num_layers, **self._adapter_record(mem))
            save_member(self.out, spec, MemberTensors(mem.weight, mem.bias, mem.delta, f, o))
            specs.append(spec)
        return specs

    def _write_manifest(self, specs: list[MemberSpec], scores: _Scores, temperature: float,
                        train_metrics: dict[str, Any], calib_metrics: dict[str, Any] | None,
                        ood: OodCalibration | None = None) -> EnsembleManifest:
        cfg = self.cfg
        version = cfg.version or (
            datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + self.fingerprint[:8]
        )
        manifest = EnsembleManifest(
            name=cfg.name or self.out.resolve().name, version=version, kind=cfg.kind, members=specs,
            shift=list(scores.shift), scale=list(scores.scale), uncertainty_penalty=cfg.uncertainty_penalty,
            max_tokens=self.encoder.max_tokens, dtype=cfg.serve_dtype, chat_template=True,
            training=self._metadata(temperature, train_metrics, calib_metrics),
            ood=asdict(ood) if ood is not None else None,
        )
        write_manifest(self.out, manifest)  # last: the directory is complete from here on
        return manifest

    def _evaluate_dev(self) -> dict[str, Any] | None:
        """The dev set scored through the serving engine from the directory just written."""
        if not self.cfg.dev:
            return None
        from rmserve.training.evaluate import evaluate

        self.rep.phase("eval", f"evaluating {self.out} on {self.cfg.dev} through the serving engine")
        t0 = time.monotonic()
        dev = evaluate(self.out, self.cfg.dev, token_budget=self.cfg.token_budget)
        self.timing["dev_eval_s"] = time.monotonic() - t0
        return dev

    def _report(self, manifest: EnsembleManifest, features: dict[str, Any] | None, heads: dict[str, Any] | None,
                calibration: _Calibration, train_metrics: dict[str, Any], calib_metrics: dict[str, Any] | None,
                dev: dict[str, Any] | None) -> dict[str, Any]:
        data = self.data
        return {
            "ensemble": str(self.out), "name": manifest.name, "version": manifest.version,
            "config": self.cfg.to_dict(),
            "data": {**self.data_report.to_dict(), "sequences": len(data.seqs), "truncated_sequences": data.truncated,
                     "fit_pairs": len(self.fit), "calibration_pairs": len(self.calib)},
            "features": features,
            "heads": heads,
            "temperature": calibration.temperature,
            "train": train_metrics,
            "calibration_split_before_temperature": calibration.before,
            "calibration_split": calib_metrics,
            "cross_fitted": calibration.cross_fitted,
            "dev": dev,
        }

    def _metadata(self, temperature: float, fit: dict, calib: dict | None) -> dict[str, Any]:
        import transformers

        def headline(rep: dict | None) -> dict | None:
            return None if rep is None else {k: rep[k] for k in ("pairs", "accuracy", "ece", "brier", "auroc_std")}

        return {
            "trainer": "rmserve.training/1",
            "config": self.cfg.to_dict(),
            "data": {**self.data_source, "fingerprint": self.fingerprint, "pairs": len(self.data),
                     "skipped": self.data_report.skipped},
            "temperature": temperature,
            "lambda0": self.cfg.lambda0,
            "train_metrics": headline(fit),
            "calibration_metrics": headline(calib),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }


def _load_data(cfg: TrainConfig) -> tuple[list[Pair], DataReport, dict[str, Any]]:
    """The pairs, their report, and what identifies the source (path or store, and a sha256)."""
    if not cfg.from_store:
        path = Path(cfg.data)
        pairs, report = load_pairs(path, strict=cfg.strict)
        return pairs, report, {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    store = SqliteStore(cfg.from_store)
    try:
        filters = Filters(**(cfg.store_filters or {}))
        rows = list(training_rows(store, filters))
    finally:
        store.close()
    pairs, report = pairs_from_rows(rows, strict=cfg.strict)
    if not pairs:
        raise DataError(f"the preference store {cfg.from_store} has no usable pairs for {filters}\n{report.summary()}")
    digest = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for _, r in rows).encode()).hexdigest()
    return pairs, report, {"store": str(Path(cfg.from_store).resolve()), "filters": cfg.store_filters or {},
                           "sha256": digest}


__all__ = ["TrainConfig", "TrainResult", "TrainingStopped", "train"]
