"""AdminService: Train (streamed progress), ListModels, ActivateModel."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rmserve.service.server.errors import InvalidInput, NotReady
from rmserve.service.server.jobs import JobRunner, TrainingJob
from rmserve.service.server.registry import Registry
from rmserve.service.server.rpc import call_with_status, unary
from rmserve.service.server.state import ServingState
from rmserve.v1 import admin_pb2 as apb
from rmserve.v1 import admin_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)

# TrainConfig fields a caller may not set: where the job writes is the server's choice.
_RESERVED = {"out", "version", "resume", "overwrite", "data", "dev"}  # ("from_store" is a bool here: the server's store)


def _progress(event: dict[str, Any]) -> apb.TrainProgress:
    p = apb.TrainProgress(
        event=event.get("event", ""), phase=event.get("phase", ""), step=int(event.get("step", 0)),
        total=int(event.get("total", 0)), member=int(event.get("member") or 0), epoch=int(event.get("epoch") or 0),
        elapsed_s=float(event.get("elapsed_s", 0.0)), message=event.get("message", ""), version=event.get("version", ""),
    )
    for f in ("loss", "accuracy", "eta_s"):
        if event.get(f) is not None:
            setattr(p, f, float(event[f]))
    if event.get("report") is not None:
        p.report_json = json.dumps(event["report"])
    return p


class AdminServicer(apb_grpc.AdminServiceServicer):
    def __init__(self, state: ServingState, registry: Registry, data_roots: list[str], store_path: Path | None = None):
        self.state = state
        self.store_path = store_path
        self.registry = registry
        self.data_roots = [Path(r).resolve() for r in data_roots]
        self.jobs = JobRunner(self._job_succeeded)

    def _readable(self, path: str, what: str) -> str:
        """Training data must live under a --data-root: the server reads no other file for a caller."""
        if not self.data_roots:
            raise NotReady("this server accepts no training jobs: start it with --data-root DIR (the data it may read)")
        try:  # a NUL byte or an over-long name raises rather than answering "no such file"
            p = Path(path).resolve()
            inside = any(p.is_relative_to(root) for root in self.data_roots)
            exists = inside and p.is_file()
        except (OSError, ValueError) as e:
            raise InvalidInput(f"{what} {path!r} is not a usable path: {e}") from e
        if not inside:
            raise InvalidInput(f"{what} {path!r} is outside the server's data roots {[str(r) for r in self.data_roots]}")
        if not exists:
            raise InvalidInput(f"{what} {path!r} does not exist on the server")
        return str(p)

    def _config(self, req: apb.TrainRequest) -> dict[str, Any]:
        """The job's TrainConfig fields. The preferences come from `data_path` (under a data
        root) or, with options_json {"from_store": true, "store_filters": {...}}, from the
        server's own preference store (the labels its LabelService took)."""
        live = self.state.live_slot().model
        extra: dict[str, Any] = {}
        if req.options_json:
            try:
                extra = json.loads(req.options_json)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"options_json is not valid JSON: {e}") from e
            except RecursionError as e:  # thousands of nested brackets
                raise InvalidInput("options_json is nested too deeply to read") from e
            if not isinstance(extra, dict):
                raise InvalidInput("options_json must be a JSON object of TrainConfig fields")
            if bad := sorted(_RESERVED & set(extra)):
                raise InvalidInput(f"options_json may not set {bad}: the server chooses them")
            if extra.get("feature_cache") not in (None, ""):  # a directory the job would read and write
                raise InvalidInput("options_json feature_cache may only be '' (no cache): the server chooses where it caches")
        if extra.pop("from_store", False):
            if req.data_path:
                raise InvalidInput("set data_path or options_json from_store, not both")
            if self.store_path is None or not Path(self.store_path).is_file():
                raise NotReady("this server's preference store is empty: submit labels first (LabelService)")
            cfg: dict[str, Any] = {"data": "", "from_store": str(self.store_path)}
        else:
            cfg = {"data": self._readable(req.data_path, "data_path")}
        if req.dev_path:
            cfg["dev"] = self._readable(req.dev_path, "dev_path")
        cfg.update(extra)
        for f, default in (("kind", ""), ("num_heads", 0), ("finetune_layers", 0), ("epochs", 0), ("lr", 0.0)):
            if getattr(req, f) != default:
                cfg[f] = getattr(req, f)
        cfg["seed"] = req.seed
        if not req.backbone:  # the served backbone, with its layer cut unless options_json sets one
            cfg["backbone"] = live.members[0].backbone.name
            cfg.setdefault("num_layers", live.members[0].backbone.num_layers)
        else:
            cfg["backbone"] = req.backbone
        cfg["name"] = req.name or live.name
        cfg["max_tokens"] = req.max_tokens or live.max_tokens
        from rmserve.service.data.train_config import TrainConfig

        try:
            TrainConfig(**cfg, out="-")
        except (TypeError, ValueError) as e:
            raise InvalidInput(str(e)) from e
        return cfg

    async def Train(self, request: apb.TrainRequest, context):
        async def start() -> tuple[TrainingJob, Any]:
            cfg = self._config(request)
            version = self.registry.new_version()
            listener = self.jobs.listen()
            try:
                job = self.jobs.start(
                    cfg, version=version, staging=self.registry.root / f".staging-{version}",
                    final=self.registry.path_for(version), activate=request.activate,
                )
            except BaseException:
                self.jobs.unlisten(listener)
                raise
            return job, listener

        job, listener = await call_with_status(self.state.metrics, "Train", context, start, request)
        try:
            yield apb.TrainProgress(event="start", version=job.version, message="training job started")
            while (event := await listener.get()) is not None:
                yield _progress(event)
        finally:
            self.jobs.unlisten(listener)

    async def _job_succeeded(self, job: TrainingJob) -> None:
        if job.activate:
            t0 = time.perf_counter()
            try:
                await self.state.activate(job.final)
            except Exception:
                self.state.metrics.activation("train", ok=False)
                raise
            self.state.metrics.activation("train", ok=True)
            note = ""
            try:
                self.registry.set_active(job.version)  # replicas sharing the registry follow it
            except OSError as e:  # serving it here; only the pointer failed
                log.error("serving %s, but could not write the registry's ACTIVE pointer (%s)", job.version, e)
                note = f"; not propagated: could not write the registry's ACTIVE pointer ({e})"
            self.jobs.publish(job, {"event": "activated", "phase": "", "message": f"serving {job.version} "
                                    f"(loaded and warmed in {time.perf_counter() - t0:.1f} s){note}"})

    @unary("ListModels")
    async def ListModels(self, request: apb.ListModelsRequest, context) -> apb.ListModelsResponse:
        active = self.state.slot.version if self.state.slot else ""
        return apb.ListModelsResponse(
            models=[
                apb.ModelVersion(version=v.version, name=v.name, created_unix=v.created, active=v.version == active,
                                 report_json=json.dumps(v.report) if v.report else "")
                for v in self.registry.list()
            ],
            active_version=active,
        )

    @unary("ActivateModel")
    async def ActivateModel(self, request: apb.ActivateModelRequest, context) -> apb.ActivateModelResponse:
        """propagate unset or true: once serving, write the registry's ACTIVE pointer (what a
        restart serves, and what replicas on the same registry follow); false: this replica only.
        A failed load writes nothing."""
        target = self.registry.get(request.version)
        previous = self.state.slot.version if self.state.slot else ""
        t0 = time.perf_counter()
        try:
            await self.state.activate(target.path)
        except Exception:
            self.state.metrics.activation("rpc", ok=False)
            raise
        self.state.metrics.activation("rpc", ok=True)
        propagate = request.propagate if request.HasField("propagate") else True
        if propagate:
            try:
                self.registry.set_active(target.version)
            except OSError as e:  # this replica switched; only the pointer failed: say so, don't fail the call
                log.error("activated %s here, but could not write the registry's ACTIVE pointer (%s): other "
                          "replicas and a restart stay on the previous version", target.version, e)
                propagate = False
        return apb.ActivateModelResponse(version=target.version, previous_version=previous,
                                         load_seconds=time.perf_counter() - t0, propagated=propagate)
