"""Admin API pieces shared by both clients: request building and typed results
for Train, ListModels and ActivateModel."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rmserve.v1 import admin_pb2 as apb


@dataclass(frozen=True)
class TrainProgress:
    """One event of a training job (see docs/training.md for the event kinds)."""

    event: str               # start | phase | step | epoch | checkpoint | done | error | activated
    phase: str
    step: int
    total: int
    member: int
    epoch: int
    loss: float | None
    accuracy: float | None
    eta_s: float | None
    elapsed_s: float
    message: str
    version: str
    report: dict[str, Any] | None   # on `done`


@dataclass(frozen=True)
class ModelVersion:
    version: str
    name: str
    created_unix: float
    active: bool
    report: dict[str, Any] | None


@dataclass(frozen=True)
class Activation:
    version: str
    previous_version: str
    load_seconds: float
    propagated: bool = False   # the registry's ACTIVE pointer now names `version` (replicas on it follow)


def build_train_request(
    data_path: str,
    *,
    dev_path: str | None,
    kind: str | None,
    num_heads: int | None,
    finetune_layers: int | None,
    epochs: int | None,
    lr: float | None,
    seed: int,
    backbone: str | None,
    activate: bool,
    name: str | None,
    max_tokens: int | None,
    options: dict[str, Any] | None,
) -> apb.TrainRequest:
    return apb.TrainRequest(
        data_path=data_path, dev_path=dev_path or "", kind=kind or "", num_heads=num_heads or 0,
        finetune_layers=finetune_layers or 0, epochs=epochs or 0, lr=lr or 0.0, seed=seed,
        backbone=backbone or "", activate=activate, name=name or "", max_tokens=max_tokens or 0,
        options_json=json.dumps(options) if options else "",
    )


def parse_progress(p: apb.TrainProgress) -> TrainProgress:
    def opt(f: str) -> float | None:
        return float(getattr(p, f)) if p.HasField(f) else None

    return TrainProgress(
        event=p.event, phase=p.phase, step=int(p.step), total=int(p.total), member=int(p.member),
        epoch=int(p.epoch), loss=opt("loss"), accuracy=opt("accuracy"), eta_s=opt("eta_s"),
        elapsed_s=float(p.elapsed_s), message=p.message, version=p.version,
        report=json.loads(p.report_json) if p.report_json else None,
    )


def parse_models(resp: apb.ListModelsResponse) -> list[ModelVersion]:
    return [
        ModelVersion(m.version, m.name, float(m.created_unix), bool(m.active),
                     json.loads(m.report_json) if m.report_json else None)
        for m in resp.models
    ]


def parse_activation(resp: apb.ActivateModelResponse) -> Activation:
    return Activation(resp.version, resp.previous_version, float(resp.load_seconds), bool(resp.propagated))
