"""Train a reward-model ensemble with the Bradley-Terry loss and write it as an ensemble directory.

`train(config, progress=, should_stop=)` is the whole run in one function that
reads top to bottom, in the manner of nanoGPT's train.py:

1. setup: open the output directory (or the checkpoint to resume), parse and
   encode the pairs exactly as serving encodes them, hold out a slice of TRAIN
   (by source row) for the temperature, compute what stays frozen once
   (last-token features through the serving engine, or the frozen layers'
   output), cached on disk (training/inputs.py);
2. members, one after the other: `heads` trains one backbone with K heads, each
   on its own bootstrap resample and init; `members` trains K backbones (last N
   layers or LoRA), each with its own seed, init and data order. A member the
   checkpoint holds is loaded, one it stopped inside continues at its step.
   Each optimizer step: schedule, `grad_accum` micro-batches of whole pairs
   (chosen and rejected in one forward, length-sorted batches) with forward,
   loss and backward, clip, AdamW step, a `step` event, and a checkpoint at
   every epoch end, every `checkpoint_every_s` and when `should_stop()` turns
   True (then TrainingStopped). `head_solver=lbfgs` solves each head exactly
   instead (training/linear_heads.py);
3. finalisation (training/finalize.py): normalisation, temperature, epistemic
   and OOD statistics, the ensemble directory with its manifest last, the dev
   evaluation; then `train_report.json` and the `done` event.

It runs in the caller's thread and holds no global state (own RNGs, no torch
global settings); a resumed run ends with the ensemble an uninterrupted one gives.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.ensemble import EnsembleManifest, atomic_write_bytes
from rmserve.training import checkpoint
from rmserve.training.checkpoint import CHECKPOINT, LOG, REPORT
from rmserve.training.events import ProgressCallback, ProgressEvent, Reporter, TrainingStopped
from rmserve.training.finalize import finalize
from rmserve.training.inputs import device_for, fit_pairs, frozen_inputs, load_data, member_inputs
from rmserve.training.length import project_out
from rmserve.training.linear_heads import ExactFit, fit_exact_heads
from rmserve.training.loss import bt_loss
from rmserve.training.members import Member, finish_member, new_trainable
from rmserve.training.schedule import derive_seed, generator, length_sorted_batches, lr_scale


@dataclass
class TrainResult:
    out: Path
    manifest: EnsembleManifest
    report: dict[str, Any]


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
    cfg, out = config, Path(config.out)
    ckpt_dir = out / CHECKPOINT
    should_stop = should_stop or (lambda: False)
    resumed = checkpoint.prepare_out(cfg)  # refusals raise here, before any event
    rep = Reporter(progress, out / LOG)
    with rep.reporting_errors():
        # -- setup: the data, encoded as serving encodes it, and the split ----------------------------
        t0 = time.monotonic()
        timing: dict[str, float] = {}
        source = f"the preference store {cfg.from_store}" if cfg.from_store else ", ".join(cfg.data_files)
        rep.emit(ProgressEvent("start", "data", message=f"{cfg.kind} x{cfg.num_heads} on {source}"))
        data = load_data(cfg)
        if resumed and resumed[0]["fingerprint"] != data.fingerprint:
            raise ValueError("--resume: the training data (after encoding) differs from the checkpoint's"
                             + (" (with --augment, the --dev files too: their prompts are never augmented)"
                                if cfg.augment else ""))
        rep.phase("data", f"{data.report.summary()}\n{len(data.pairs.seqs)} sequences "
                          f"({data.pairs.truncated} truncated); {data.split_note}")
        timing["data_s"] = time.monotonic() - t0

        # what does not change during training, computed once: frozen features, or frozen layers' output
        device = device_for(cfg)
        frozen = frozen_inputs(cfg, data, device, rep, should_stop, timing)

        # -- the step budget ---------------------------------------------------------------------------
        n_members, k = (1, cfg.num_heads) if cfg.kind == "heads" else (cfg.num_heads, 1)
        spe = math.ceil(math.ceil(len(data.fit) / cfg.batch_size) / cfg.grad_accum)  # optimizer steps per epoch
        total = n_members * cfg.epochs * spe  # optimizer steps over all members
        if cfg.head_solver == "lbfgs":  # one exact fit per head (plus the CV fits), no epochs
            spe, total = k, k
        per_member = cfg.epochs * spe
        log_every = cfg.log_every or max(1, total // 200)
        lengths = data.pairs.pair_lengths()[data.fit]

        # -- members -----------------------------------------------------------------------------------
        t1 = time.monotonic()
        serial = resumed[0].get("serial", 0) if resumed else 0  # numbers the checkpoint writes
        members_done = resumed[0]["members_done"] if resumed else 0
        members: list[Member] = []
        exact = ExactFit()  # the last exact fit's, as every member uses the same solver and split
        step = 0  # optimizer steps over all members, this job (resumed ones included)
        for m in range(n_members):
            if m < members_done:  # finished before the stop: its checkpoint, not a retraining
                members.append(checkpoint.load_finished(ckpt_dir, m))
                rep.phase("train", f"member {m} restored from the checkpoint")
                step += per_member
                continue
            seed = derive_seed(cfg.seed, "member", m)
            pairs = fit_pairs(data, k, seed, cfg.use_bootstrap, device)
            embed_fn, tuned, whitening = member_inputs(cfg, data, frozen, seed, device)

            if cfg.head_solver == "lbfgs":
                weight, exact = fit_exact_heads(
                    pairs, embed_fn, seed=seed, l2=cfg.head_l2, sources=[data.pairs.source[i] for i in data.fit],
                    num_seqs=len(data.pairs.seqs), cross_fit=not len(data.calib), rep=rep, member=m,
                    real_seqs=data.real_seqs,
                    step=step, total=total)
                step += k
                bias = torch.zeros(k)
            else:
                trainable = new_trainable(cfg, k, data.backbone.hidden_size, seed, tuned, device)
                epoch0, step0 = 0, 0
                if resumed and resumed[0].get("current", {}).get("member") == m:  # stopped inside this member
                    epoch0, step0 = checkpoint.restore_position(resumed, trainable, device)
                    rep.phase("train", f"resumed member {m} at epoch {epoch0}, step {step0}")
                step = m * per_member + epoch0 * spe + step0
                rep.phase("train", f"member {m}: {k} head(s), {len(pairs.fit)} pairs, {per_member} steps")
                t_start = last_ckpt = time.monotonic()
                steps_at_start = step
                # loss/accuracy since the last step event; spans epochs
                loss_sum, hits, seen, n_steps = 0.0, 0.0, 0.0, 0

                for epoch in range(epoch0, cfg.epochs):
                    batches = length_sorted_batches(lengths, cfg.batch_size, generator(seed, "order", epoch))
                    for s in range(step0 if epoch == epoch0 else 0, spe):
                        # schedule: warmup, then cosine, over this member's steps
                        scale = lr_scale(epoch * spe + s, per_member, cfg.warmup_frac)
                        for g, base in zip(trainable.opt.param_groups, trainable.base_lrs, strict=True):
                            g["lr"] = base * scale

                        # forward, loss, backward over `grad_accum` micro-batches of whole pairs
                        group = batches[s * cfg.grad_accum : (s + 1) * cfg.grad_accum]
                        for rows_np in group:
                            rows = torch.as_tensor(rows_np)
                            pidx = pairs.fit[rows]
                            e = embed_fn(torch.cat([pairs.chosen[pidx], pairs.rejected[pidx]]))  # one batch
                            r = e @ trainable.weight.T + trainable.bias
                            rc, rr = r[: len(rows)], r[len(rows) :]
                            rows_d = rows.to(device)
                            w = pairs.counts[:, rows_d].T * pairs.weight[rows_d, None]  # bootstrap x pair weight
                            loss = bt_loss(rc, rr, margin=pairs.margin[rows_d], weight=w, center_coef=cfg.center_coef)
                            (loss / len(group)).backward()
                            with torch.no_grad():
                                d = rc.mean(1) - rr.mean(1)
                                loss_sum += loss.item() / len(group)
                                hits += float((pairs.weight[rows_d] * (d > 0)).sum())
                                seen += float(pairs.weight[rows_d].sum())

                        # clip, step
                        if cfg.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(trainable.params, cfg.max_grad_norm)
                        trainable.opt.step()
                        trainable.opt.zero_grad(set_to_none=True)
                        step += 1
                        n_steps += 1

                        # a `step` event every `log_every` steps and at the member's last one
                        if step % log_every == 0 or (epoch == cfg.epochs - 1 and s == spe - 1):
                            rate = (time.monotonic() - t_start) / max(1, step - steps_at_start)
                            rep.emit(ProgressEvent(
                                "step", "train", step=step, total=total, member=m, epoch=epoch,
                                loss=round(loss_sum / n_steps, 5), accuracy=round(hits / max(seen, 1e-12), 4),
                                lr=trainable.base_lrs[-1] * scale, eta_s=round(rate * (total - step), 1),
                            ))
                            loss_sum, hits, seen, n_steps = 0.0, 0.0, 0.0, 0

                        # checkpoint at each epoch end, every `checkpoint_every_s`, and when asked to stop
                        epoch_end = s + 1 == spe
                        stop = should_stop()
                        if stop or epoch_end or time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
                            serial += 1
                            checkpoint.save_position(ckpt_dir, checkpoint.state(serial, cfg, data.fingerprint, m),
                                                     trainable, m, *((epoch + 1, 0) if epoch_end else (epoch, s + 1)))
                            rep.emit(ProgressEvent("checkpoint", "train", step=step, total=total, member=m))
                            last_ckpt = time.monotonic()
                        if stop:
                            rep.emit(ProgressEvent("stopped", "train", step=step, total=total, member=m,
                                                   message=f"checkpoint in {ckpt_dir}; resume to continue"))
                            raise TrainingStopped(f"stopped at step {step}/{total}; checkpoint in {ckpt_dir}")
                    rep.emit(ProgressEvent("epoch", "train", step=step, total=total, member=m, epoch=epoch))
                weight, bias = trainable.weight, trainable.bias

            if frozen.length_dir is not None:  # --length-debias decorrelate: heads blind to the length direction
                weight = project_out(weight.detach().double(), frozen.length_dir).float()
            member = finish_member(m, weight, bias, tuned, whitening, cfg=cfg, data=data, frozen=frozen,
                                   device=device, rep=rep, timing=timing)
            members.append(member)
            serial += 1
            checkpoint.save_finished(ckpt_dir, m, member, checkpoint.state(serial, cfg, data.fingerprint, m + 1))
        timing["train_s"] = time.monotonic() - t1

        # -- finalisation: normalisation, temperature, OOD, the ensemble directory, the reports --------
        manifest, report = finalize(cfg, out, data, members, frozen.info, exact, rep, timing)
        timing["total_s"] = time.monotonic() - t0
        report["timing"] = {key: round(v, 3) for key, v in timing.items()}
        atomic_write_bytes(out / REPORT, (json.dumps(report, indent=2) + "\n").encode())
        if not cfg.keep_checkpoint:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        rep.emit(ProgressEvent("done", "finalize", step=total, total=total, report=report, message=f"wrote {out}"))
        return TrainResult(out, manifest, report)


__all__ = ["CHECKPOINT", "LOG", "REPORT", "TrainConfig", "TrainResult", "TrainingStopped", "train"]
