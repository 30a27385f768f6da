"""The grpc.aio server: RewardService, health, reflection, metrics.

Data flow per RPC: validate + tokenize on the tokenizer threads -> scheduler
(batches across callers) -> engine on its own thread -> results. The event
loop only moves messages. Errors become gRPC statuses in service/server/rpc.py alone,
through errors.grpc_status.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rmserve.service.data.preferences import SqliteStore
from rmserve.service.engine.backbone import cache_dir
from rmserve.service.engine.backends import Engine, backend
from rmserve.service.engine.ensemble import MANIFEST
from rmserve.service.engine.model import RewardModel
from rmserve.service.server.admin import AdminServicer
from rmserve.service.server.auth import ApiKeyInterceptor, ApiKeys, check_bind_address
from rmserve.service.server.config import DEFAULT_MODEL_DIR, ServerConfig
from rmserve.service.server.errors import (
    InvalidInput,
    NonFiniteScore,
    NotFound,
    NotReady,
    SampleFailed,
    Unavailable,
)
from rmserve.service.server.http import HttpFrontDoor
from rmserve.service.server.labels import LabelServicer
from rmserve.service.server.metrics import Metrics
from rmserve.service.server.monitor import MonitorConfig, RunMonitor, StepSummary
from rmserve.service.server.ports import listening, stop_listening
from rmserve.service.server.registry import Registry
from rmserve.service.server.replica_sync import RegistryFollower
from rmserve.service.server.requests import Row, encode_groups, encode_samples, result_pb
from rmserve.service.server.rpc import (
    Malformed,
    Work,
    add_service,
    chunk_error,
    deadline_of,
    drain,
    unary,
)
from rmserve.service.server.scheduler import Scheduler
from rmserve.v1 import admin_pb2 as apb
from rmserve.v1 import label_pb2 as lpb
from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc

log = logging.getLogger("rmserve.server")
# ScoreStream chunks read and not yet answered, per stream: a client that stops reading its
# answers holds at most this many chunks' results, and the stream reads no more of its requests
# (HTTP/2 flow control then stops the client's sends) until it reads again.
STREAM_WINDOW = 4
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdminService"].full_name


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
        eps, ood = out.epistemic, out.ood_score
        return [
            Row(out.rewards[i], float(out.mean[i]), float(out.var[i]), float(out.min[i]),
                None if eps is None else float(eps[i]), None if ood is None else float(ood[i]))
            for i in range(len(seqs))
        ]

    def _run_checked(self, slot: ModelSlot, seqs: list[list[int]]) -> list[Row | NonFiniteScore]:
        """_run_batch, and a sample whose score is not finite is scored again alone: still
        not finite, it is answered with NonFiniteScore (an error naming it), never a NaN."""
        rows: list[Row | NonFiniteScore] = list(self._run_batch(slot, seqs))
        for i, row in enumerate(rows):
            if _finite(row):
                continue
            alone = self._run_batch(slot, [seqs[i]])[0] if len(seqs) > 1 else row
            rows[i] = alone if _finite(alone) else NonFiniteScore(
                f"the model's score is not finite (reward {alone.mean}, variance {alone.var}); "
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


def _ood(model) -> float | None:
    """The flag's threshold, or None: then results carry ood_score (if any) but no ood."""
    return model.ood.threshold if model.ood is not None else None


def _finite(row: Row) -> bool:
    values = [row.mean, row.var, row.min] + [v for v in (row.epistemic, row.ood_score) if v is not None]
    return bool(np.isfinite(row.rewards).all()) and all(math.isfinite(v) for v in values)


def client_of(context: grpc.aio.ServicerContext) -> str:
    """Who a call counts against for --max-queue-per-client: its API key (a digest; keys are
    never kept), else its connection (peer address and port: one SDK client, one channel)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return "key:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    return context.peer()


def _sample_name(samples, i: int) -> str:
    """The name a sample's errors use (as encode_sample's)."""
    sid = samples[i].id if samples is not None and i < len(samples) else ""
    return f"sample {i}" + (f" (id {sid!r})" if sid else "")


def _lam(options: pb.ScoreOptions, model: RewardModel) -> float:
    if not options.HasField("uncertainty_penalty"):
        return model.uncertainty_penalty
    lam = options.uncertainty_penalty
    if not math.isfinite(lam) or lam < 0:
        raise InvalidInput(f"uncertainty_penalty must be a finite number >= 0, got {lam}")
    return lam


def _run_pb(run, series: list[StepSummary], steps: int | None = None) -> pb.RunStatus:
    out = pb.RunStatus(run_id=run.run_id, steps=len(series) if steps is None else steps, alarm=run.alarm,
                       reason=run.reason, last_seen_unix=run.last_seen)
    if run.alarm_step is not None:
        out.alarm_step = run.alarm_step
    for s in series:
        step = out.series.add()
        for name, value in vars(s).items():
            if value is not None:
                setattr(step, name, value)
    return out


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.state.tokenizer_pool, fn, *args)

    async def _score(self, samples, options: pb.ScoreOptions, context) -> tuple[list[pb.ScoreResult], str]:
        return await self.score_samples(samples, options, deadline_of(context), client=client_of(context))

    async def _submit(self, slot: ModelSlot, encoded, deadline: float | None, client: Hashable | None,
                      name: Callable[[int], str], groups: list[int] | None = None) -> list[Row]:
        """The scheduler's rows for `encoded`; a sample that failed alone is named by `name(index)`.
        `groups`: a label per sample; a group's samples are scored in one batch (one prompt encoding)."""
        try:
            return await self.state.scheduler.submit(
                slot, [e.ids for e in encoded], [len(e.ids) for e in encoded], deadline, client, groups
            )
        except SampleFailed as e:
            e.where = name(e.index)
            raise

    async def score_samples(
        self, samples, options: pb.ScoreOptions, deadline: float | None, *, encode=None,
        client: Hashable | None = None,
    ) -> tuple[list[pb.ScoreResult], str]:
        """The scoring path every transport shares (gRPC, HTTP): encode on the tokenizer
        threads, queue, build results, feed metrics and the run monitor. `encode(encoder)`
        replaces the protobuf samples' encoding (HTTP's already-templated text); `client`
        is who the samples count against (--max-queue-per-client)."""
        slot = self.state.live_slot()
        lam = _lam(options, slot.model)
        cap = self.state.config.max_samples_per_request
        if encode is None:
            encoded = await self._off_loop(encode_samples, slot.model.encoder, samples, cap)
        else:
            encoded = await self._off_loop(encode, slot.model.encoder)
        rows = await self._submit(slot, encoded, deadline, client, lambda i: _sample_name(samples, i))
        ids = [s.id for s in samples] if samples else [""] * len(encoded)
        threshold = _ood(slot.model)
        results = [
            result_pb(r, e, lam=lam, members=options.return_members, sample_id=i, ood_threshold=threshold)
            for r, e, i in zip(rows, encoded, ids, strict=True)
        ]
        self._observe(results, options)
        return results, slot.version

    def _observe(self, results: list[pb.ScoreResult], options: pb.ScoreOptions | None = None) -> None:
        """Metrics for every result; the run monitor for calls tagged with a run id."""
        self.state.metrics.scored([r.reward for r in results], [r.std for r in results], sum(r.truncated for r in results))
        if options is None or not options.run_id:
            return
        monitor = self.state.monitor
        raised = monitor.observe(
            options.run_id, options.step if options.HasField("step") else None,
            [r.reward for r in results], [r.std for r in results],
            epistemic=[r.epistemic if r.HasField("epistemic") else None for r in results],
            ood_score=[r.ood_score if r.HasField("ood_score") else None for r in results],
            ood=[r.ood if r.HasField("ood") else None for r in results],
        )
        tracked, alarming = monitor.counts()
        self.state.metrics.runs(tracked, alarming, new_alarm=options.run_id if raised else None)
        if raised:
            run, _ = monitor.status(options.run_id)
            log.warning("run %s: over-optimisation alarm at step %s: %s", run.run_id, run.alarm_step, run.reason)

    @unary("Score")
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        results, version = await self._score(request.samples, request.options, context)
        return pb.ScoreResponse(results=results, model_version=version)

    async def ScoreStream(self, request_iterator, context):
        """One response chunk per request chunk, in order; up to STREAM_WINDOW chunks in flight.
        A chunk is work in flight (`state.work`) from its read until its answer is written,
        so a graceful stop finishes it; an open stream between chunks holds no stop."""
        metrics = self.state.metrics
        work = self.state.work
        pending: asyncio.Queue = asyncio.Queue()  # bounded by `window`
        window = asyncio.Semaphore(STREAM_WINDOW)  # a slot per chunk read, freed once its answer is written
        read = answered = 0

        async def one(req: pb.ScoreStreamRequest) -> pb.ScoreStreamResponse:
            t0 = time.perf_counter()
            code = grpc.StatusCode.CANCELLED  # unless it finishes: the call ended and cancelled it
            try:
                results, version = await self._score(req.samples, req.options, context)
                code = grpc.StatusCode.OK
                return pb.ScoreStreamResponse(results=results, model_version=version)
            except Exception as e:
                code, error = chunk_error(e)
                return pb.ScoreStreamResponse(error=error)
            finally:
                metrics.requests.labels("ScoreStream.chunk", code.name).inc()
                if code == grpc.StatusCode.OK:
                    metrics.latency.labels("ScoreStream.chunk").observe(time.perf_counter() - t0)

        async def reader():
            nonlocal read
            await window.acquire()  # a slot for the first chunk, before reading it
            async for req in request_iterator:
                read += 1
                work.begin()
                metrics.stream_chunks.inc()
                if isinstance(req, Malformed):
                    code, error = chunk_error(req.reject())
                    metrics.requests.labels("ScoreStream.chunk", code.name).inc()
                    done = asyncio.get_running_loop().create_future()
                    done.set_result(pb.ScoreStreamResponse(error=error))
                    await pending.put(done)
                else:
                    await pending.put(asyncio.ensure_future(one(req)))
                await window.acquire()  # a slot for the next chunk, before reading it
            await pending.put(None)

        read_task = asyncio.ensure_future(reader())
        try:
            while (task := await pending.get()) is not None:
                try:
                    yield await task
                finally:
                    answered += 1
                    work.end()
                    metrics.stream_chunks.dec()
                    window.release()
            await read_task
        finally:
            read_task.cancel()
            while not pending.empty():  # the call ended: its chunks not yet scored free their queue slots
                if (left := pending.get_nowait()) is not None:
                    left.cancel()
            metrics.stream_chunks.dec(read - answered)
            for _ in range(read - answered):  # chunks read but never answered (the call ended)
                work.end()

    @unary("ScoreGroups")
    async def ScoreGroups(self, request: pb.ScoreGroupsRequest, context) -> pb.ScoreGroupsResponse:
        slot = self.state.live_slot()
        lam = _lam(request.options, slot.model)
        groups = await self._off_loop(encode_groups, slot.model.encoder, request.groups, self.state.config.max_samples_per_request)
        flat = [e for g in groups for e in g]
        where = [f"group {gi} completion {ci}" for gi, g in enumerate(groups) for ci in range(len(g))]
        labels = [gi for gi, g in enumerate(groups) for _ in g]  # a group is scored in one batch
        rows = await self._submit(slot, flat, deadline_of(context), client_of(context), where.__getitem__, labels)
        out, i, threshold = [], 0, _ood(slot.model)
        for g_pb, g in zip(request.groups, groups, strict=True):
            res = [result_pb(rows[i + j], e, lam=lam, members=request.options.return_members,
                             ood_threshold=threshold) for j, e in enumerate(g)]
            i += len(g)
            out.append(pb.GroupResult(id=g_pb.id, results=res))
        self._observe([r for g in out for r in g.results], request.options)
        return pb.ScoreGroupsResponse(groups=out, model_version=slot.version)

    @unary("Compare")
    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        group = pb.Group(completions=[request.response_a, request.response_b])
        if request.WhichOneof("prompt") == "prompt_messages":
            group.prompt_messages.CopyFrom(request.prompt_messages)
        else:
            group.prompt_text = request.prompt_text
        slot = self.state.live_slot()
        (enc,) = await self._off_loop(encode_groups, slot.model.encoder, [group], self.state.config.max_samples_per_request)
        a, b = await self._submit(slot, enc, deadline_of(context), client_of(context), ("response_a", "response_b").__getitem__)
        lam = slot.model.uncertainty_penalty
        res_a, res_b = (result_pb(r, e, lam=lam, members=True, ood_threshold=_ood(slot.model))
                        for r, e in zip((a, b), enc, strict=True))
        self._observe([res_a, res_b])
        member_probs = 1.0 / (1.0 + np.exp(-(a.rewards.astype(np.float64) - b.rewards)))
        return pb.CompareResponse(
            prob=float(1.0 / (1.0 + math.exp(-(a.mean - b.mean)))),
            member_probs=member_probs.tolist(),
            a=res_a,
            b=res_b,
            model_version=slot.version,
        )

    @unary("GetRunStatus")
    async def GetRunStatus(self, request: pb.GetRunStatusRequest, context) -> pb.RunStatus:
        if not request.run_id:
            raise InvalidInput("run_id is empty: name the run (the run_id your trainer tags its Score calls with)")
        found = self.state.monitor.status(request.run_id)
        if found is None:
            raise NotFound(
                f"no run {request.run_id!r}: the monitor has seen no Score call tagged with it "
                f"(or it was evicted: the monitor keeps the {self.state.monitor.config.max_runs} most recent runs)"
            )
        run, series = found
        return _run_pb(run, series)

    @unary("ListRuns")
    async def ListRuns(self, request: pb.ListRunsRequest, context) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[_run_pb(run, [], steps=n) for run, n in self.state.monitor.runs()])

    @unary("GetModelInfo")
    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        m = self.state.live_slot().model
        return pb.ModelInfo(
            name=m.name, version=m.version, kind=m.kind, num_members=len(m.members), num_heads=m.num_heads,
            backbone=m.backbone_name, max_tokens=m.max_tokens, dtype=m.dtype_name,
            normalization=pb.Normalization(shift=m.shift, scale=m.scale),
            default_uncertainty_penalty=m.uncertainty_penalty, has_epistemic=m.has_epistemic,
            max_samples_per_request=self.state.config.max_samples_per_request,
            backbone_layers=m.backbone_layers,
            ood_threshold=m.ood.threshold if m.ood else None,
            ood_quantile=m.ood.quantile if m.ood else 0.0,
            ood_calibrated_on=m.ood.calibrated_on if m.ood else "",
        )


class RewardServer:
    """Lifecycle: start (listening, NOT_SERVING) -> model loaded and warmed (SERVING) -> stop."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.state = ServingState(config)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._loaded: asyncio.Future | None = None
        self._saver: asyncio.Future | None = None
        self.admin: AdminServicer | None = None
        self.follower: RegistryFollower | None = None  # follows the registry's ACTIVE (--registry-poll)
        self.store: SqliteStore | None = None
        self.http: HttpFrontDoor | None = None
        self.http_port: int | None = None
        self.api_keys: ApiKeys | None = None  # set by start(); the CLI reloads them on SIGHUP

    async def start(self) -> None:
        keys = self.api_keys = ApiKeys.from_sources(self.config.api_keys, self.config.api_keys_env)
        if self.config.tls_client_ca and not (self.config.tls_cert and self.config.tls_key):
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
        # client certificates guard gRPC only: the (plaintext) HTTP front door has API keys or nothing
        mtls_only = bool(self.config.tls_client_ca) and self.config.http_port is None
        check_bind_address(self.config.host, authenticated=keys is not None or mtls_only,
                           insecure_open=self.config.insecure_open)
        registry = Registry(self.config.registry or cache_dir() / "registry")
        self.follower = RegistryFollower(self.state, registry, self.config.registry_poll_s)  # before resolving
        model_path = resolve_model_path(self.config.model, registry)
        interceptors = [ApiKeyInterceptor(keys)] if keys is not None else []
        self._server = grpc.aio.server(interceptors=interceptors, options=self.config.grpc_options())
        reward_servicer = RewardServicer(self.state)
        add_service(self._server, pb.DESCRIPTOR.services_by_name["RewardService"], reward_servicer)
        self.store = SqliteStore(self.config.labels_db or registry.root / "preferences.sqlite3")
        self.admin = AdminServicer(self.state, registry, self.config.data_roots, store_path=self.store.path)
        add_service(self._server, apb.DESCRIPTOR.services_by_name["AdminService"], self.admin)
        add_service(self._server, lpb.DESCRIPTOR.services_by_name["LabelService"], LabelServicer(self.state, self.store))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, lpb.DESCRIPTOR.services_by_name["LabelService"].full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self._server,
        )
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert or self.config.tls_key:
            if not (self.config.tls_cert and self.config.tls_key):
                raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
            client_ca = Path(self.config.tls_client_ca).read_bytes() if self.config.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None,
            )
            with listening(self.config.host, self.config.port, "--port"):
                self.port = self._server.add_secure_port(address, creds)
        else:
            with listening(self.config.host, self.config.port, "--port"):
                self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._server.start()
        if self.config.metrics_port is not None:
            with listening(self.config.metrics_host or self.config.host, self.config.metrics_port, "--metrics-port"):
                self._metrics_http, _ = self.state.metrics.serve_http(self.config.metrics_port, self.config.metrics_host or self.config.host)
            self.metrics_port = self._metrics_http.server_port
        self.state.scheduler.start()
        if self.config.http_port is not None:
            self.http = HttpFrontDoor(reward_servicer, keys=keys, reward_field=self.config.http_reward_field)
            with listening(self.config.host, self.config.http_port, "--http-port"):
                self.http_port = await self.http.start(self.config.host, self.config.http_port)
        self._saver = asyncio.ensure_future(self._save_runs_periodically())
        log.info("listening on %s:%d; loading %s (health reports not ready until it is warm)", self.config.host, self.port, model_path)
        self._loaded = asyncio.ensure_future(self._load(model_path))
        self.follower.start()

    async def _save_runs_periodically(self, every_s: float = 5.0) -> None:
        """The run monitor's summaries reach disk within `every_s` (and at stop)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            try:
                await loop.run_in_executor(None, self.state.monitor.save)
            except OSError as e:  # a full disk must not stop scoring; the next try may succeed
                log.warning("run monitor: cannot save %s: %s", self.state.monitor.path, e)

    async def _load(self, path: Path) -> None:
        model = (await self.state.activate(path)).model
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.http is not None:
            self.http.serving = True
        log.info(
            "SERVING %s version %s (%d heads, %s, max %d tokens) on %s:%d, metrics on %s, HTTP on %s",
            model.name, model.version, model.num_heads, model.dtype_name, model.max_tokens,
            self.config.host, self.port, self.metrics_port or "off", self.http_port or "off",
        )

    async def wait_ready(self) -> None:
        """Returns once SERVING; raises the load error if the model failed to load."""
        assert self._loaded is not None, "call start() first"
        await self._loaded

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (SIGTERM): health NOT_SERVING first, then new calls get UNAVAILABLE
        while the calls in flight finish within `grace` (default: config.grace_s); returns
        as soon as none is left, whatever streams are still open (service/server/rpc.py `drain`)."""
        await self.health.enter_graceful_shutdown()
        self.state.work.close()
        if self.follower is not None:  # no hot swap while stopping
            await self.follower.stop()
        if self.http is not None:
            self.http.serving = False
        self.state.metrics.ready.set(0)
        if self._server is not None:
            await drain(self._server, self.state.work, self.config.grace_s if grace is None else grace)
        if self.http is not None:  # its requests in flight use the scheduler: stop it first
            await self.http.stop()
        await self.state.scheduler.stop()
        if self._saver is not None:
            self._saver.cancel()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.state.monitor.save)
        except OSError as e:
            log.warning("run monitor: cannot save %s: %s", self.state.monitor.path, e)
        if self.admin is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.admin.jobs.stop)
        if self._loaded is not None and not self._loaded.done():
            self._loaded.cancel()
        if self._metrics_http is not None:
            stop_listening(self._metrics_http)  # no wait for its 0.5 s poll (ports.py)
        if self.store is not None:
            self.store.close()
        self.state.tokenizer_pool.shutdown(wait=False)

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
