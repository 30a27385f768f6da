"""Prometheus metrics, `rmserve_*`, on a registry of the server's own.

A registry per server (not the global default) lets several servers live in
one process (tests, benchmarks) without double registration. Labels are
bounded: method and status-code names, drop reasons, model version (one live
at a time, plus the last few after hot swaps).
"""

from __future__ import annotations

from collections.abc import Sequence

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Summary,
    start_http_server,
)

# `_created` series double the series count and no dashboard or alert uses them.
prometheus_client.disable_created_metrics()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_REWARD_BUCKETS = (-5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5)
_STD_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rmserve_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram(
            "rmserve_request_latency_seconds", "Latency of successful RPCs by method (fast rejections would hide slow scoring)",
            ["method"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("rmserve_requests_in_flight", "RPCs being handled now", registry=r)
        self.stream_chunks = Gauge(
            "rmserve_stream_chunks_unanswered",
            "ScoreStream chunks read and not yet written back, all streams (at most STREAM_WINDOW per stream)",
            registry=r,
        )
        self.queue_depth_gauge = Gauge("rmserve_queue_depth", "Samples waiting in the scheduler queue", registry=r)
        self.queue_capacity = Gauge("rmserve_queue_capacity", "Samples the queue holds before RESOURCE_EXHAUSTED", registry=r)
        self.queue_wait = Histogram(
            "rmserve_queue_wait_seconds", "Time a sample waited before its batch closed",
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.dropped_samples = Counter(
            "rmserve_dropped_samples", "Queued samples dropped before compute, by reason", ["reason"], registry=r
        )
        self.batch_sequences = Histogram(
            "rmserve_batch_sequences", "Sequences per scheduler batch", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram("rmserve_batch_tokens", "Real tokens per scheduler batch", buckets=_TOKEN_BUCKETS, registry=r)
        self.padding_fraction = Histogram(
            "rmserve_padding_fraction", "Share of computed tokens that were padding, per engine call",
            buckets=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r,
        )
        self.forward_seconds = Histogram(
            "rmserve_forward_seconds", "Engine time per scheduler batch (forwards + scoring)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens_scored = Counter("rmserve_tokens_scored", "Real tokens scored", registry=r)
        self.sequences_scored = Counter("rmserve_sequences_scored", "Sequences scored", registry=r)
        self.truncated = Counter("rmserve_truncated_samples", "Samples whose prompt was cut to fit max_tokens", registry=r)
        self.reward = Histogram("rmserve_reward", "Ensemble reward of scored samples", buckets=_REWARD_BUCKETS, registry=r)
        # Histograms with negative buckets export no _sum; this gives the mean reward.
        self.reward_mean = Summary("rmserve_reward_observed", "Sum and count of ensemble rewards (for the mean)", registry=r)
        self.reward_std = Histogram("rmserve_reward_std", "Ensemble std of scored samples", buckets=_STD_BUCKETS, registry=r)
        self.model_info = Info("rmserve_model", "The model being served", registry=r)
        self.ready = Gauge("rmserve_ready", "1 when a model is loaded and serving", registry=r)
        self.activations = Counter(
            "rmserve_model_activations",
            "Hot swaps by what asked (rpc: ActivateModel, train: Train with activate, registry: following the "
            "registry's ACTIVE pointer) and result (ok, failed: the previous version kept serving)",
            ["source", "result"], registry=r,
        )
        self.registry_out_of_sync = Gauge(
            "rmserve_registry_out_of_sync",
            "1 while this replica serves a version other than its registry's ACTIVE one (a version it failed "
            "to load, or a local-only ActivateModel); 0 otherwise or with --registry-poll 0",
            registry=r,
        )
        self.runs_tracked = Gauge("rmserve_runs_tracked", "Runs the run monitor holds statistics for", registry=r)
        self.runs_alarming = Gauge("rmserve_runs_alarming", "Tracked runs whose over-optimisation alarm has fired", registry=r)
        self.run_alarms = Counter("rmserve_run_alarms", "Over-optimisation alarms raised", registry=r)
        # One series per alarming run, for at most RUN_LABELS runs (the most recent alarms):
        # a run id is unbounded, so it only becomes a label when it matters, and never many.
        self.run_alarm = Gauge("rmserve_run_alarm", "1 for a run whose over-optimisation alarm fired (latest alarms only)",
                               ["run_id"], registry=r)
        self._alarm_labels: list[str] = []

    def serve_http(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics endpoint on its own port; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)

    # -- SchedulerObserver ------------------------------------------------------

    def queue_depth(self, items: int) -> None:
        self.queue_depth_gauge.set(items)

    def batch_formed(self, items: int, tokens: int, waits_s: Sequence[float]) -> None:
        self.batch_sequences.observe(items)
        self.batch_tokens.observe(tokens)
        for w in waits_s:
            self.queue_wait.observe(w)

    def dropped(self, reason: str, items: int) -> None:
        self.dropped_samples.labels(reason).inc(items)

    # -- engine -----------------------------------------------------------------

    def engine_call(self, *, real_tokens: int, padded_tokens: int, seconds: float, sequences: int) -> None:
        self.forward_seconds.observe(seconds)
        if padded_tokens:
            self.padding_fraction.observe(1.0 - real_tokens / padded_tokens)
        self.tokens_scored.inc(real_tokens)
        self.sequences_scored.inc(sequences)

    def activation(self, source: str, ok: bool) -> None:
        self.activations.labels(source, "ok" if ok else "failed").inc()

    # -- run monitor ------------------------------------------------------------------

    RUN_LABELS = 16

    def runs(self, tracked: int, alarming: int, new_alarm: str | None = None) -> None:
        self.runs_tracked.set(tracked)
        self.runs_alarming.set(alarming)
        if new_alarm is not None:
            self.run_alarms.inc()
            self.run_alarm.labels(new_alarm).set(1)
            self._alarm_labels.append(new_alarm)
            while len(self._alarm_labels) > self.RUN_LABELS:
                self.run_alarm.remove(self._alarm_labels.pop(0))

    def scored(self, rewards: Sequence[float], stds: Sequence[float], truncated: int) -> None:
        for r in rewards:
            self.reward.observe(r)
            self.reward_mean.observe(r)
        for s in stds:
            self.reward_std.observe(s)
        if truncated:
            self.truncated.inc(truncated)
