"""Train a reward-model ensemble with the Bradley-Terry loss and write it as an ensemble directory.

`train(config, progress=, should_stop=)` reads top to bottom:

1. data: parse the JSONL, encode every conversation with the serving encoder,
   hold out a slice of TRAIN (by source row) to fit the temperature;
2. frozen features (heads on a frozen backbone): last-token embeddings once,
   through the serving engine, cached on disk;
3. members: `heads` trains one backbone with K heads, each on its own bootstrap
   resample and init; `members` trains K backbones (last N layers or LoRA),
   each with its own seed, init and data order, one after the other. Chosen and
   rejected of a pair share a forward batch; batches are length-sorted;
   gradients accumulate over `grad_accum` micro-batches; bf16 autocast on GPU;
4. finalize: per-head shift/scale (train rewards mean 0, std 1), temperature
   on the held-out slice folded into scale, epistemic factor per member,
   heads/deltas/factors written, manifest last, then the dev evaluation through
   the serving engine and `train_report.json`.

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from rmserve.service.engine.padding import pad_token_id
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training import checkpoint, frozen_states
from rmserve.training.config import TrainConfig
from rmserve.training.data import load_pairs
from rmserve.training.encoding import EncodedPairs, encode_pairs
from rmserve.training.events import ProgressCallback, ProgressEvent, Reporter, TrainingStopped
from rmserve.training.features import cached_features
from rmserve.training.frozen_states import FrozenStates
from rmserve.training.linear_heads import choose_l2, cross_fitted_rewards, fit_bt_head
from rmserve.training.loss import bt_loss
from rmserve.training.metrics import pair_report
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
        self.rep.emit(ProgressEvent("start", "data", message=f"{cfg.kind} x{cfg.num_heads} on {cfg.data}"))

        # 1. data, encoded exactly as serving encodes
        pairs, self.data_report = load_pairs(cfg.data, strict=cfg.strict)
        self.backbone: Backbone = load_backbone(cfg.backbone, num_layers=cfg.num_layers)
        self.encoder = PromptEncoder(self.backbone.tokenizer, min(cfg.max_tokens, self.backbone.max_positions))
        self.data: EncodedPairs = encode_pairs(pairs, self.encoder, self.data_report, strict=cfg.strict)
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
        self.features = self._frozen_features() if cfg.finetune_layers == 0 else None
        self.prefix = self._prefix_states() if cfg.finetune_layers != 0 and cfg.prefix_cache else None

        # 3. members
        n_members, self.k = (1, cfg.num_heads) if cfg.kind == "heads" else (cfg.num_heads, 1)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.fit) / cfg.batch_size) / cfg.grad_accum)
        self.total = n_members * cfg.epochs * self.steps_per_epoch
        if cfg.head_solver == "lbfgs":  # one exact fit per head (plus the CV fits), no epochs
            self.steps_per_epoch, self.total = self.k, self.k
        done = self.resumed[0]["members_done"] if self.resumed else 0
        t1 = time.monotonic()
        members: list[_Member] = []
        for m in range(n_members):
            if m < done:
                members.append(self._load_member(m))
                self.step += cfg.epochs * self.steps_per_epoch
                continue
            members.append(self._train_member(m))
            self._save_member(m, members[-1])
        self.timing["train_s"] = time.monotonic() - t1

        # 4. normalisation, temperature, epistemic statistics, the ensemble directory, the reports
        result = self._finalize(members)
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

    def _frozen_features(self) -> torch.Tensor:
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
        self.feature_info = {"cache_key": key, "cache_hit": hit, "sequences": n, "seconds": round(secs, 3),
                             "seconds_per_pair": round(secs / max(1, len(self.data)), 5)}
        self.rep.phase("features", f"{'cache hit' if hit else 'computed'} in {secs:.1f}s (key {key})")
        return feats

    def _progress(self, phase: str, t0: float) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            eta = (time.monotonic() - t0) / done * (total - done)
            self.rep.emit(ProgressEvent("step", phase, step=done, total=total, eta_s=round(eta, 1)))

        return report

    def _cache_dir(self) -> Path | None:
        return None if self.cfg.feature_cache == "" else Path(self.cfg.feature_cache or cache_dir() / "features")

    def _prefix_states(self) -> FrozenStates | None:
        cfg, model = self.cfg, self.backbone.model
        n_blocks = len(find_layers(model)[1])
        first = n_blocks - min(cfg.finetune_layers, n_blocks) if cfg.finetune_layers > 0 else 0
        if first == 0 or self.backbone.pooling != "last":
            self.rep.phase("features", "no prefix cache: every layer is trained" if first == 0
                           else "no prefix cache: it supports last-token (decoder) backbones only")
            return None
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
        self.feature_info = {"prefix_first_layer": first, "cache_key": key, "cache_hit": hit,
                             "sequences": len(seqs), "tokens": int(states.offsets[-1]), "seconds": round(secs, 3),
                             "seconds_per_pair": round(secs / max(1, len(self.data)), 5), "problem": problem}
        if problem:
            self.rep.phase("features", f"prefix cache not usable for this architecture ({problem}); "
                                       "training runs full forwards")
            return None
        return states

    # -- 3. one member ----------------------------------------------------------------------

    def _train_member(self, m: int) -> _Member:
        cfg, data, k = self.cfg, self.data, self.k
        seed = derive_seed(cfg.seed, "member", m)
        fit = torch.as_tensor(self.fit)
        h = self.backbone.hidden_size

        # heads: own init per head; bootstrap multiplicities as per-head pair weights
        weight = torch.nn.Parameter((torch.randn(k, h, generator=generator(seed, "init")) * 0.02).to(self.device))
        bias = torch.nn.Parameter(torch.zeros(k, device=self.device))
        counts = bootstrap_counts(k, len(fit), seed, cfg.use_bootstrap).to(self.device)
        pair_w = torch.as_tensor(data.weight[self.fit], dtype=torch.float32, device=self.device)
        pair_margin = torch.as_tensor(data.margin[self.fit], dtype=torch.float32, device=self.device)
        chosen = torch.as_tensor(data.chosen)
        rejected = torch.as_tensor(data.rejected)

        embed_fn, tuned, whitening = self._inputs(seed)
        if cfg.head_solver == "lbfgs":
            return self._fit_exact_heads(m, seed, counts, pair_w, pair_margin, chosen, rejected, embed_fn, whitening)
        groups = [{"params": [weight, bias], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if tuned is not None:
            groups.append({"params": tuned.parameters(), "lr": cfg.backbone_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups)
        base_lrs = [g["lr"] for g in opt.param_groups]
        params = [p for g in opt.param_groups for p in g["params"]]

        per_member = cfg.epochs * self.steps_per_epoch
        epoch0, step0 = 0, 0
        if self.resumed and self.resumed[0].get("current", {}).get("member") == m:
            epoch0, step0 = self._restore(weight, bias, tuned, opt)
        self.step = m * per_member + epoch0 * self.steps_per_epoch + step0
        lengths = data.pair_lengths()[self.fit]
        log_every = cfg.log_every or max(1, self.total // 200)
        window = {"loss": 0.0, "acc": 0.0, "w": 0.0, "n": 0}
        t_start, steps_at_start = time.monotonic(), self.step
        last_ckpt = time.monotonic()
        self.rep.phase("train", f"member {m}: {k} head(s), {len(fit)} pairs, {per_member} steps")

        for epoch in range(epoch0, cfg.epochs):
            batches = length_sorted_batches(lengths, cfg.batch_size, generator(seed, "order", epoch))
            for s in range(step0 if epoch == epoch0 else 0, self.steps_per_epoch):
                scale = lr_scale(epoch * self.steps_per_epoch + s, per_member, cfg.warmup_frac)
                for g, base in zip(opt.param_groups, base_lrs, strict=True):
                    g["lr"] = base * scale
                group = batches[s * cfg.grad_accum : (s + 1) * cfg.grad_accum]
                for rows_np in group:
                    rows = torch.as_tensor(rows_np)
                    pidx = fit[rows]
                    e = embed_fn(torch.cat([chosen[pidx], rejected[pidx]]))  # chosen and rejected in one batch
                    r = e @ weight.T + bias
                    rc, rr = r[: len(rows)], r[len(rows) :]
                    rows_d = rows.to(self.device)
                    w = counts[:, rows_d].T * pair_w[rows_d, None]
                    loss = bt_loss(rc, rr, margin=pair_margin[rows_d], weight=w, center_coef=cfg.center_coef)
                    (loss / len(group)).backward()
                    with torch.no_grad():
                        d = rc.mean(1) - rr.mean(1)
                        window["loss"] += loss.item() / len(group)
                        window["acc"] += float((pair_w[rows_d] * (d > 0)).sum())
                        window["w"] += float(pair_w[rows_d].sum())
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.step += 1
                window["n"] += 1
                last = epoch == cfg.epochs - 1 and s == self.steps_per_epoch - 1
                if self.step % log_every == 0 or last:
                    rate = (time.monotonic() - t_start) / max(1, self.step - steps_at_start)
                    self.rep.emit(ProgressEvent(
                        "step", "train", step=self.step, total=self.total, member=m, epoch=epoch,
                        loss=round(window["loss"] / window["n"], 5), accuracy=round(window["acc"] / max(window["w"], 1e-12), 4),
                        lr=base_lrs[-1] * scale, eta_s=round(rate * (self.total - self.step), 1),
                    ))
                    window = {"loss": 0.0, "acc": 0.0, "w": 0.0, "n": 0}
                position = (epoch, s + 1) if s + 1 < self.steps_per_epoch else (epoch + 1, 0)
                stop = self.should_stop()
                if stop or s + 1 == self.steps_per_epoch or time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
                    self._checkpoint(m, position, weight, bias, tuned, opt)
                    last_ckpt = time.monotonic()
                if stop:
                    self.rep.emit(ProgressEvent("stopped", "train", step=self.step, total=self.total, member=m,
                                                message=f"checkpoint in {self.ckpt_dir}; resume to continue"))
                    raise TrainingStopped(f"stopped at step {self.step}/{self.total}; checkpoint in {self.ckpt_dir}")
            self.rep.emit(ProgressEvent("epoch", "train", step=self.step, total=self.total, member=m, epoch=epoch))

        return self._finish_member(m, weight, bias, tuned, whitening)

    def _fit_exact_heads(self, m: int, seed: int, counts, pair_w, pair_margin, chosen, rejected, embed_fn,
                         whitening) -> _Member:
        """Frozen features: each head's L2 logistic regression solved exactly (training/linear_heads.py)."""
        cfg, fit = self.cfg, torch.as_tensor(self.fit)
        dx = (embed_fn(chosen[fit]) - embed_fn(rejected[fit])).double()
        sources = [self.data.source[i] for i in self.fit]  # folds by source row: a ranked list stays together
        l2 = cfg.head_l2
        if l2 is None:
            choice = choose_l2(dx, pair_w.double(), seed=derive_seed(seed, "cv"), groups=sources)
            l2 = choice.l2
            self.head_info = {"solver": "lbfgs", "l2": l2, "chosen_by": f"{choice.folds}-fold CV NLL on train",
                              "cv_accuracy": {str(g): round(v, 4) for g, v in choice.cv_accuracy.items()},
                              "cv_nll": {str(g): round(v, 5) for g, v in choice.cv_nll.items()}}
            self.rep.phase("train", f"L2 {l2:g} chosen by {choice.folds}-fold CV on train "
                                    f"(CV accuracy {choice.cv_accuracy[l2]:.3f})")
        else:
            self.head_info = {"solver": "lbfgs", "l2": l2, "chosen_by": "--head-l2"}
        if not len(self.calib):  # no held-out slice: the temperature comes from out-of-fold margins
            self.rep.phase("train", "out-of-fold rewards on train (5 folds) for the temperature")
            seqs = torch.unique(torch.cat([chosen[fit], rejected[fit]]))
            where = torch.full((len(self.data.seqs),), -1, dtype=torch.long)
            where[seqs] = torch.arange(len(seqs))
            self.cross_fitted = cross_fitted_rewards(
                embed_fn(seqs), where[chosen[fit]], where[rejected[fit]], counts.double() * pair_w.double(),
                l2=l2, margin=pair_margin, seed=derive_seed(seed, "cv"), groups=sources)
        weights = []
        t0 = time.monotonic()
        for j in range(self.k):
            w = fit_bt_head(dx, counts[j].double() * pair_w.double(), l2=l2, margin=pair_margin)
            weights.append(w.float())
            self.step += 1
            d = dx @ w
            self.rep.emit(ProgressEvent(
                "step", "train", step=self.step, total=self.total, member=m,
                loss=round(float((pair_w * torch.nn.functional.softplus(pair_margin - d.float())).sum() / pair_w.sum()), 5),
                accuracy=round(float((pair_w * (d > 0)).sum() / pair_w.sum()), 4),
                eta_s=round((time.monotonic() - t0) / (j + 1) * (self.k - j - 1), 1),
            ))
        return self._finish_member(m, torch.stack(weights), torch.zeros(self.k), None, whitening)

    def _inputs(self, seed: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], Tuned | None, tuple | None]:
        """What the heads read for sequence ids: whitened cached features, or the partly trainable backbone.

        Returns (embed_fn, the trainable backbone or None, (mu, sd) of the whitening or None).
        """
        data = self.data
        if self.features is not None:
            fit_seqs = torch.unique(torch.as_tensor(np.concatenate([data.chosen[self.fit], data.rejected[self.fit]])))
            mu = self.features[fit_seqs].mean(0)
            sd = self.features[fit_seqs].std(0)
            # a dimension constant on train gets sd = inf: whitened to 0 and weight 0 once folded back,
            # rather than an untrained weight / ~0 that would explode on a served sample
            sd = torch.where(sd > 1e-6 * float(sd.max()), sd, torch.full_like(sd, float("inf")))
            x = (self.features - mu) / sd  # conditioning for the heads; folded back into them at the end
            return (lambda ids: x[ids]), None, (mu, sd)
        cfg = self.cfg
        tuned = make_trainable(self.backbone.model, layers=cfg.finetune_layers, lora_rank=cfg.lora_rank,
                               lora_alpha=cfg.lora_alpha, seed=derive_seed(seed, "lora"))
        tuned.model.to(self.device)
        pad = pad_token_id(self.backbone.tokenizer)
        model, states, device, pooling = tuned.model, self.prefix, self.device, self.backbone.pooling

        def embed_fn(ids: torch.Tensor) -> torch.Tensor:
            if states is not None:  # only the trained layers run
                return frozen_states.embed_from(model, states, ids.tolist(), pooling="last", device=device, amp=True)
            return embed(model, [data.seqs[i] for i in ids.tolist()], pad_id=pad, pooling=pooling,
                         device=device, amp=True)

        return embed_fn, tuned, None

    def _finish_member(self, m: int, weight, bias, tuned: Tuned | None, whitening: tuple | None) -> _Member:
        """Heads back in raw embedding space; for a trained backbone: its delta and final embeddings."""
        w_out, b_out = weight.detach().float().cpu(), bias.detach().float().cpu()
        if tuned is None:
            mu, sd = whitening
            w_out = w_out / sd
            return _Member(w_out, b_out - w_out @ mu, None, self.features)
        cfg = self.cfg
        delta = tuned.finish()
        t0 = time.monotonic()
        self.rep.phase("finalize", f"member {m}: embeddings of {len(self.data.seqs)} training sequences")
        if self.prefix is not None:
            emb = frozen_states.embed_all_from(tuned.base, self.prefix, device=self.device, token_budget=cfg.token_budget)
        else:
            emb = embed_all(tuned.base, self.data.seqs, pad_id=pad_token_id(self.backbone.tokenizer),
                            pooling=self.backbone.pooling, device=self.device, token_budget=cfg.token_budget)
        self.timing["embeddings_s"] = self.timing.get("embeddings_s", 0.0) + time.monotonic() - t0
        tuned.restore()
        tuned.base.to("cpu")
        return _Member(w_out, b_out, {n: t.cpu() for n, t in delta.items()}, emb)

    # -- checkpoints -------------------------------------------------------------------

    def _checkpoint(self, m: int, position: tuple[int, int], weight, bias, tuned: Tuned | None, opt) -> None:
        tensors, opt_meta = checkpoint.optimizer_to_tensors(opt)
        tensors = {k: v.cpu() for k, v in tensors.items()}
        tensors["head.weight"], tensors["head.bias"] = weight.detach().cpu(), bias.detach().cpu()
        if tuned is not None:
            tensors.update({f"param.{n}": t.cpu() for n, t in tuned.trainable_state().items()})
        state = self._state(members_done=m)
        state["current"] = {"member": m, "epoch": position[0], "step": position[1], "optimizer": opt_meta}
        checkpoint.save(self.ckpt_dir, state, tensors)
        self.rep.emit(ProgressEvent("checkpoint", "train", step=self.step, total=self.total, member=m))

    def _state(self, members_done: int) -> dict[str, Any]:
        self.serial += 1
        return {"serial": self.serial, "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                "members_done": members_done}

    def _restore(self, weight, bias, tuned: Tuned | None, opt) -> tuple[int, int]:
        state, tensors = self.resumed
        cur = state["current"]
        with torch.no_grad():
            weight.copy_(tensors["head.weight"])
            bias.copy_(tensors["head.bias"])
        if tuned is not None:
            tuned.load_trainable_state({n: tensors[f"param.{n}"].to(self.device) for n in tuned.names})
        checkpoint.optimizer_from_tensors(opt, tensors, cur["optimizer"])
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

    def _finalize(self, members: list[_Member]) -> TrainResult:
        cfg, data = self.cfg, self.data
        self.rep.phase("finalize", "normalisation, temperature, epistemic statistics")
        raw = torch.cat([mem.embeddings.double() @ mem.weight.double().T + mem.bias.double() for mem in members], 1)
        shift, scale = fit_normalisation(raw.numpy())
        norm = (raw.numpy() - shift) / np.array(scale)
        c, r, w = data.chosen, data.rejected, data.weight
        names = [f"member{m}/head{j}" for m, mem in enumerate(members) for j in range(mem.weight.shape[0])]

        factors = [epistemic_factor(mem.embeddings, cfg.lambda0) for mem in members]
        epi = torch.stack([(mem.embeddings @ f).norm(dim=1) for mem, f in zip(members, factors, strict=True)]).mean(0)

        def report(idx: np.ndarray, values: np.ndarray) -> dict[str, Any]:
            return pair_report(values[c[idx]], values[r[idx]], w[idx], head_names=names,
                               epistemic_chosen=epi[c[idx]].numpy(), epistemic_rejected=epi[r[idx]].numpy())

        temperature, calib_before, cross_fitted = 1.0, None, None
        if len(self.calib):
            calib_before = report(self.calib, norm)
            d = norm[c[self.calib]].mean(1) - norm[r[self.calib]].mean(1)
            temperature = fit_temperature(d, w[self.calib])
        elif getattr(self, "cross_fitted", None) is not None:
            rc_oof, rr_oof = (t.numpy() for t in self.cross_fitted)
            temperature = fit_temperature(rc_oof.mean(1) - rr_oof.mean(1), w[self.fit])
            cross_fitted = pair_report(rc_oof / temperature, rr_oof / temperature, w[self.fit], head_names=names)
        if temperature != 1.0:
            scale = [s * temperature for s in scale]
            norm = norm / temperature

        backbone_ref = cfg.backbone if cfg.backbone.startswith("builtin:") else str(Path(cfg.backbone).resolve())
        specs = []
        for m, (mem, f) in enumerate(zip(members, factors, strict=True)):
            spec = MemberSpec(name=f"member{m}", backbone=backbone_ref, pooling=self.backbone.pooling,
                              num_layers=cfg.num_layers)
            save_member(self.out, spec, MemberTensors(mem.weight, mem.bias, mem.delta, f))
            specs.append(spec)
        fit_metrics = report(self.fit, norm)
        calib_metrics = report(self.calib, norm) if len(self.calib) else None
        version = cfg.version or (
            datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + self.fingerprint[:8]
        )
        manifest = EnsembleManifest(
            name=cfg.name or self.out.resolve().name, version=version, kind=cfg.kind, members=specs,
            shift=list(shift), scale=list(scale), uncertainty_penalty=cfg.uncertainty_penalty,
            max_tokens=self.encoder.max_tokens, dtype=cfg.serve_dtype, chat_template=True,
            training=self._metadata(temperature, fit_metrics, calib_metrics),
        )
        write_manifest(self.out, manifest)  # last: the directory is complete from here on

        report_dict: dict[str, Any] = {
            "ensemble": str(self.out), "name": manifest.name, "version": version, "config": cfg.to_dict(),
            "data": {**self.data_report.to_dict(), "sequences": len(data.seqs), "truncated_sequences": data.truncated,
                     "fit_pairs": len(self.fit), "calibration_pairs": len(self.calib)},
            "features": getattr(self, "feature_info", None),
            "heads": getattr(self, "head_info", None),
            "temperature": temperature,
            "train": fit_metrics,
            "calibration_split_before_temperature": calib_before,
            "calibration_split": calib_metrics,
            "cross_fitted": cross_fitted,
            "dev": None,
        }
        if cfg.dev:
            from rmserve.training.evaluate import evaluate

            self.rep.phase("eval", f"evaluating {self.out} on {cfg.dev} through the serving engine")
            t0 = time.monotonic()
            report_dict["dev"] = evaluate(self.out, cfg.dev, token_budget=cfg.token_budget)
            self.timing["dev_eval_s"] = time.monotonic() - t0
        return TrainResult(self.out, manifest, report_dict)

    def _metadata(self, temperature: float, fit: dict, calib: dict | None) -> dict[str, Any]:
        import transformers

        def headline(rep: dict | None) -> dict | None:
            return None if rep is None else {k: rep[k] for k in ("pairs", "accuracy", "ece", "brier", "auroc_std")}

        data_path = Path(self.cfg.data)
        return {
            "trainer": "rmserve.training/1",
            "config": self.cfg.to_dict(),
            "data": {"path": str(data_path.resolve()), "sha256": hashlib.sha256(data_path.read_bytes()).hexdigest(),
                     "fingerprint": self.fingerprint, "pairs": len(self.data), "skipped": self.data_report.skipped},
            "temperature": temperature,
            "lambda0": self.cfg.lambda0,
            "train_metrics": headline(fit),
            "calibration_metrics": headline(calib),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }


__all__ = ["TrainConfig", "TrainResult", "TrainingStopped", "train"]
