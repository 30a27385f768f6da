"""Serving state and activation: the live model slot, the queue and the batch function.

`ServingState` is what every door and service shares: the config, the metrics,
the run monitor, the tokenizer threads, the scheduler (whose batch function,
`_run_checked`, calls the engine), the calls in flight (`work`) and the live
`ModelSlot`. `activate` loads, warms and swaps a model; requests in flight
finish on the slot they started on. Nothing here knows a transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmserve.service.engine.backbone import cache_dir
from rmserve.service.engine.backends import Engine, backend
from rmserve.service.engine.ensemble import MANIFEST
from rmserve.service.engine.heads import EngineOutput
from rmserve.service.engine.model import RewardModel
from rmserve.service.server.config import DEFAULT_MODEL_DIR, ServerConfig
from rmserve.service.server.errors import NonFiniteScore, NotReady, Unavailable
from rmserve.service.server.metrics import Metrics
from rmserve.service.server.monitor import MonitorConfig, RunMonitor
from rmserve.service.server.registry import Registry
from rmserve.service.server.rpc import Work
from rmserve.service.server.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class Row:
    """One sample's engine output: row `i` of its batch's `EngineOutput`, read where the
    results are built (core.py) rather than copied here, so a field the engine adds needs
    no step in between."""

    out: EngineOutput
    i: int

    @property
    def rewards(self) -> np.ndarray:
        """[K] per-head rewards."""
        return self.out.rewards[self.i]

    @property
    def mean(self) -> float:
        return float(self.out.mean[self.i])

    def finite(self) -> bool:
        """Every number the engine gave this sample is finite (a NaN must never reach a caller)."""
        o, i = self.out, self.i
        values = [o.mean[i], o.var[i], o.min[i]] + [a[i] for a in (o.epistemic, o.ood_score) if a is not None]
        return bool(np.isfinite(o.rewards[i]).all()) and all(math.isfinite(float(v)) for v in values)


class ModelSlot:
    """One loaded model version. Batches are keyed by slot, so a request
    finishes on the version it started on, even across a hot swap."""

    def __init__(self, model: RewardModel, engine: Engine):
        self.model = model
        self.engine = engine

    @property
    def version(self) -> str:
        return self.model.version


def resolve_model_path(model: str | None, registry: Registry | None = None) -> Path:
    """The model to serve: --model, else the registry's active version (the last
    one activated, so a restart serves what was serving), else the embedded default."""
    if model:
        return Path(model)
    if registry is not None and (active := registry.active()):
        return registry.path_for(active)
    if not (DEFAULT_MODEL_DIR / MANIFEST).is_file():
        raise NotReady(
            "the embedded default model's trained heads are not in this build yet. Serve your own model "
            "with `rmserve serve --model DIR` (an rmserve ensemble directory or a one-label Hugging Face "
            "*ForSequenceClassification checkpoint), or train the default heads with `rmserve train` "
            "(see README, 'The embedded default model')."
        )
    return DEFAULT_MODEL_DIR


class ServingState:
    """What the servicers share: config, metrics, the queue, the live model slot."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.metrics.queue_capacity.set(config.max_queue)
        registry_root = Path(config.registry) if config.registry else cache_dir() / "registry"
        runs_file = config.runs_file if config.runs_file is not None else registry_root / "runs.json"
        try:
            monitor_config = MonitorConfig(**config.monitor)
        except TypeError as e:
            raise ValueError(f"run monitor settings: {e}; known: {sorted(MonitorConfig.__dataclass_fields__)}") from e
        self.monitor = RunMonitor(monitor_config, path=runs_file or None)
        self._activation = asyncio.Lock()
        self.slot: ModelSlot | None = None
        self.work = Work()  # calls in flight: what a graceful stop waits for
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.tokenizer_threads, thread_name_prefix="rmserve-tok"
        )
        self.scheduler = Scheduler(
            self._run_checked,
            max_queue=config.max_queue,
            token_budget=config.batch_tokens,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue_per_client=config.queue_per_client(),
            observer=self.metrics,
        )

    def live_slot(self) -> ModelSlot:
        if self.slot is None:
            raise Unavailable("the model is still loading; retry shortly (health turns SERVING when ready)")
        return self.slot

    def _run_batch(self, slot: ModelSlot, seqs: list[list[int]]) -> list[Row]:
        t0 = time.perf_counter()
        out = slot.engine.score(seqs)
        self.metrics.engine_call(
            real_tokens=out.stats.real_tokens, padded_tokens=out.stats.padded_tokens,
            seconds=time.perf_counter() - t0, sequences=len(seqs),
        )
        return [Row(out, i) for i in range(len(seqs))]

    def _run_checked(self, slot: ModelSlot, seqs: list[list[int]]) -> list[Row | NonFiniteScore]:
        """_run_batch, and a sample whose score is not finite is scored again alone: still
        not finite, it is answered with NonFiniteScore (an error naming it), never a NaN."""
        rows: list[Row | NonFiniteScore] = list(self._run_batch(slot, seqs))
        for i, row in enumerate(rows):
            if row.finite():
                continue
            alone = self._run_batch(slot, [seqs[i]])[0] if len(seqs) > 1 else row
            rows[i] = alone if alone.finite() else NonFiniteScore(
                f"the model's score is not finite (reward {alone.mean}, variance {float(alone.out.var[alone.i])}); "
                "it is not returned as a number"
            )
        return rows

    async def activate(self, path: Path) -> ModelSlot:
        """Load, warm, then switch. A failed load leaves the current slot serving."""
        async with self._activation:
            loop = asyncio.get_running_loop()
            try:
                model = await loop.run_in_executor(
                    None, functools.partial(
                        backend(self.config.backend).load, path, dtype=self.config.dtype, max_tokens=self.config.max_tokens,
                        device=self.config.device, **self.config.backend_options,
                    )
                )
                return await loop.run_in_executor(None, self.install, model)
            except Exception as e:
                still = f"; still serving {self.slot.version}" if self.slot else ""
                raise NotReady(f"could not load the model at {path}: {type(e).__name__}: {e}{still}") from e

    def install(self, model: RewardModel) -> ModelSlot:
        """Warm a loaded model and make it the live one (atomic swap of one reference)."""
        engine = backend(self.config.backend).engine(model, token_budget=self.config.token_budget)
        if self.config.warmup:
            engine.score([model.encoder.prompt_response("Hello", "Hi! How can I help?").ids])
        slot = ModelSlot(model, engine)
        self.slot = slot
        self.metrics.model_info.info({
            "name": model.name, "version": model.version, "backbone": Path(model.backbone_name).name,
            "dtype": model.dtype_name, "num_heads": str(model.num_heads), "kind": model.kind,
        })
        self.metrics.ready.set(1)
        return slot
