"""`AsyncRewardClient`: the grpc.aio mirror of `RewardClient`, method for method.

A grpc.aio channel belongs to the event loop it was made on, so the channel is
made on first use inside a running loop; a client built at import time, or
reused from a later `asyncio.run`, still works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmserve.client import _core, labels
from rmserve.client._core import Prompt, Sample
from rmserve.client.admin import (
    Activation,
    ModelVersion,
    TrainProgress,
    build_train_request,
    parse_activation,
    parse_models,
    parse_progress,
)
from rmserve.client.errors import DeadlineExceededError, from_rpc_error
from rmserve.client.runs import RunStatus, parse_run_status
from rmserve.client.types import CompareResult, ModelInfo, ScoreResult, ScoreResults
from rmserve.v1 import admin_pb2 as apb
from rmserve.v1 import admin_pb2_grpc as apb_grpc
from rmserve.v1 import label_pb2 as lpb
from rmserve.v1 import label_pb2_grpc as lpb_grpc
from rmserve.v1 import reward_pb2 as pb
from rmserve.v1 import reward_pb2_grpc as pb_grpc


class _LoopChannel:
    """The aio channel and stubs for the running loop, shared by a client and its `with_options` copies."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None, args: list):
        self._address, self._credentials, self._args = address, credentials, args
        self._loop: asyncio.AbstractEventLoop | None = None
        self.channel: grpc.aio.Channel | None = None

    def get(self) -> tuple[pb_grpc.RewardServiceStub, health_pb2_grpc.HealthStub, apb_grpc.AdminServiceStub]:
        loop = asyncio.get_running_loop()
        if self.channel is None or self._loop is not loop:
            if self._credentials is None:
                self.channel = grpc.aio.insecure_channel(self._address, options=self._args)
            else:
                self.channel = grpc.aio.secure_channel(self._address, self._credentials, options=self._args)
            self._loop = loop
            self.stub = pb_grpc.RewardServiceStub(self.channel)
            self.health = health_pb2_grpc.HealthStub(self.channel)
            self.admin = apb_grpc.AdminServiceStub(self.channel)
            self.labels = lpb_grpc.LabelServiceStub(self.channel)
        return self.stub, self.health, self.admin

    async def close(self) -> None:
        if self.channel is not None and self._loop is asyncio.get_running_loop():
            await self.channel.close()
        self.channel = None


class AsyncRewardClient(_core.BaseClient):
    """Asyncio client for an rmserve server; see `RewardClient` for each method's contract.

    >>> async with AsyncRewardClient("localhost:50051") as client:
    ...     results = await client.score([{"prompt": "Hi", "response": "Hello!"}])
    """

    def _open(self) -> None:
        self._conn = _LoopChannel(self.target, self._credentials, self._channel_args)

    @property
    def _stub(self) -> pb_grpc.RewardServiceStub:
        return self._conn.get()[0]

    @property
    def _admin(self) -> apb_grpc.AdminServiceStub:
        return self._conn.get()[2]

    @property
    def _labels(self) -> lpb_grpc.LabelServiceStub:
        self._conn.get()
        return self._conn.labels

    # -- lifecycle -------------------------------------------------------

    async def close(self) -> None:
        if self._owns_channel:
            await self._conn.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ---------------------------------------------------------

    async def _unary(
        self, method_name: str, request: Any, opts: _core.ClientOptions, deadline: _core.Deadline
    ) -> Any:
        retry = _core.RetryState(opts, deadline)
        while True:
            timeout = retry.attempt_timeout()
            try:
                stub = next(s for s in (self._stub, self._admin, self._labels) if hasattr(s, method_name))
                return await getattr(stub, method_name)(request, timeout=timeout, metadata=opts.metadata)
            except grpc.RpcError as e:
                await asyncio.sleep(retry.backoff(e))

    async def _unary_many(
        self, method_name: str, requests: Sequence[Any], opts: _core.ClientOptions, deadline: _core.Deadline
    ) -> list[Any]:
        """Send the chunks of one call, up to `max_concurrent_requests` at once; answers in order."""
        if len(requests) == 1:
            return [await self._unary(method_name, requests[0], opts, deadline)]
        gate = asyncio.Semaphore(opts.max_concurrent_requests)

        async def one(req: Any) -> Any:
            async with gate:
                return await self._unary(method_name, req, opts, deadline)

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # reap, so nothing logs "never retrieved"
            raise

    # -- API ---------------------------------------------------------------

    async def score(
        self,
        samples: Iterable[Sample],
        *,
        uncertainty_penalty: float | None = None,
        return_members: bool = False,
        run_id: str | None = None,
        step: int | None = None,
        timeout: float | None = None,
    ) -> ScoreResults:
        """Score samples; one `ScoreResult` per sample, in order (see `RewardClient.score`)."""
        opts = self._call_options(timeout)
        plan = _core.ScorePlan.build(
            samples,
            _core.build_options(uncertainty_penalty, return_members, run_id, step),
            opts.max_samples_per_request,
            self._max_message_bytes,
        )
        responses = await self._unary_many("Score", plan.requests, opts, _core.Deadline(opts.timeout))
        return plan.parse(responses)

    async def score_groups(
        self,
        prompt: Prompt,
        completions: Sequence[str],
        *,
        uncertainty_penalty: float | None = None,
        return_members: bool = False,
        run_id: str | None = None,
        step: int | None = None,
        timeout: float | None = None,
    ) -> ScoreResults:
        """Score N completions of one prompt (GRPO); one result per completion, in order."""
        groups = await self.score_groups_many(
            [(prompt, completions)],
            uncertainty_penalty=uncertainty_penalty,
            return_members=return_members,
            run_id=run_id,
            step=step,
            timeout=timeout,
        )
        return groups[0]

    async def score_groups_many(
        self,
        groups: Iterable[tuple[Prompt, Sequence[str]]],
        *,
        uncertainty_penalty: float | None = None,
        return_members: bool = False,
        run_id: str | None = None,
        step: int | None = None,
        timeout: float | None = None,
    ) -> list[ScoreResults]:
        """Many `(prompt, completions)` groups in as few requests as the size cap allows."""
        opts = self._call_options(timeout)
        plan = _core.GroupsPlan.build(
            groups,
            _core.build_options(uncertainty_penalty, return_members, run_id, step),
            opts.max_samples_per_request,
            self._max_message_bytes,
        )
        responses = await self._unary_many("ScoreGroups", plan.requests, opts, _core.Deadline(opts.timeout))
        return plan.parse(responses)

    async def score_stream(
        self,
        samples: Iterable[Sample] | AsyncIterable[Sample],
        *,
        chunk_size: int = _core.DEFAULT_STREAM_CHUNK_SIZE,
        uncertainty_penalty: float | None = None,
        return_members: bool = False,
        run_id: str | None = None,
        step: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[ScoreResult]:
        """Async generator over results, in order (see `RewardClient.score_stream`)."""
        opts = self._call_options(timeout)
        feeder = _core.StreamFeeder(
            _core.build_options(uncertainty_penalty, return_members, run_id, step), chunk_size
        )
        call = self._stub.ScoreStream(
            feeder.arequests(samples), timeout=opts.timeout, metadata=opts.metadata
        )
        try:
            async for resp in call:
                for result in feeder.parse(resp):
                    yield result
            feeder.check()
        except grpc.RpcError as e:
            feeder.check()
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def compare(
        self, prompt: Prompt, response_a: str, response_b: str, *, timeout: float | None = None
    ) -> CompareResult:
        """P(response_a is preferred over response_b), for the ensemble and per head."""
        opts = self._call_options(timeout)
        req = _core.build_compare(prompt, response_a, response_b)
        return _core.parse_compare(await self._unary("Compare", req, opts, _core.Deadline(opts.timeout)))

    async def submit_preferences(
        self, items: Iterable[Mapping[str, Any]], *, timeout: float | None = None
    ) -> labels.SubmitResult:
        opts = self._call_options(timeout)
        deadline = _core.Deadline(opts.timeout)
        reqs = labels.build_preferences(items, opts.max_samples_per_request)
        return labels.parse_submit([await self._unary("SubmitPreferences", r, opts, deadline) for r in reqs])

    async def suggest_comparisons(
        self, candidates: Iterable[Mapping[str, Any]], k: int, *, timeout: float | None = None
    ) -> list[labels.Suggestion]:
        opts = self._call_options(timeout)
        req = labels.build_candidates(candidates, k)
        return labels.parse_suggestions(await self._unary("SuggestComparisons", req, opts, _core.Deadline(opts.timeout)))

    async def labeler_report(self, *, tag: str | None = None, timeout: float | None = None) -> list[labels.LabelerStats]:
        opts = self._call_options(timeout)
        req = lpb.LabelerReportRequest(tag=tag or "")
        return labels.parse_report(await self._unary("LabelerReport", req, opts, _core.Deadline(opts.timeout)))

    async def export_preferences(
        self, *, kind: str | None = None, since: float | None = None, tag: str | None = None,
        labeler: str | None = None, timeout: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        opts = self._call_options(timeout)
        req = labels.build_export(kind, since, tag, labeler)
        try:
            async for chunk in self._labels.ExportPreferences(req, timeout=opts.timeout, metadata=opts.metadata):
                for row in labels.parse_rows(chunk):
                    yield row
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def run_status(self, run_id: str, *, timeout: float | None = None) -> RunStatus:
        """The run monitor's statistics and over-optimisation alarm for `run_id` (the id its
        Score calls were tagged with); NotFoundError for a run the server has not seen."""
        opts = self._call_options(timeout)
        req = pb.GetRunStatusRequest(run_id=run_id)
        return parse_run_status(await self._unary("GetRunStatus", req, opts, _core.Deadline(opts.timeout)))

    async def list_runs(self, *, timeout: float | None = None) -> list[RunStatus]:
        """Every run the monitor tracks, most recently seen first (without per-step series)."""
        opts = self._call_options(timeout)
        resp = await self._unary("ListRuns", pb.ListRunsRequest(), opts, _core.Deadline(opts.timeout))
        return [parse_run_status(r) for r in resp.runs]

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server is serving (name, version, heads, limits, normalisation)."""
        opts = self._call_options(timeout)
        resp = await self._unary("GetModelInfo", pb.GetModelInfoRequest(), opts, _core.Deadline(opts.timeout))
        return _core.parse_model_info(resp)

    async def health(self, *, timeout: float | None = None) -> bool:
        """True when the standard gRPC health service reports SERVING; unreachable is False."""
        t = timeout or self.timeout or _core.DEFAULT_HEALTH_TIMEOUT
        try:
            resp = await self._conn.get()[1].Check(
                health_pb2.HealthCheckRequest(service=""), timeout=t, metadata=self._options.metadata
            )
        except grpc.RpcError as e:
            if e.code() in _core.NOT_HEALTHY_CODES:
                return False
            raise from_rpc_error(e) from None
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_until_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> None:
        """Wait until `health()` is True; raises DeadlineExceededError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left > 0 and await self.health(timeout=max(min(left, _core.DEFAULT_HEALTH_TIMEOUT), 0.01)):
                return
            if time.monotonic() + poll_interval >= end:
                raise DeadlineExceededError(f"{self.address} not SERVING after {timeout:g}s")
            await asyncio.sleep(poll_interval)

    # -- admin ---------------------------------------------------------------

    async def train(
        self,
        data_path: str,
        *,
        dev_path: str | None = None,
        kind: str | None = None,
        num_heads: int | None = None,
        finetune_layers: int | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        seed: int = 0,
        backbone: str | None = None,
        activate: bool = False,
        name: str | None = None,
        max_tokens: int | None = None,
        options: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[TrainProgress]:
        """See `RewardClient.train`."""
        req = build_train_request(
            data_path, dev_path=dev_path, kind=kind, num_heads=num_heads, finetune_layers=finetune_layers,
            epochs=epochs, lr=lr, seed=seed, backbone=backbone, activate=activate, name=name,
            max_tokens=max_tokens, options=options,
        )
        opts = self._call_options(timeout)
        try:
            async for p in self._admin.Train(req, timeout=opts.timeout, metadata=opts.metadata):
                yield parse_progress(p)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def list_models(self, *, timeout: float | None = None) -> list[ModelVersion]:
        opts = self._call_options(timeout)
        resp = await self._unary("ListModels", apb.ListModelsRequest(), opts, _core.Deadline(opts.timeout))
        return parse_models(resp)

    async def activate_model(self, version: str, *, propagate: bool = True, timeout: float | None = None) -> Activation:
        """See RewardClient.activate_model (`propagate`: the other replicas on the registry follow)."""
        opts = self._call_options(timeout)
        req = apb.ActivateModelRequest(version=version, propagate=propagate)
        return parse_activation(await self._unary("ActivateModel", req, opts, _core.Deadline(opts.timeout)))
