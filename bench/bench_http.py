"""HTTP/JSON front door vs gRPC: the same workload through both, one server, one process.

Run (2-core CPU, a few minutes with the embedded default model; nothing is
downloaded once the builtin backbone is cached):

    .venv/bin/python bench/bench_http.py --out bench/results/http-$(date +%F).md

`--quick` builds a tiny random Llama with a chat template (as tests/helpers.py
does), short texts and N = 16 by default, and runs in seconds; its engine time is
small, so `--quick --n 64` shows what the transports themselves cost (tests/test_bench_http.py runs it so the script cannot
rot); `--model DIR` serves another model.

Workload: `--n` PPO-like conversations (a user prompt of U[16, 96] words and an
assistant reply of U[8, 64] words; --quick: U[4, 16] and U[2, 8]). gRPC sends
them as messages (the server applies the chat template); HTTP sends what
OpenRLHF sends, the decoded prompt + response with the template applied
(`tokenizer.apply_chat_template(messages, tokenize=False)`), which the server
tokenises as it is. Both are checked to give the same rewards.

Cases, every one run once per round, rounds interleaved (the order rotates),
after an untimed warm-up of each:

  grpc-batch       RewardClient.score(N samples): one call (the SDK's usual use)
  http-batch       one POST /get_reward with the N queries in one body
  http-concurrent  N concurrent POST /get_reward of one query each, each in its
                   own aiohttp.ClientSession: what OpenRLHF's rollout workers do
                   (SingleTurnAgentExecutor, one sample per request)
  grpc-concurrent  N concurrent AsyncRewardClient.score([sample]) on one channel
                   (asyncio.gather)

Reported per case: wall time (median and best of the rounds), the scheduler
batches the engine ran for it (the delta of the server's
`rmserve_batch_sequences` histogram count; its sum is the sequences scored) —
the coalescing figure, N requests -> K engine batches — and the largest |reward
difference| to grpc-batch. Then the HTTP/gRPC ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import torch
from common import run_and_report  # bench/common.py

from rmserve.client import AsyncRewardClient, RewardClient
from rmserve.service.server.background import BackgroundServer
from rmserve.service.server.config import ServerConfig

CASES = ("grpc-batch", "http-batch", "http-concurrent", "grpc-concurrent")
WORDS = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "bread", "flour", "yeast", "bake", "oven", "recipe", "answer", "question", "help", "safe", "sorry", "cannot"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class Sizes:
    prompt_words: tuple[int, int] = (16, 96)
    reply_words: tuple[int, int] = (8, 64)


QUICK = Sizes(prompt_words=(4, 16), reply_words=(2, 8))


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)

    def max_diff(self, reference: list[float]) -> float:
        return max(abs(a - b) for rw in self.rewards for a, b in zip(rw, reference, strict=True))


# --------------------------------------------------------------------------- #
# model and workload
# --------------------------------------------------------------------------- #

def build_quick_model(root: Path) -> Path:
    """A tiny 'heads' ensemble over a random 2-layer Llama with a byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from rmserve.service.engine.ensemble import (
        EnsembleManifest,
        MemberSpec,
        MemberTensors,
        save_member,
        write_manifest,
    )

    bb = root / "backbone"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(bb)
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           pad_token_id=0)).save_pretrained(bb)
    g = torch.Generator().manual_seed(3)
    spec = MemberSpec(name="member0", backbone="backbone")
    save_member(root, spec, MemberTensors(weight=torch.randn(4, 32, generator=g), bias=torch.randn(4, generator=g)))
    write_manifest(root, EnsembleManifest(name="bench-quick", version="v1", kind="heads", members=[spec],
                                          shift=[0.0] * 4, scale=[1.0] * 4, max_tokens=512))
    return root


def conversations(n: int, sizes: Sizes, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi)))

    return [[{"role": "user", "content": text(sizes.prompt_words).capitalize() + "?"},
             {"role": "assistant", "content": text(sizes.reply_words).capitalize() + "."}] for _ in range(n)]


# --------------------------------------------------------------------------- #
# the four cases
# --------------------------------------------------------------------------- #

def scheduler_counts(server: BackgroundServer) -> tuple[int, int]:
    """(scheduler batches, sequences) so far: the count and sum of rmserve_batch_sequences."""
    hist = server.server.state.metrics.batch_sequences
    samples = {s.name: s.value for m in hist.collect() for s in m.samples if not s.labels.get("le")}
    return int(samples["rmserve_batch_sequences_count"]), int(samples["rmserve_batch_sequences_sum"])


def grpc_batch(msgs, client: RewardClient) -> list[float]:
    return [r.reward for r in client.score([{"messages": m} for m in msgs])]


async def _post(session: aiohttp.ClientSession, url: str, queries: list[str]) -> list[float]:
    async with session.post(url, json={"query": queries, "prompts": [""] * len(queries),
                                       "labels": [None] * len(queries)}) as r:
        r.raise_for_status()
        return (await r.json())["rewards"]


def http_batch(url: str, queries: list[str]) -> list[float]:
    async def go():
        async with aiohttp.ClientSession() as s:
            return await _post(s, url, queries)
    return asyncio.run(go())


def http_concurrent(url: str, queries: list[str]) -> list[float]:
    async def one(q: str) -> float:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:  # OpenRLHF: one per request
            return (await _post(s, url, [q]))[0]

    async def go():
        return await asyncio.gather(*(one(q) for q in queries))
    return asyncio.run(go())


def grpc_concurrent(address: str, msgs) -> tuple[list[float], float]:
    """Returns the rewards and the seconds, timed after the channel is up."""
    async def go():
        async with AsyncRewardClient(address, timeout=600) as c:
            await c.health()
            t0 = time.perf_counter()
            res = await asyncio.gather(*(c.score([{"messages": m}]) for m in msgs))
            return [r[0].reward for r in res], time.perf_counter() - t0
    return asyncio.run(go())


def run_case(case: str, server: BackgroundServer, url: str, msgs, queries, client: RewardClient) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    if case == "grpc-batch":
        out = grpc_batch(msgs, client)
    elif case == "http-batch":
        out = http_batch(url, queries)
    elif case == "http-concurrent":
        out = http_concurrent(url, queries)
    else:
        return grpc_concurrent(server.address, msgs)
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def report(results: dict[str, Result], args, argv: list[str], info, ntok: int, wall: float) -> str:
    n = args.n
    base = statistics.median(results["grpc-batch"].seconds)
    reference = results["grpc-batch"].rewards[0]
    lines = [
        f"# HTTP front door vs gRPC ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} CPUs; {platform.platform()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"- model: {info.name} {info.version} ({info.backbone}, {info.dtype}, {info.num_heads} heads)",
        f"- workload: {n} PPO-like conversations, {ntok} tokens in all (mean {ntok / n:.0f}); "
        f"{args.rounds} interleaved round(s) after a warm-up; server max_wait_ms {args.max_wait_ms:g}",
        f"- command: `{shlex.join(['python', 'bench/bench_http.py', *argv])}`",
        "",
        "| case | requests | wall s (median) | wall s (best) | engine batches (median, min-max) | samples / batch "
        "| x grpc-batch time | max abs reward diff vs grpc-batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        r = results[case]
        med, k = statistics.median(r.seconds), statistics.median(r.batches)
        reqs = 1 if case.endswith("batch") else n
        lines.append(f"| {case} | {reqs} | {med:.3f} | {min(r.seconds):.3f} | {k:g} ({min(r.batches)}-{max(r.batches)}) "
                     f"| {n / k:.1f} | {med / base:.2f} | {r.max_diff(reference):.1e} |")

    def ratio(a: str, b: str) -> str:
        """Median over rounds of the paired per-round ratio (the two ran back to back), and its range."""
        per = [x / y for x, y in zip(results[a].seconds, results[b].seconds, strict=True)]
        return f"{statistics.median(per):.3f} (rounds {min(per):.3f}-{max(per):.3f})"

    def delta_ms(a: str, b: str) -> float:
        return 1e3 * statistics.median(x - y for x, y in zip(results[a].seconds, results[b].seconds, strict=True))

    hc, gc = results["http-concurrent"], results["grpc-concurrent"]
    lines += [
        "",
        "Ratios of wall time, HTTP over gRPC (median of the per-round ratios):",
        f"- one batch of {n}: {ratio('http-batch', 'grpc-batch')}; "
        f"HTTP - gRPC {delta_ms('http-batch', 'grpc-batch'):+.1f} ms",
        f"- {n} concurrent single-sample requests: {ratio('http-concurrent', 'grpc-concurrent')}; "
        f"HTTP - gRPC {delta_ms('http-concurrent', 'grpc-concurrent'):+.1f} ms",
        f"- HTTP {n} concurrent requests / HTTP one batch: {ratio('http-concurrent', 'http-batch')}",
        f"- coalescing: HTTP {n} requests -> {statistics.median(hc.batches):g} engine batches; "
        f"gRPC {n} requests -> {statistics.median(gc.batches):g}",
        "",
        f"total wall time {wall:.0f} s",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory to serve (default: the embedded default model)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, short texts, seconds (for tests)")
    ap.add_argument("--n", type=int, help="samples per case (default 64; --quick: 16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    ap.add_argument("--dtype", default="auto", help="server --dtype (auto | float32 | bfloat16)")
    ap.add_argument("--max-wait-ms", type=float, default=ServerConfig.max_wait_ms, help="server batching window")
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 16 if args.quick else 64
    return args


def main(argv: list[str] | None = None) -> int:
    return run_and_report(argv, parse_args, run_all, "rmserve-bench-http-")


def run_all(args, argv: list[str], tmp: Path, t_start: float) -> str:
    model = str(build_quick_model(tmp / "model")) if args.quick else args.model
    config = ServerConfig(model=model, port=0, metrics_port=None, http_port=0, dtype=args.dtype,
                          max_wait_ms=args.max_wait_ms, max_samples_per_request=max(1024, args.n),
                          runs_file="", registry=str(tmp / "registry"))
    server = BackgroundServer(config).start()
    try:
        url = f"http://127.0.0.1:{server.server.http_port}/get_reward"
        tokenizer = server.server.state.live_slot().model.encoder.tokenizer
        msgs = conversations(args.n, QUICK if args.quick else Sizes())
        queries = [tokenizer.apply_chat_template(m, tokenize=False) for m in msgs]  # what OpenRLHF sends
        ntok = sum(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in queries)
        results = {c: Result() for c in CASES}
        with RewardClient(server.address, timeout=600, max_samples_per_request=max(256, args.n)) as client:
            info = client.model_info()
            warm = max(1, min(8, args.n))
            for case in CASES:  # warm-up: connections, thread pools, allocator
                run_case(case, server, url, msgs[:warm], queries[:warm], client)
            for rnd in range(args.rounds):
                order = CASES[rnd % len(CASES):] + CASES[:rnd % len(CASES)]
                for case in order:
                    b0, s0 = scheduler_counts(server)
                    rewards, secs = run_case(case, server, url, msgs, queries, client)
                    b1, s1 = scheduler_counts(server)
                    r = results[case]
                    r.seconds.append(secs)
                    r.batches.append(b1 - b0)
                    r.sequences.append(s1 - s0)
                    if s1 - s0 != args.n:
                        raise RuntimeError(f"{case}: the server scored {s1 - s0} sequences for {args.n} samples")
                    r.rewards.append(rewards)
    finally:
        server.stop()
    return report(results, args, argv, info, ntok, time.perf_counter() - t_start)


if __name__ == "__main__":
    sys.exit(main())
