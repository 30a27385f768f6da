"""`RewardClient`: the blocking client. All logic is in `_core`; this file only does I/O."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


class RewardClient(_core.BaseClient):
    """Blocking client for an rmserve server.

    >>> with RewardClient("localhost:50051", timeout=30) as client:
    ...     results = client.score([{"prompt": "Hi", "response": "Hello!"}])
    ...     results[0].reward, results[0].std

    Thread-safe: one client (one HTTP/2 channel) can serve many threads.
    """

    def _open(self) -> None:
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._channel_args)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options=self._channel_args)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._admin = apb_grpc.AdminServiceStub(self._channel)
        self._labels = lpb_grpc.LabelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle -------------------------------------------------------

    def close(self) -> None:
        """Close the channel (a `with_options` copy leaves its parent's channel open)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport: one unary call with retries, and many in parallel ------

    def _method(self, name: str):
        return getattr(self._stub, name, None) or getattr(self._admin, name, None) or getattr(self._labels, name)

    def _unary(
        self,
        method_name: str,
        request: Any,
        opts: _core.ClientOptions,
        deadline: _core.Deadline,
        first_error: grpc.RpcError | None = None,
    ) -> Any:
        retry = _core.RetryState(opts, deadline)
        if first_error is not None:  # the first attempt already ran (as a future)
            retry.attempts = 1
            time.sleep(retry.backoff(first_error))
        while True:
            timeout = retry.attempt_timeout()
            try:
                return self._method(method_name)(request, timeout=timeout, metadata=opts.metadata)
            except grpc.RpcError as e:
                time.sleep(retry.backoff(e))

    def _unary_many(
        self,
        method_name: str,
        requests: Sequence[Any],
        opts: _core.ClientOptions,
        deadline: _core.Deadline,
    ) -> list[Any]:
        """Send the chunks of one call, up to `max_concurrent_requests` at once; answers in order."""
        if len(requests) == 1:
            return [self._unary(method_name, requests[0], opts, deadline)]
        out: list[Any] = [None] * len(requests)
        in_flight: dict[int, grpc.Future] = {}
        sent = 0
        try:
            for i in range(len(requests)):
                while sent < len(requests) and sent < i + opts.max_concurrent_requests:
                    in_flight[sent] = getattr(self._stub, method_name).future(
                        requests[sent], timeout=deadline.attempt_timeout(), metadata=opts.metadata
                    )
                    sent += 1
                try:
                    out[i] = in_flight.pop(i).result()
                except grpc.RpcError as e:
                    out[i] = self._unary(method_name, requests[i], opts, deadline, first_error=e)
        finally:
            for fut in in_flight.values():
                fut.cancel()
        return out

    # -- API ---------------------------------------------------------------

    def score(
        self,
        samples: Iterable[Sample],
        *,
        uncertainty_penalty: float | None = None,
        return_members: bool = False,
        run_id: str | None = None,
        step: int | None = None,
        timeout: float | None = None,
    ) -> ScoreResults:
        """Score samples; one `ScoreResult` per sample, in order.

        A sample is `{"messages": [{"role", "content"}, ...]}` (the last message is
        the response scored), `{"prompt": str | messages, "response": str}` or
        `{"token_ids": [int, ...]}`, each with an optional `"id"`. Large inputs are
        split into requests of `max_samples_per_request`; `timeout` (default: the
        client's) bounds the whole call, retries included.
        """
        opts = self._call_options(timeout)
        plan = _core.ScorePlan.build(
            samples,
            _core.build_options(uncertainty_penalty, return_members, run_id, step),
            opts.max_samples_per_request,
            self._max_message_bytes,
        )
        responses = self._unary_many("Score", plan.requests, opts, _core.Deadline(opts.timeout))
        return plan.parse(responses)

    def score_groups(
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
        """Score N completions of one prompt (GRPO); the server encodes the prompt once.

        `prompt` is text or chat messages; each completion is the assistant's reply.
        Returns one result per completion, in order.
        """
        return self.score_groups_many(
            [(prompt, completions)],
            uncertainty_penalty=uncertainty_penalty,
            return_members=return_members,
            run_id=run_id,
            step=step,
            timeout=timeout,
        )[0]

    def score_groups_many(
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
        responses = self._unary_many("ScoreGroups", plan.requests, opts, _core.Deadline(opts.timeout))
        return plan.parse(responses)

    def score_stream(
        self,
        samples: Iterable[Sample],
        *,
        chunk_size: int = _core.DEFAULT_STREAM_CHUNK_SIZE,
        uncertainty_penalty: float | None = None,
        return_members: bool = False,
        run_id: str | None = None,
        step: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[ScoreResult]:
        """Stream samples (any iterable, consumed lazily) and yield results as they come, in order.

        Results carry the sample's `"id"`, or its position in the stream when it had
        none. A chunk the server rejects raises its typed error. Not retried: a
        half-consumed caller iterator cannot be replayed.
        """
        opts = self._call_options(timeout)
        feeder = _core.StreamFeeder(
            _core.build_options(uncertainty_penalty, return_members, run_id, step), chunk_size
        )
        call = self._stub.ScoreStream(
            feeder.requests(samples), timeout=opts.timeout, metadata=opts.metadata
        )
        try:
            for resp in call:
                yield from feeder.parse(resp)
            feeder.check()
        except grpc.RpcError as e:
            feeder.check()  # a bad sample cancels the stream: report it, not the CANCELLED
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def compare(
        self, prompt: Prompt, response_a: str, response_b: str, *, timeout: float | None = None
    ) -> CompareResult:
        """P(response_a is preferred over response_b), for the ensemble and per head."""
        opts = self._call_options(timeout)
        req = _core.build_compare(prompt, response_a, response_b)
        return _core.parse_compare(self._unary("Compare", req, opts, _core.Deadline(opts.timeout)))

    def submit_preferences(
        self, items: Iterable[Mapping[str, Any]], *, timeout: float | None = None
    ) -> labels.SubmitResult:
        """Store labelled comparisons on the server (needs the `label` scope).

        Each item: `{"id", "prompt": str | messages, "responses": [str, ...], "choice": int}`
        (or `"ranking": [rank per response]`, lower is better, or `"tie": True`), with
        `"labeler"`, `"labeler_kind": "human" | "ai"` and optional `"margin"`, `"judge"`,
        `"guideline"`, `"rationale"`, `"tag"`, `"timestamp"`. Acknowledged once on disk;
        retrying with the same ids is safe (counted as duplicates); an id reused with
        other content raises AlreadyExistsError. Sent in requests of
        `max_samples_per_request`, each stored all-or-nothing.
        """
        opts = self._call_options(timeout)
        deadline = _core.Deadline(opts.timeout)
        reqs = labels.build_preferences(items, opts.max_samples_per_request)
        return labels.parse_submit([self._unary("SubmitPreferences", r, opts, deadline) for r in reqs])

    def suggest_comparisons(
        self, candidates: Iterable[Mapping[str, Any]], k: int, *, timeout: float | None = None
    ) -> list[labels.Suggestion]:
        """The `k` pairs of candidate responses most worth labelling under the served ensemble,
        best first. Each candidate: `{"prompt": str | messages, "responses": [str, ...], "id"?}`."""
        opts = self._call_options(timeout)
        req = labels.build_candidates(candidates, k)
        return labels.parse_suggestions(self._unary("SuggestComparisons", req, opts, _core.Deadline(opts.timeout)))

    def labeler_report(self, *, tag: str | None = None, timeout: float | None = None) -> list[labels.LabelerStats]:
        """Per labeler: volume, agreement with the model and the others, self-consistency, flag."""
        opts = self._call_options(timeout)
        req = lpb.LabelerReportRequest(tag=tag or "")
        return labels.parse_report(self._unary("LabelerReport", req, opts, _core.Deadline(opts.timeout)))

    def export_preferences(
        self, *, kind: str | None = None, since: float | None = None, tag: str | None = None,
        labeler: str | None = None, timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stored preferences as training rows (rmserve's JSONL formats), in the order stored."""
        opts = self._call_options(timeout)
        req = labels.build_export(kind, since, tag, labeler)
        try:
            for chunk in self._labels.ExportPreferences(req, timeout=opts.timeout, metadata=opts.metadata):
                yield from labels.parse_rows(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def run_status(self, run_id: str, *, timeout: float | None = None) -> RunStatus:
        """The run monitor's statistics and over-optimisation alarm for `run_id` (the id its
        Score calls were tagged with); NotFoundError for a run the server has not seen."""
        opts = self._call_options(timeout)
        req = pb.GetRunStatusRequest(run_id=run_id)
        return parse_run_status(self._unary("GetRunStatus", req, opts, _core.Deadline(opts.timeout)))

    def list_runs(self, *, timeout: float | None = None) -> list[RunStatus]:
        """Every run the monitor tracks, most recently seen first (without per-step series)."""
        opts = self._call_options(timeout)
        resp = self._unary("ListRuns", pb.ListRunsRequest(), opts, _core.Deadline(opts.timeout))
        return [parse_run_status(r) for r in resp.runs]

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server is serving (name, version, heads, limits, normalisation)."""
        opts = self._call_options(timeout)
        resp = self._unary("GetModelInfo", pb.GetModelInfoRequest(), opts, _core.Deadline(opts.timeout))
        return _core.parse_model_info(resp)

    def health(self, *, timeout: float | None = None) -> bool:
        """True when the standard gRPC health service reports SERVING for the server ("").

        An unreachable server is not healthy (False), not an error; one attempt,
        no retries, so a readiness probe answers for now.
        """
        t = timeout or self.timeout or _core.DEFAULT_HEALTH_TIMEOUT
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=t, metadata=self._options.metadata
            )
        except grpc.RpcError as e:
            if e.code() in _core.NOT_HEALTHY_CODES:
                return False
            raise from_rpc_error(e) from None
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> None:
        """Block until `health()` is True; raises DeadlineExceededError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left > 0 and self.health(timeout=max(min(left, _core.DEFAULT_HEALTH_TIMEOUT), 0.01)):
                return
            if time.monotonic() + poll_interval >= end:
                raise DeadlineExceededError(f"{self.address} not SERVING after {timeout:g}s")
            time.sleep(poll_interval)

    # -- admin ---------------------------------------------------------------

    def train(
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
    ) -> Iterator[TrainProgress]:
        """Start a training job on a file the server can read; yields its progress.

        Never retried (it starts a job). Dropping the iterator does not stop the
        job: its version still lands in the registry (and is activated if asked).
        """
        req = build_train_request(
            data_path, dev_path=dev_path, kind=kind, num_heads=num_heads, finetune_layers=finetune_layers,
            epochs=epochs, lr=lr, seed=seed, backbone=backbone, activate=activate, name=name,
            max_tokens=max_tokens, options=options,
        )
        opts = self._call_options(timeout)
        try:
            for p in self._admin.Train(req, timeout=opts.timeout, metadata=opts.metadata):
                yield parse_progress(p)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def list_models(self, *, timeout: float | None = None) -> list[ModelVersion]:
        """Versions in the server's registry, oldest first; `.active` marks the served one."""
        opts = self._call_options(timeout)
        return parse_models(self._unary("ListModels", apb.ListModelsRequest(), opts, _core.Deadline(opts.timeout)))

    def activate_model(self, version: str, *, propagate: bool = True, timeout: float | None = None) -> Activation:
        """Load, warm and switch to `version`; in-flight requests finish on the old one.

        `propagate=True` (the default) also writes the registry's ACTIVE pointer: a restart serves
        `version`, and replicas sharing the registry follow within their `--registry-poll`.
        `propagate=False` switches only the replica this call reaches (a canary): use a client
        with that replica's address alone. See docs/scaling.md."""
        opts = self._call_options(timeout)
        req = apb.ActivateModelRequest(version=version, propagate=propagate)
        return parse_activation(self._unary("ActivateModel", req, opts, _core.Deadline(opts.timeout)))
