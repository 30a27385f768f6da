"""Load test: many concurrent clients against a local server driven past what it can score.

Run (the recorded figures: bench/results/load-test-2026-12-06.md):

    .venv/bin/python bench/load_test.py --seconds 30 --out bench/results/load-test-$(date +%F).md

`--tiny` serves a tiny random Llama (as tests/helpers.py builds; tests/test_load.py runs
`--tiny --clients 8 --seconds 5`), otherwise the embedded default model (or `--model DIR`).

What it does:

1. Starts `rmserve serve` as a subprocess (its peak RSS is its own: /proc/PID/status VmHWM)
   with a small queue (`--max-queue`, default 32), so excess load is refused rather than
   queued for minutes.
2. Loads the same model with rmserve's engine in this process and scores every distinct
   sample of the workload alone: the reference every answer under load is checked against.
3. Measures what the quiet server scores per second (samples of the pool, big requests),
   then runs `--clients` clients (default 64) for `--seconds`, offering `--overload` (default
   2) times that rate. Clients are spread over `--processes` processes, half threads with the
   sync SDK and half asyncio tasks with the async SDK, each with its own connection; each
   call is a Score, a ScoreGroups or a ScoreStream (1/2, 1/4, 1/4). Half the clients are
   "probes" (max_retries=0: a refusal is counted, with how long it took) and half "retriers"
   (the SDK's backoff, honouring the server's retry hint, until the call's deadline; streams,
   which the SDK does not retry, are resumed by the client: the samples not yet answered are
   sent again). Every call has a deadline (`--timeout` for probes, `--retry-timeout`, retries
   included, for retriers); DEADLINE_EXCEEDED is counted on its own.

Every answer is checked: each result's id against the ids sent (lost, duplicated, unexpected),
reward, std and min against the reference (mismatched if off by more than 1e-5, relative above
1). Reported: those counts (all must be 0), calls by outcome, p50/p99 latency of admitted calls
(probes' successes: one attempt each) and of retriers' calls end to end, how fast refusals
came, the server's own admitted/refused counts (its /metrics), and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# Only light imports up here: client processes (spawned) import this module again, and must
# not pay for torch. The server side and the reference import inside the functions that use them.

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
KINDS = (("score", 0.5), ("groups", 0.25), ("stream", 0.25))
COMPLETIONS_PER_GROUP = 4
MEAN_SAMPLES = {"score": 4.5, "groups": 1.5 * COMPLETIONS_PER_GROUP, "stream": 12.0}


# --------------------------------------------------------------------------- #
# workload
# --------------------------------------------------------------------------- #

def make_pool(n: int, n_groups: int, words: list[str], short: bool, seed: int = 0) -> dict[str, Any]:
    """Distinct samples (prompt/response pairs and conversations) and GRPO-like groups."""
    rng = random.Random(seed)
    p_words, r_words = ((3, 12), (2, 8)) if short else ((8, 32), (4, 24))

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lo_hi))).capitalize()

    samples = []
    for i in range(n):
        if i % 2:
            samples.append({"prompt": text(p_words) + "?", "response": text(r_words) + "."})
        else:
            samples.append({"messages": [{"role": "user", "content": text(p_words) + "?"},
                                         {"role": "assistant", "content": text(r_words) + "."}]})
    groups = [(text(p_words) + "?", [text(r_words) + "." for _ in range(COMPLETIONS_PER_GROUP)])
              for _ in range(n_groups)]
    return {"samples": samples, "groups": groups}


def reference(model_dir: str | None, dtype: str, pool: dict[str, Any]) -> dict[str, list]:
    """Every distinct sample scored alone by rmserve's engine in this process, encoded as the
    server encodes it: [(reward, std, min)] for samples and, per group, per completion."""
    import numpy as np

    from rmserve.client import _core
    from rmserve.service.engine.model import load_model
    from rmserve.service.engine.scoring import ScoringEngine
    from rmserve.service.server.config import DEFAULT_MODEL_DIR
    from rmserve.service.server.encoding import encode_completion, encode_input, sample_name
    from rmserve.service.server.wire import sample_of

    model = load_model(Path(model_dir) if model_dir else DEFAULT_MODEL_DIR, dtype=dtype, device="cpu")
    engine = ScoringEngine(model)
    enc = model.encoder

    def alone(ids: list[int]) -> tuple[float, float, float]:
        out = engine.score([ids])
        return float(out.mean[0]), float(np.sqrt(max(float(out.var[0]), 0.0))), float(out.min[0])

    samples = [alone(encode_input(enc, sample_of(_core.build_sample(s, i)).input, sample_name(i)).ids)
               for i, s in enumerate(pool["samples"])]
    groups = [[alone(encode_completion(enc, prompt, c, "group").ids) for c in completions]
              for prompt, completions in pool["groups"]]
    return {"samples": samples, "groups": groups, "model": f"{model.name} {model.version} ({model.dtype_name}, "
                                                          f"{model.num_heads} heads)"}


# --------------------------------------------------------------------------- #
# clients (run in spawned processes)
# --------------------------------------------------------------------------- #

class Checker:
    """One client's answers against the reference: lost, duplicated, unexpected, mismatched."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.max_diff = 0.0
        self.errors: dict[str, list[str]] = {}  # unexpected outcomes: their first messages

    def check(self, expected: list[tuple[str, list[float]]], results: list, by_id: bool) -> None:
        self.counts["results"] += len(results)
        if not by_id:  # ScoreGroups results carry no ids: they are positional
            self.counts["lost"] += max(0, len(expected) - len(results))
            self.counts["duplicated"] += max(0, len(results) - len(expected))
            pairs = list(zip(expected, results, strict=False))
        else:
            want = dict(expected)
            got = Counter(r.id for r in results)
            self.counts["lost"] += sum(1 for i, _ in expected if i not in got)
            self.counts["duplicated"] += sum(n - 1 for n in got.values()) + sum(1 for i in got if i in self.seen)
            self.counts["unexpected"] += sum(1 for i in got if i not in want)
            self.seen.update(got)
            pairs = [((r.id, want[r.id]), r) for r in results if r.id in want]
        for (_, (reward, std, low)), r in pairs:
            diff = max(abs(r.reward - reward) / max(1.0, abs(reward)), abs(r.std - std) / max(1.0, abs(std)),
                       abs(r.min - low) / max(1.0, abs(low)))
            self.max_diff = max(self.max_diff, diff)
            if not diff <= TOLERANCE:
                self.counts["mismatched"] += 1


def _plan_call(rng: random.Random, job: dict, cid: int, seq: int) -> tuple[str, Any, list]:
    """(kind, arguments, expected [(id, reference)]) of one call."""
    pool, ref = job["pool"], job["reference"]
    r, kind = rng.random(), "score"
    for k, share in KINDS:
        if r < share:
            kind = k
            break
        r -= share
    if kind == "groups":
        picks = [rng.randrange(len(pool["groups"])) for _ in range(rng.randint(1, 2))]
        expected = [(f"g{g}.{j}", ref["groups"][g][j]) for g in picks for j in range(COMPLETIONS_PER_GROUP)]
        return kind, [tuple(pool["groups"][g]) for g in picks], expected
    n = rng.randint(1, 8) if kind == "score" else rng.randint(8, 16)
    picks = [rng.randrange(len(pool["samples"])) for _ in range(n)]
    ids = [f"c{cid}.{seq}.{j}.{p}" for j, p in enumerate(picks)]
    samples = [{**pool["samples"][p], "id": i} for i, p in zip(ids, picks, strict=True)]
    return kind, samples, [(i, ref["samples"][p]) for i, p in zip(ids, picks, strict=True)]


def _code(e: BaseException, errors: dict[str, list[str]] | None = None) -> str:
    """The outcome's name; the first messages of unexpected ones are kept for the report."""
    code = getattr(e, "code", None)
    name = code.name if code is not None and hasattr(code, "name") else f"CLIENT_{type(e).__name__}"
    if errors is not None and name not in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
        seen = errors.setdefault(name, [])
        if len(seen) < 5:
            seen.append(f"{type(e).__name__}: {e}"[:500])
    return name


STREAM_RETRY = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})
# A resumed stream starts only with this much of its deadline left: grpcio's aio client can end
# a stream whose deadline is a fraction of a millisecond away with INTERNAL ("Internal error from
# Core") instead of DEADLINE_EXCEEDED, which would read as a server error here.
MIN_ATTEMPT_S = 0.1


class StreamCall:
    """A ScoreStream call as a retrying client makes it: the SDK does not retry streams, so
    after a refused chunk the client sends again only the samples not answered yet."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.results: list = []
        self.answered: set[str] = set()

    def left(self) -> list[dict]:
        return [s for s in self.samples if s["id"] not in self.answered]

    def add(self, result) -> None:
        self.results.append(result)
        self.answered.add(result.id)

    def backoff(self, attempts: int, rng: random.Random) -> float:
        return min(2.0, 0.05 * 2 ** min(attempts, 6)) * (0.5 + 0.5 * rng.random())


def _finish(checker: Checker, kind: str, code: str, expected: list, res: list | None, stream: StreamCall | None) -> None:
    """Check what came back: all of it for a call that succeeded; for a stream that failed
    in the end, the results it did deliver (no loss counted: the call failed)."""
    if code == "OK":
        checker.check(expected, res or [], by_id=kind != "groups")
    elif stream is not None and stream.results:
        checker.check([e for e in expected if e[0] in stream.answered], stream.results, by_id=True)


def _sync_client(job: dict, cid: int, policy: str, out: list, checker: Checker) -> None:
    from rmserve.client import RewardClient, RewardServiceError

    rng = random.Random(cid)
    timeout = job["timeout"] if policy == "probe" else job["retry_timeout"]
    client = RewardClient(job["address"], timeout=timeout, max_retries=0 if policy == "probe" else 10_000,
                          channel_options=[("grpc.use_local_subchannel_pool", 1)])
    interval, end = job["interval"], job["end"]
    next_t = time.time() + rng.uniform(0, interval)
    seq = 0
    with client:
        while time.time() < end:
            next_t = max(next_t, time.time() - interval)  # behind schedule: no burst to catch up
            time.sleep(max(0.0, next_t - time.time()))
            next_t += interval
            kind, args, expected = _plan_call(rng, job, cid, seq)
            seq += 1
            t0 = time.perf_counter()
            stream = StreamCall(args) if kind == "stream" else None
            res, attempts = None, 0
            while True:
                attempts += 1
                try:
                    if kind == "score":
                        res = list(client.score(args))
                    elif kind == "groups":
                        res = [r for g in client.score_groups_many(args) for r in g]
                    else:
                        left = timeout - (time.perf_counter() - t0)
                        for r in client.score_stream(stream.left(), chunk_size=4, timeout=max(left, 0.001)):
                            stream.add(r)
                        res = stream.results
                    code = "OK"
                except RewardServiceError as e:
                    code = _code(e, checker.errors)
                    delay = stream.backoff(attempts, rng) if stream is not None else 0.0
                    if policy == "retry" and stream is not None and code in STREAM_RETRY and \
                            time.perf_counter() - t0 + delay < timeout - MIN_ATTEMPT_S:
                        time.sleep(delay)
                        continue
                except Exception as e:  # a client-side failure is an outcome too, never a crash
                    code = _code(e, checker.errors)
                break
            _finish(checker, kind, code, expected, res, stream)
            out.append((policy, "sync", kind, code, time.perf_counter() - t0, len(expected)))


async def _async_client(job: dict, cid: int, policy: str, out: list, checker: Checker) -> None:
    import asyncio

    from rmserve.client import AsyncRewardClient, RewardServiceError

    rng = random.Random(cid)
    inflight = asyncio.Semaphore(job["async_inflight"])
    interval, end = job["interval"], job["end"]  # the same rate as a sync client; more may be in flight

    async def one(client, kind: str, args, expected) -> None:
        t0 = time.perf_counter()
        stream = StreamCall(args) if kind == "stream" else None
        res, attempts = None, 0
        try:
            while True:
                attempts += 1
                try:
                    if kind == "score":
                        res = list(await client.score(args))
                    elif kind == "groups":
                        res = [r for g in await client.score_groups_many(args) for r in g]
                    else:
                        left = timeout - (time.perf_counter() - t0)
                        async for r in client.score_stream(stream.left(), chunk_size=4, timeout=max(left, 0.001)):
                            stream.add(r)
                        res = stream.results
                    code = "OK"
                except RewardServiceError as e:
                    code = _code(e, checker.errors)
                    delay = stream.backoff(attempts, rng) if stream is not None else 0.0
                    if policy == "retry" and stream is not None and code in STREAM_RETRY and \
                            time.perf_counter() - t0 + delay < timeout - MIN_ATTEMPT_S:
                        await asyncio.sleep(delay)
                        continue
                except Exception as e:
                    code = _code(e, checker.errors)
                break
            _finish(checker, kind, code, expected, res, stream)
            out.append((policy, "async", kind, code, time.perf_counter() - t0, len(expected)))
        finally:
            inflight.release()

    timeout = job["timeout"] if policy == "probe" else job["retry_timeout"]
    async with AsyncRewardClient(job["address"], timeout=timeout, max_retries=0 if policy == "probe" else 10_000,
                                 channel_options=[("grpc.use_local_subchannel_pool", 1)]) as client:
        tasks = []
        next_t = time.time() + rng.uniform(0, interval)
        seq = 0
        while time.time() < end:
            await inflight.acquire()  # at most async_inflight calls of this client at once
            next_t = max(next_t, time.time() - interval)
            await asyncio.sleep(max(0.0, next_t - time.time()))
            next_t += interval
            if time.time() >= end:
                inflight.release()
                break
            kind, args, expected = _plan_call(rng, job, cid, seq)
            seq += 1
            tasks.append(asyncio.ensure_future(one(client, kind, args, expected)))
        await asyncio.gather(*tasks)


def client_process(job: dict) -> dict:
    """One process: its sync clients on threads, its async clients on one event loop."""
    import asyncio

    out: list = []
    checkers: list[Checker] = []
    threads = []
    for cid, api, policy in job["clients"]:
        checker = Checker()
        checkers.append(checker)
        if api == "sync":
            threads.append(threading.Thread(target=_sync_client, args=(job, cid, policy, out, checker)))

    async def async_side() -> None:
        await asyncio.gather(*(_async_client(job, cid, policy, out, checkers[k])
                               for k, (cid, api, policy) in enumerate(job["clients"]) if api == "async"))

    for t in threads:
        t.start()
    asyncio.run(async_side())
    for t in threads:
        t.join()
    counts: Counter[str] = Counter()
    for c in checkers:
        counts.update(c.counts)
    errors: dict[str, list[str]] = {}
    for c in checkers:
        for name, msgs in c.errors.items():
            errors.setdefault(name, []).extend(msgs)
    return {"calls": out, "counts": dict(counts), "max_diff": max((c.max_diff for c in checkers), default=0.0),
            "errors": errors}


# --------------------------------------------------------------------------- #
# the server
# --------------------------------------------------------------------------- #

class ServerProcess:
    """`rmserve serve` in a subprocess; its address and metrics port come from its log."""

    SERVING = re.compile(r"SERVING .* on ([\w.\-]+):(\d+), metrics on (\d+)")

    def __init__(self, args: argparse.Namespace, model: str | None, tmp: Path):
        cmd = [sys.executable, "-m", "rmserve.service.cli", "serve", "--port", "0", "--metrics-port", "0",
               "--max-queue", str(args.max_queue), "--max-wait-ms", str(args.max_wait_ms), "--dtype", args.dtype,
               "--registry", str(tmp / "registry"), "--runs-file", "", "--labels-db", str(tmp / "labels.sqlite3")]
        if model:
            cmd += ["--model", model]
        if args.max_queue_per_client is not None:
            cmd += ["--max-queue-per-client", str(args.max_queue_per_client)]
        self.cmd = cmd
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONSAFEPATH": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.address = ""
        self.metrics_url = ""

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-4000:]}")
            if m := self.SERVING.search(self.log_path.read_text()):
                self.address = f"{m.group(1)}:{m.group(2)}"
                self.metrics_url = f"http://{m.group(1)}:{m.group(3)}/metrics"
                return
            time.sleep(0.2)
        raise TimeoutError(f"the server was not serving after {timeout:.0f} s")

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the server process, in KiB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def metrics(self) -> dict[tuple[str, str], float]:
        """rmserve_requests_total by (method, code), and rmserve_sequences_scored_total."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
            text = r.read().decode()
        out: dict[tuple[str, str], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "rmserve_requests_total":
                    out[(s.labels["method"], s.labels["code"])] = s.value
                elif s.name == "rmserve_sequences_scored_total":
                    out[("sequences", "")] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- #
# run and report
# --------------------------------------------------------------------------- #

def capacity(address: str, pool: dict[str, Any], per_request: int, min_seconds: float = 2.0) -> float:
    """Samples per second the quiet server scores: the pool in big requests (4 in flight),
    repeated for at least `min_seconds` (after a warm-up)."""
    from rmserve.client import RewardClient

    samples = pool["samples"]
    with RewardClient(address, timeout=600, max_samples_per_request=per_request, max_concurrent_requests=4,
                      max_retries=10_000) as client:
        client.score(samples[: min(32, len(samples))])  # warm-up
        done, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < min_seconds or not done:
            client.score(samples)
            done += len(samples)
        return done / elapsed


def percentiles(xs: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not xs:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": len(xs)}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown CPU"


def run_all(args: argparse.Namespace, argv: list[str], tmp: Path, t_start: float) -> str:
    words = None
    model = args.model
    if args.tiny:
        from bench_http import WORDS, build_quick_model  # bench/bench_http.py: the same tiny model

        model, words = str(build_quick_model(tmp / "model")), WORDS
    else:
        from bench_http import WORDS

        words = WORDS
    pool = make_pool(args.samples, max(4, args.samples // 8), words, short=args.tiny)
    server = ServerProcess(args, model, tmp)
    try:
        ref = reference(model, args.dtype, pool)  # while the server loads
        server.wait_ready()
        cap = args.max_queue_per_client if args.max_queue_per_client is not None else args.max_queue // 2
        rate = capacity(server.address, pool, max(1, min(64, cap // 4, args.max_queue // 8)) if cap else 64)
        mean_samples = sum(MEAN_SAMPLES[k] * share for k, share in KINDS)
        interval = args.clients * mean_samples / (args.overload * rate)  # seconds between one client's calls
        specs = [(c, "sync" if (c // 2) % 2 == 0 else "async", "probe" if c % 2 == 0 else "retry")
                 for c in range(args.clients)]
        procs = max(1, min(args.processes, args.clients))
        before = server.metrics()
        start = time.time() + 2.0 + 0.5 * procs  # spawned processes import the SDK meanwhile
        jobs = [{"address": server.address, "pool": pool, "reference": ref, "timeout": args.timeout,
                 "retry_timeout": args.retry_timeout,
                 "interval": interval, "async_inflight": args.async_inflight, "start": start,
                 "end": start + args.seconds, "clients": specs[p::procs]} for p in range(procs)]
        with ProcessPoolExecutor(max_workers=procs, mp_context=get_context("spawn")) as ex:
            parts = list(ex.map(client_process, jobs))
        wall = time.time() - start
        after = server.metrics()
        memory = server.memory_kib()
    finally:
        server.stop()
    calls = [c for p in parts for c in p["calls"]]
    counts: Counter[str] = Counter()
    for p in parts:
        counts.update(p["counts"])
    summary = summarize(args, calls, counts, max(p["max_diff"] for p in parts), before, after, memory, rate,
                        wall, ref["model"], interval)
    summary["error_messages"] = {}
    for p in parts:
        for name, msgs in p["errors"].items():
            summary["error_messages"].setdefault(name, []).extend(msgs)
    summary["command"] = shlex.join(["python", "bench/load_test.py", *argv])
    summary["server_command"] = shlex.join(["rmserve", *server.cmd[3:]])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return report(summary)


def summarize(args, calls, counts, max_diff, before, after, memory, rate, wall, model, interval) -> dict:
    outcomes = Counter(f"{policy}/{code}" for policy, _, _, code, _, _ in calls)
    by_kind = Counter(f"{api}/{kind}/{code}" for _, api, kind, code, _, _ in calls)
    offered = sum(n for *_, n in calls)
    delta = {f"{m} {c}": after.get((m, c), 0) - before.get((m, c), 0) for (m, c) in after if c}
    server_calls = Counter()
    for key, v in delta.items():
        method, code = key.split(" ")
        if method in ("Score", "ScoreGroups", "ScoreStream.chunk") and v:
            server_calls["refused" if code == "RESOURCE_EXHAUSTED" else "admitted"] += int(v)
            server_calls[f"{method} {code}"] += int(v)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "model": model,
        "clients": args.clients, "processes": args.processes, "seconds": args.seconds, "wall_s": wall,
        "max_queue": args.max_queue, "max_queue_per_client": args.max_queue_per_client,
        "timeout_s": args.timeout, "retry_timeout_s": args.retry_timeout, "overload_target": args.overload,
        "capacity_samples_per_s": rate, "interval_s": interval,
        "offered_samples_per_s": offered / wall if wall > 0 else 0.0,
        "scored_samples_per_s": (after.get(("sequences", ""), 0) - before.get(("sequences", ""), 0)) / wall,
        "calls": len(calls), "outcomes": dict(sorted(outcomes.items())), "by_kind": dict(sorted(by_kind.items())),
        "results": counts.get("results", 0), "lost": counts.get("lost", 0),
        "duplicated": counts.get("duplicated", 0), "unexpected": counts.get("unexpected", 0),
        "mismatched": counts.get("mismatched", 0), "max_rel_diff": max_diff,
        "errors": sum(1 for c in calls if c[3] not in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")),
        "deadline_exceeded": sum(1 for c in calls if c[3] == "DEADLINE_EXCEEDED"),
        "retry_calls": sum(1 for c in calls if c[0] == "retry"),
        "retry_failed": sum(1 for c in calls if c[0] == "retry" and c[3] != "OK"),
        # one attempt, one RPC: the probes' unary calls (a stream's chunks are admitted one by one)
        "latency_admitted_s": percentiles([c[4] for c in calls if c[0] == "probe" and c[2] != "stream" and c[3] == "OK"]),
        "latency_refused_s": percentiles([c[4] for c in calls if c[0] == "probe" and c[2] != "stream"
                                          and c[3] == "RESOURCE_EXHAUSTED"]),
        "latency_stream_s": percentiles([c[4] for c in calls if c[0] == "probe" and c[2] == "stream" and c[3] == "OK"]),
        "latency_retry_s": percentiles([c[4] for c in calls if c[0] == "retry" and c[3] == "OK"]),
        "server": dict(server_calls), "server_vmhwm_mib": memory.get("VmHWM", 0) / 1024,
        "server_vmrss_mib": memory.get("VmRSS", 0) / 1024,
    }


def report(s: dict) -> str:
    def ms(p: dict, k: str) -> str:
        return "-" if p[k] is None else f"{1e3 * p[k]:.0f}"

    la, lr, lx, ls = s["latency_admitted_s"], s["latency_retry_s"], s["latency_refused_s"], s["latency_stream_s"]
    srv = s["server"]
    lines = [
        f"# Load test ({s['date']})",
        "",
        f"- CPU: {s['cpu']} ({s['cpus']} CPUs, shared by the server and the clients)",
        f"- model: {s['model']}",
        f"- command: `{s['command']}`",
        f"- server: `{s['server_command']}`",
        f"- {s['clients']} clients in {s['processes']} processes (sync SDK on threads, async SDK on event loops; "
        f"half probes without retries, half retrying), {s['seconds']:g} s; deadline per call {s['timeout_s']:g} s "
        f"(probes), {s['retry_timeout_s']:g} s with retries (retriers)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| quiet server's capacity (samples/s) | {s['capacity_samples_per_s']:.1f} |",
        f"| offered (samples/s, all calls started) | {s['offered_samples_per_s']:.1f} "
        f"({s['offered_samples_per_s'] / s['capacity_samples_per_s']:.2f}x capacity; target {s['overload_target']:g}x) |",
        f"| scored under load (samples/s) | {s['scored_samples_per_s']:.1f} |",
        f"| calls | {s['calls']} |",
        f"| results checked | {s['results']} |",
        f"| lost / duplicated / unexpected / mismatched | {s['lost']} / {s['duplicated']} / {s['unexpected']} / "
        f"{s['mismatched']} |",
        f"| largest relative difference to the reference | {s['max_rel_diff']:.1e} |",
        f"| errors other than RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED | {s['errors']} |",
        f"| DEADLINE_EXCEEDED | {s['deadline_exceeded']} |",
        f"| retrying clients: calls failed / made | {s['retry_failed']} / {s['retry_calls']} |",
        f"| server: admitted / refused (RESOURCE_EXHAUSTED) requests and stream chunks | "
        f"{srv.get('admitted', 0)} / {srv.get('refused', 0)} |",
        f"| admitted requests' latency p50 / p99 / max (ms; probes' Score and ScoreGroups, one attempt) | "
        f"{ms(la, 'p50')} / {ms(la, 'p99')} / {ms(la, 'max')} (n={la['n']}) |",
        f"| time to RESOURCE_EXHAUSTED p50 / p99 / max (ms; the same calls, refused) | {ms(lx, 'p50')} / "
        f"{ms(lx, 'p99')} / {ms(lx, 'max')} (n={lx['n']}) |",
        f"| probes' whole streams, latency p50 / p99 / max (ms) | {ms(ls, 'p50')} / {ms(ls, 'p99')} / "
        f"{ms(ls, 'max')} (n={ls['n']}) |",
        f"| retrying calls' latency p50 / p99 / max (ms; end to end) | {ms(lr, 'p50')} / {ms(lr, 'p99')} / "
        f"{ms(lr, 'max')} (n={lr['n']}) |",
        f"| server peak RSS (VmHWM, MiB) | {s['server_vmhwm_mib']:.0f} (RSS at the end {s['server_vmrss_mib']:.0f}) |",
        "",
        "Calls by client policy and outcome: " + ", ".join(f"{k} {v}" for k, v in s["outcomes"].items()),
        "",
        "Server requests by method and code: " + ", ".join(f"{k} {v}" for k, v in sorted(srv.items())
                                                          if k not in ("admitted", "refused")),
    ]
    for name, msgs in s.get("error_messages", {}).items():
        lines += ["", f"{name} (first messages):", *(f"- {m}" for m in msgs[:5])]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory to serve (default: the embedded default model)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and short texts (tests)")
    ap.add_argument("--dtype", default="auto", help="server --dtype, and the reference's")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long clients start new calls")
    ap.add_argument("--overload", type=float, default=2.0, help="offered load / the quiet server's capacity")
    ap.add_argument("--timeout", type=float, default=30.0, help="deadline of a probe's call (s)")
    ap.add_argument("--retry-timeout", type=float, default=120.0,
                    help="deadline of a retrying client's call, its retries included (s)")
    ap.add_argument("--async-inflight", type=int, default=4, help="calls an async client keeps in flight")
    ap.add_argument("--samples", type=int, default=256, help="distinct samples in the workload")
    ap.add_argument("--max-queue", type=int, default=32,
                    help="server --max-queue: a latency budget, about throughput x the wait callers accept")
    ap.add_argument("--max-queue-per-client", type=int, help="server --max-queue-per-client (default: its own)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms")
    ap.add_argument("--json", help="also write the figures as JSON here")
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, also under PYTHONSAFEPATH
    from common import run_and_report  # bench/common.py (imports torch: not at module level)

    return run_and_report(argv, parse_args, run_all, "rmserve-load-")


if __name__ == "__main__":
    sys.exit(main())
