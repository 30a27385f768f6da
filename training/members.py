"""A member while it trains (`Trainable`: what AdamW steps) and once trained (`Member`: raw-space heads,
its backbone delta and the embeddings finalisation reads).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.padding import pad_token_id
from rmserve.training import frozen_states
from rmserve.training.events import Reporter
from rmserve.training.inputs import Frozen, TrainingData
from rmserve.training.schedule import generator
from rmserve.training.tuning import Tuned, embed_all


@dataclass
class Member:
    """A trained member in raw embedding space (before normalisation)."""

    weight: torch.Tensor                    # [K, H]
    bias: torch.Tensor                      # [K]
    delta: dict[str, torch.Tensor] | None   # trained backbone tensors
    embeddings: torch.Tensor                # [N, H] of every training sequence, final backbone


@dataclass
class Trainable:
    """What AdamW steps for one member: the heads and, for `members`, the trainable backbone part."""

    weight: torch.nn.Parameter          # [K, H]
    bias: torch.nn.Parameter            # [K]
    tuned: Tuned | None
    opt: torch.optim.Optimizer
    base_lrs: list[float]               # per param group, before the schedule's scale
    params: list[torch.nn.Parameter]    # every optimised tensor, for gradient clipping


def new_trainable(cfg: TrainConfig, k: int, hidden: int, seed: int, tuned: Tuned | None,
                  device: torch.device) -> Trainable:
    """AdamW over K heads, each with its own init, and the trainable backbone part at its own lr."""
    init = torch.randn(k, hidden, generator=generator(seed, "init")) * 0.02
    weight = torch.nn.Parameter(init.to(device))
    bias = torch.nn.Parameter(torch.zeros(k, device=device))
    groups = [{"params": [weight, bias], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if tuned is not None:
        groups.append({"params": tuned.parameters(), "lr": cfg.backbone_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    return Trainable(weight, bias, tuned, opt, base_lrs=[g["lr"] for g in opt.param_groups],
                     params=[p for g in opt.param_groups for p in g["params"]])


def finish_member(m: int, weight: torch.Tensor, bias: torch.Tensor, tuned: Tuned | None, whitening: tuple | None,
                  *, cfg: TrainConfig, data: TrainingData, frozen: Frozen, device: torch.device, rep: Reporter,
                  timing: dict[str, float]) -> Member:
    """Heads back in raw embedding space; for a trained backbone: its delta and final embeddings."""
    w_out, b_out = weight.detach().float().cpu(), bias.detach().float().cpu()
    if tuned is None:
        mu, sd = whitening
        w_out = w_out / sd
        return Member(w_out, b_out - w_out @ mu, None, frozen.features)
    delta = tuned.finish()
    t0 = time.monotonic()
    seqs = data.pairs.seqs
    rep.phase("finalize", f"member {m}: embeddings of {len(seqs)} training sequences")
    if frozen.prefix is not None:
        emb = frozen_states.embed_all_from(tuned.base, frozen.prefix, device=device, token_budget=cfg.token_budget)
    else:
        emb = embed_all(tuned.base, seqs, pad_id=pad_token_id(data.backbone.tokenizer),
                        pooling=data.backbone.pooling, device=device, token_budget=cfg.token_budget)
    timing["embeddings_s"] = timing.get("embeddings_s", 0.0) + time.monotonic() - t0
    tuned.restore()
    tuned.base.to("cpu")
    return Member(w_out, b_out, {n: t.cpu() for n, t in delta.items()}, emb)
