"""CPU scoring throughput: plain Hugging Face vs rmserve, side by side in one process.

Run (2-core CPU, meant to stay under ~10 minutes; nothing is downloaded once
the builtin backbone is cached):

    .venv/bin/python bench/bench_cpu.py --out bench/results/cpu-$(date +%F).md

`--tiny` runs a tiny random Llama in seconds (tests/test_bench_cpu.py runs it
so the script cannot rot); `--workloads` and `--variants` run a subset.

Before/after (a change that must not slow serving down): `--against REF` runs the
PPO and GRPO workloads through gRPC against two server processes, one from this
checkout's working tree and one from git ref REF, alternating in one client, and
reports the new/old time ratios per round, best and median (bench/before_after.py
says how; docs/engine.md has the command):

    .venv/bin/python bench/bench_cpu.py --against 73db9bf --out bench/results/refactor-vs-73db9bf-$(date +%F).md

Every variant scores the same token ids with the embedded default's backbone
(SmolLM2-135M-Instruct) and random heads (heads do not change the cost):

  hf-padded      bare HF backbone, fp32, fixed padded batches of 32 in arrival
                 order (how OpenRLHF's serve_rm batches): the baseline, always run
  hf-best-fp32   the best plain-HF variant, fp32. PPO: length-sorted batches under
                 a 4096-token budget (rmserve's plan_batches). GRPO: each group's
                 prompt encoded once (use_cache=True), its KV cache expanded to the
                 group, only the completions run
  hf-best-bf16   the same on the HF backbone cast with .to(torch.bfloat16)
  engine-fp32    rmserve's ScoringEngine in process, load_model(dtype="float32"),
                 packing="auto" (what the server runs: packed in fp32 on CPU)
  engine-bf16    the same with load_model(dtype="bfloat16") (padded on CPU)
  engine-packed-fp32, engine-padded-fp32, engine-packed-bf16, engine-padded-bf16
                 the engine with packing forced "on" (one token stream per batch)
                 or "off" (length-sorted padded rows); run when named in --variants
  grpc-fp32      rmserve end to end: SDK -> gRPC on localhost -> scheduler ->
                 engine, ServerConfig(dtype="float32"); PPO via client.score on
                 token ids, GRPO via client.score_groups_many (all groups of a step
                 in one call, as the TRL adapter sends them)
  grpc-bf16      the same with ServerConfig(dtype="bfloat16")

Workloads: PPO-like, `--n` sequences of random token ids with lengths
U[32, 512]; GRPO-like, `--groups` groups of one ~384-token prompt and 8
completions of ~64 tokens. score_groups takes text, so the GRPO workload is
random vocabulary words, and the HF variants and the engine get the token ids
of the model's own PromptEncoder (what the server computes); the gRPC results'
num_tokens are checked against them.

The header says which CPU ran it: its model, the flags that decide the matmul
kernels (avx2, avx512f, avx512_bf16, amx_tile, amx_bf16 from /proc/cpuinfo) and
whether bf16 is native there (AVX512-BF16 or AMX: what `--dtype auto` serves
bf16 on), then the matmul rates measured in this run and the ceilings they give.
Numbers from different CPUs are different tables: record one per CPU.

Printed per workload and variant: tokens/s (PPO) or completions/s (GRPO), the
ratio to the baseline, the largest |score - baseline score| over the baseline's
score std, and the fraction of the ceiling. The ceiling is the matmul rate
measured in this run (the best of several 2048^3 torch.mm before the rounds and
again after them, fp32 and bf16) over the workload's useful FLOPs, counted by
bench/common.py as bench_gpu.py's MFU is:
2 x linear-layer weights x real tokens plus causal attention
4 x d_attn x layers x sum(L(L + 1) / 2) (QK^T and PV); for GRPO the useful
tokens are each prompt once plus the completions, and a completion of length C
after a prompt of length P attends C x P + C(C + 1) / 2 pairs. A variant is held
to the ceiling of its own dtype. Then gRPC / in-process engine throughput per dtype
(target >= 0.95), and the CPU physical-limit issue's targets as PASS/MISS lines
(information, not assertions), for both CPU kinds: on a native-bf16 CPU the bf16
ones count, elsewhere the fp32 ones. GRPO's "share of its ideal" is the speed-up
over the baseline divided by the ideal speed-up: the baseline's own efficiency on
what it computes (every prompt again, padding) applied to the useful FLOPs only,
at the variant's dtype's measured matmul rate.

To measure the no-AVX-512 table on a CPU that has AVX-512, cap every kernel library:
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`
(the header prints the caps; bf16 is then emulated, so `--dtype auto` serves fp32:
run the fp32 variants).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from common import causal_pairs, decoder_flops, run_and_report  # bench/common.py: FLOPs, report

VARIANTS = ("hf-padded", "hf-best-fp32", "hf-best-bf16", "engine-fp32", "engine-bf16", "grpc-fp32", "grpc-bf16",
            "engine-packed-fp32", "engine-padded-fp32", "engine-packed-bf16", "engine-padded-bf16")
DEFAULT_VARIANTS = VARIANTS[:7]   # the forced-layout rows answer one question (packed vs padded): ask for them
WORKLOADS = ("ppo", "grpo")
BASELINE = "hf-padded"
TOKEN_BUDGET = 4096   # hf-best (PPO) and rmserve's engine: padded tokens per forward
ARRIVAL_BATCH = 32    # the baseline's fixed batch size
NUM_HEADS = 5
AGAINST_ROUNDS = 5    # --against's default rounds


@dataclass(frozen=True)
class Sizes:
    """Workload shapes; --tiny shrinks them so the test suite runs in seconds."""

    min_len: int = 32
    max_len: int = 512
    prompt_len: int = 384
    completions: int = 8
    completion_len: int = 64
    gemm: int = 2048


TINY = Sizes(min_len=8, max_len=64, prompt_len=48, completions=8, completion_len=8, gemm=256)


@dataclass
class Group:
    """One GRPO group: its text (what score_groups sends) and where its sequences are."""

    prompt: str
    completions: list[str]
    members: list[int]       # indices into Workload.seqs
    prefix_len: int          # tokens every member shares (each keeps >= 1 of its own)


@dataclass
class Workload:
    name: str
    title: str
    seqs: list[list[int]]    # token ids in arrival order (a group's completions together)
    groups: list[Group]      # GRPO only
    useful_tokens: int       # what an ideal engine computes
    attn_pairs: int          # causal (query, key) pairs an ideal engine computes
    flops: float = 0.0       # useful FLOPs (tokens and pairs above)
    baseline_flops: float = 0.0  # what the padded arrival-order baseline computes

    @property
    def unit(self) -> str:
        return "completions" if self.groups else "tok"

    @property
    def units(self) -> int:
        """What throughput counts: completions (GRPO) or real tokens (PPO)."""
        return len(self.seqs) if self.groups else self.useful_tokens


@dataclass
class Row:
    workload: str
    key: str
    label: str
    dtype: str
    seconds: float
    scores: np.ndarray


# --------------------------------------------------------------------------- #
# model and workloads
# --------------------------------------------------------------------------- #

def build_model_dir(root: Path, tiny: bool) -> Path:
    """An ensemble dir: the builtin backbone (or a tiny random Llama) + random heads."""
    from rmserve.service.engine.ensemble import (
        EnsembleManifest,
        MemberSpec,
        MemberTensors,
        save_member,
        write_manifest,
    )

    if tiny:
        backbone, hidden = "backbone", 64
        _save_tiny_backbone(root / backbone, hidden)
    else:
        backbone, hidden = "builtin:smollm2-135m-instruct", 576
    g = torch.Generator().manual_seed(1)
    spec = MemberSpec(name="member0", backbone=backbone)
    save_member(root, spec, MemberTensors(weight=torch.randn(NUM_HEADS, hidden, generator=g) / hidden**0.5,
                                          bias=torch.zeros(NUM_HEADS)))
    write_manifest(root, EnsembleManifest(name="bench", version="bench", kind="heads", members=[spec], max_tokens=1024))
    return root


def _save_tiny_backbone(out: Path, hidden: int) -> None:
    """A random 2-layer Llama with a word-level tokenizer (words w2..w999), so text round-trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(out)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(out)


def ppo_workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return Workload("ppo", f"PPO-like: {n} sequences, lengths U[{lo}, {hi}]", seqs, [],
                    sum(map(len, seqs)), sum(causal_pairs(len(s)) for s in seqs))


def word_list(tokenizer) -> list[str]:
    """Whole words of the vocabulary, so random text tokenises to about one token per word."""
    vocab = tokenizer.get_vocab()
    spaced = [t[1:] for t in vocab if t.startswith("Ġ")]  # byte-level BPE marks a leading space with Ġ
    return sorted({w for w in (spaced or vocab) if re.fullmatch(r"[a-z][a-z0-9]{2,9}", w)})


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fit_words(count: Callable[[int], int], target: int) -> int:
    """The number of words whose text comes to `target` tokens (about one token per word)."""
    n = target
    for _ in range(8):
        got = count(n)
        if got == target:
            break
        n = max(1, n + target - got)
    return n


def _text_group(encode, words: list[str], rng: random.Random, sizes: Sizes) -> tuple[str, list[str]]:
    """A prompt of ~prompt_len tokens (chat template included) and completions of ~completion_len each."""
    pool = [rng.choice(words) for _ in range(2 * sizes.prompt_len)]
    probe_a = words[0]
    probe_b = next((w for w in words if w[0] != probe_a[0]), words[-1])

    def text(n: int, source: list[str]) -> str:
        return " ".join(source[:n])

    def prompt_tokens(n: int) -> int:
        return _lcp(encode(text(n, pool), probe_a), encode(text(n, pool), probe_b))

    prompt = text(_fit_words(prompt_tokens, sizes.prompt_len), pool)
    prefix = prompt_tokens(len(prompt.split()))
    completions = []
    for _ in range(sizes.completions):
        own = [rng.choice(words) for _ in range(2 * sizes.completion_len)]
        n = _fit_words(lambda n, own=own: len(encode(prompt, text(n, own))) - prefix, sizes.completion_len)
        completions.append(text(n, own))
    return prompt, completions


def grpo_workload(encoder, tokenizer, groups: int, sizes: Sizes, seed: int = 1) -> Workload:
    """Text groups, tokenised by the served model's PromptEncoder (the ids the server will compute)."""
    rng = random.Random(seed)
    words = word_list(tokenizer)

    def encode(prompt: str, completion: str) -> list[int]:
        return encoder.prompt_response(prompt, completion).ids

    seqs: list[list[int]] = []
    out: list[Group] = []
    tokens, pairs = 0, 0
    for _ in range(groups):
        prompt, completions = _text_group(encode, words, rng, sizes)
        ids = [encode(prompt, c) for c in completions]
        p = min(min(_lcp(ids[0], s) for s in ids), min(map(len, ids)) - 1)
        out.append(Group(prompt, completions, list(range(len(seqs), len(seqs) + len(ids))), p))
        seqs += ids
        suffixes = [len(s) - p for s in ids]
        tokens += p + sum(suffixes)
        pairs += causal_pairs(p) + sum(causal_pairs(c, past=p) for c in suffixes)
    c_mean = (sum(map(len, seqs)) - sum(g.prefix_len * len(g.members) for g in out)) / len(seqs)
    p_mean = sum(g.prefix_len for g in out) / len(out)
    title = (f"GRPO-like: {groups} groups of a {p_mean:.0f}-token prompt + {sizes.completions} completions "
             f"of {c_mean:.1f} tokens (mean)")
    return Workload("grpo", title, seqs, out, tokens, pairs)


# --------------------------------------------------------------------------- #
# plain Hugging Face variants
# --------------------------------------------------------------------------- #

def _padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from rmserve.service.engine.padding import right_pad

    return right_pad(batch, pad)


def _heads(hidden: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mean of the heads at each row's last real token (found from lengths, not the pad id)."""
    last = hidden[torch.arange(hidden.shape[0]), lengths - 1].float()
    return (last @ weight.T + bias).mean(1)


@torch.inference_mode()
def hf_batches(model, heads, seqs: list[list[int]], batches: list[list[int]], pad: int) -> np.ndarray:
    """Plain HF: one right-padded forward per batch of indices."""
    out = np.empty(len(seqs))
    for idx in batches:
        ids, mask, lengths = _padded([seqs[i] for i in idx], pad)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out[idx] = _heads(hidden, lengths, *heads).double().numpy()
    return out


@torch.inference_mode()
def hf_prefix_cache(model, heads, w: Workload, pad: int) -> np.ndarray:
    """Plain HF for GRPO: each prompt encoded once, its KV cache expanded to the group's completions."""
    from rmserve.service.engine.scoring import _cache_kwarg

    out = np.empty(len(w.seqs))
    for g in w.groups:
        p = g.prefix_len
        first = model(input_ids=torch.tensor([w.seqs[g.members[0]][:p]]), use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values  # renamed in transformers 5.2x
        ids, mask, lengths = _padded([w.seqs[i][p:] for i in g.members], pad)
        n, t = ids.shape
        group_cache = copy.deepcopy(cache)
        group_cache.batch_repeat_interleave(n)
        hidden = model(
            input_ids=ids, attention_mask=torch.cat([torch.ones(n, p, dtype=torch.long), mask], dim=1),
            position_ids=(p + torch.arange(t))[None, :].expand(n, t), use_cache=True,
            **{_cache_kwarg(model): group_cache},
        ).last_hidden_state
        out[g.members] = _heads(hidden, lengths, *heads).double().numpy()
    return out


def baseline_flops(model, w: Workload) -> float:
    """FLOPs the baseline computes: every arrival batch padded to its longest sequence, whole."""
    flops = 0.0
    for idx in arrival_batches(len(w.seqs)):
        longest = max(len(w.seqs[i]) for i in idx)
        flops += decoder_flops(model, len(idx) * longest, len(idx) * causal_pairs(longest))
    return flops


def arrival_batches(n: int) -> list[list[int]]:
    return [list(range(i, min(i + ARRIVAL_BATCH, n))) for i in range(0, n, ARRIVAL_BATCH)]


def hf_best(model, heads, w: Workload, pad: int) -> np.ndarray:
    """The best plain-HF variant: prefix cache for groups, length-sorted budgeted batches otherwise."""
    from rmserve.service.engine.contract import plan_batches

    if w.groups:
        return hf_prefix_cache(model, heads, w, pad)
    return hf_batches(model, heads, w.seqs, plan_batches([len(s) for s in w.seqs], TOKEN_BUDGET, 256), pad)


# --------------------------------------------------------------------------- #
# rmserve variants
# --------------------------------------------------------------------------- #

def engine_scores(engine, w: Workload) -> np.ndarray:
    """In process: the engine finds each group's shared prompt from the ids itself."""
    return engine.score(w.seqs).mean.astype(np.float64)


def grpc_scores(client, w: Workload) -> np.ndarray:
    """End to end: token ids for PPO; for GRPO every group of the step in one call, as a trainer
    (and the TRL adapter) sends them, like the engine gets them; num_tokens checked."""
    if w.groups:
        results = client.score_groups_many([(g.prompt, g.completions) for g in w.groups])
        calls = [(g.members, r) for g, r in zip(w.groups, results, strict=True)]
    else:
        calls = [(list(range(len(w.seqs))), client.score([{"token_ids": s} for s in w.seqs]))]
    out = np.empty(len(w.seqs))
    for idx, results in calls:
        got = [r.num_tokens for r in results]
        want = [len(w.seqs[i]) for i in idx]
        if got != want or any(r.truncated for r in results):
            raise RuntimeError(f"{w.name}: the server scored other token ids than the HF variants "
                               f"(num_tokens {got[:4]}... vs {want[:4]}...)")
        out[idx] = [r.reward for r in results]
    return out


# --------------------------------------------------------------------------- #
# timing and the ceiling
# --------------------------------------------------------------------------- #

def warmup_slice(w: Workload) -> Workload:
    """The first group (GRPO) or 16 sequences (PPO): enough to initialise kernels, a fraction of the cost."""
    if w.groups:
        g = w.groups[0]
        return dataclasses.replace(w, seqs=w.seqs[: len(g.members)], groups=[g])
    return dataclasses.replace(w, seqs=w.seqs[:16])


def matmul_rate(dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n^3 torch.mm in `dtype`: the ceiling's rate, measured in this run."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# --------------------------------------------------------------------------- #
# running the variants
# --------------------------------------------------------------------------- #

class Bench:
    """Collects the selected variants, then times them in interleaved rounds.

    This machine's speed drifts by up to 2x within minutes (neighbours on the
    host), so variants timed one after the other are not comparable: every
    round runs every (workload, variant) once, in the same order, and a row keeps
    its best round. Each variant first runs a warm-up slice (kernel JIT, caches).
    """

    def __init__(self, workloads: list[Workload], variants: set[str], repeat: int):
        self.workloads, self.variants, self.repeat = workloads, variants, repeat
        self.rows: dict[tuple[str, str], Row] = {}
        self._todo: list[tuple[Workload, str, str, str, Callable[[Workload], np.ndarray]]] = []

    def run(self, key: str, label: str | Callable[[Workload], str], dtype: str,
            fn: Callable[[Workload], np.ndarray]) -> None:
        """Register a variant (timed later, by measure())."""
        if key not in self.variants:
            return
        for w in self.workloads:
            self._todo.append((w, key, label(w) if callable(label) else label, dtype, fn))

    def measure(self) -> None:
        for w, _, _, _, fn in self._todo:
            fn(warmup_slice(w))
        best: dict[tuple[str, str], tuple[float, np.ndarray]] = {}
        for r in range(self.repeat):
            for w, key, _, _, fn in self._todo:
                t0 = time.perf_counter()
                scores = fn(w)
                seconds = time.perf_counter() - t0
                if (w.name, key) not in best or seconds < best[(w.name, key)][0]:
                    best[(w.name, key)] = (seconds, scores)
                print(f"  round {r + 1}/{self.repeat} {w.name} {key}: {seconds:.2f} s", file=sys.stderr, flush=True)
        for w, key, name, dtype, _ in self._todo:
            seconds, scores = best[(w.name, key)]
            self.rows[(w.name, key)] = Row(w.name, key, name, dtype, seconds, scores)

    def wants(self, *keys: str) -> bool:
        return any(k in self.variants for k in keys)


def hf_label(w: Workload) -> str:
    return "hf prompt once + KV cache" if w.groups else f"hf sorted, budget {TOKEN_BUDGET}"


def run_hf(bench: Bench, rm) -> None:
    from rmserve.service.engine.padding import pad_token_id

    member = rm.members[0]
    model, pad = member.backbone.model, pad_token_id(member.backbone.tokenizer)
    heads = (member.weight, member.bias)
    bench.run(BASELINE, f"hf padded x{ARRIVAL_BATCH}, arrival order (baseline)", "fp32",
              lambda w: hf_batches(model, heads, w.seqs, arrival_batches(len(w.seqs)), pad))
    bench.run("hf-best-fp32", hf_label, "fp32", lambda w: hf_best(model, heads, w, pad))
    if bench.wants("hf-best-bf16"):
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        bench.run("hf-best-bf16", hf_label, "bf16", lambda w: hf_best(bf16, heads, w, pad))


def run_engines(bench: Bench, model_dir: Path) -> None:
    from rmserve.service.engine.model import load_model
    from rmserve.service.engine.scoring import ScoringEngine

    models = {"fp32": lambda: load_model(model_dir, dtype="float32"), "bf16": lambda: load_model(model_dir, dtype="bfloat16")}
    layouts = (("auto", "", "rmserve engine in process"), ("on", "packed-", "rmserve engine in process, packed"),
               ("off", "padded-", "rmserve engine in process, padded"))
    for short, model in models.items():
        wanted = [(p, f"engine-{infix}{short}", label) for p, infix, label in layouts
                  if bench.wants(f"engine-{infix}{short}")]
        if wanted:
            m = model()
            for packing, key, label in wanted:
                engine = ScoringEngine(m, token_budget=TOKEN_BUDGET, packing=packing)
                bench.run(key, label, short, lambda w, e=engine: engine_scores(e, w))


def run_grpc(bench: Bench, model_dir: Path, registry: Path, servers: contextlib.ExitStack) -> None:
    """Start a server per dtype (stopped when `servers` closes, after the rounds) and register it."""
    from rmserve.client import RewardClient
    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        key = f"grpc-{short}"
        if not bench.wants(key):
            continue
        config = ServerConfig(model=str(model_dir), port=0, metrics_port=None, dtype=dtype, registry=str(registry))
        server = BackgroundServer(config).start()
        servers.callback(server.stop)
        client = servers.enter_context(RewardClient(server.address, timeout=3600))
        bench.run(key, lambda w: "rmserve gRPC " + ("score_groups" if w.groups else "score"), short,
                  lambda w, c=client: grpc_scores(c, w))


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides the matmul kernels


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of CPU_FLAGS the CPU reports (/proc/cpuinfo's first "flags" line; Linux only: elsewhere
    every flag reads False and the report says so)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return {f: f in have for f in CPU_FLAGS}


def cpu_lines() -> list[str]:
    """The header's CPU lines: model, the flags that matter, whether bf16 is native (what
    --dtype auto serves on, service/engine/model.py's native_bf16_cpu)."""
    from rmserve.service.engine.model import native_bf16_cpu

    flags = cpu_flags()
    shown = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()) if any(flags.values()) \
        else "unknown (no /proc/cpuinfo flags)"
    return [
        f"- CPU: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads",
        f"- CPU flags: {shown}; native bf16 matmuls (AVX512-BF16 or AMX): {'yes' if native_bf16_cpu() else 'no'}",
        f"- instruction sets in use: {isa_caps()}",
    ]


ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "RMSERVE_KERNEL_MARCH")


def isa_caps() -> str:
    """torch's elementwise kernels' level, whether rmserve's attention kernel is built, and any cap
    an operator set: with the first three capped at AVX2 (and the kernel built for x86-64-v3) this
    CPU runs the kernels a CPU without AVX-512 runs (and bf16 matmuls are emulated), which is how
    the no-AVX-512 table was measured on a machine that has it."""
    from rmserve.kernels import cpu_attention

    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k)]
    why = cpu_attention.unavailable_reason()
    kernel = "fixed-order attention kernel built" if why is None else f"no attention kernel ({why.splitlines()[0]})"
    return (f"ATen kernels {torch.backends.cpu.get_cpu_capability()}; {kernel}; "
            + (", ".join(caps) or "no caps set"))


def per_s(w: Workload, rate: float) -> str:
    return f"{rate:,.1f} {w.unit}/s" if w.groups else f"{rate:,.0f} {w.unit}/s"


def table(bench: Bench, rates: dict[str, float]) -> list[str]:
    lines = ["| workload | variant | key | dtype | seconds | throughput | x baseline | max abs score diff / baseline std | of ceiling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in bench.workloads:
        base = bench.rows[(w.name, BASELINE)]
        std = max(float(base.scores.std()), 1e-12)
        for key in VARIANTS:
            r = bench.rows.get((w.name, key))
            if r is None:
                continue
            rel = float(np.abs(r.scores - base.scores).max()) / std
            mfu = w.flops / r.seconds / rates[r.dtype]
            lines.append(f"| {w.name} | {r.label} | {key} | {r.dtype} | {r.seconds:.3f} | {per_s(w, w.units / r.seconds)} | "
                         f"{base.seconds / r.seconds:.2f} | {rel:.2e} | {mfu:.1%} |")
    return lines


def ratio(bench: Bench, workload: str, num: str, den: str) -> float | None:
    """Throughput of `num` over `den` (= den's seconds over num's)."""
    a, b = bench.rows.get((workload, num)), bench.rows.get((workload, den))
    return None if a is None or b is None else b.seconds / a.seconds


def of_ceiling(bench: Bench, rates: dict[str, float], workload: str, key: str) -> float | None:
    """The share of the matmul-rate ceiling a variant reached (useful FLOPs per second / rate)."""
    w = next((w for w in bench.workloads if w.name == workload), None)
    r = bench.rows.get((workload, key))
    return None if r is None or w is None else w.flops / r.seconds / rates[r.dtype]


def of_ideal(bench: Bench, rates: dict[str, float], workload: str, key: str) -> float | None:
    """A variant's speed-up over the baseline as a share of the ideal's: the baseline's own
    efficiency on the FLOPs it computes (padding, every prompt again), applied to the useful
    FLOPs alone, at the variant's dtype's matmul rate. GRPO's "~4x" in fp32 is this ideal."""
    w = next((w for w in bench.workloads if w.name == workload), None)
    r, x = bench.rows.get((workload, key)), ratio(bench, workload, key, BASELINE)
    if r is None or x is None or w is None or not w.baseline_flops:
        return None
    return x / (w.baseline_flops / w.flops * rates[r.dtype] / rates["fp32"])


def target_lines(bench: Bench, rates: dict[str, float]) -> list[str]:
    """The CPU physical-limit issue's targets, both CPU kinds' (a CPU is judged by its own kind's)."""
    def line(what: str, value: float | None, goal: float) -> str:
        if value is None:
            return f"- n/a  {what} >= {goal:g} (not run)"
        return f"- {'PASS' if value >= goal else 'MISS'} {what} >= {goal:g}: {value:.2f}"

    grpo_ideal = {d: of_ideal(bench, rates, "grpo", f"grpc-{d}") for d in ("fp32", "bf16")}
    out = [
        "native-bf16 CPU:",
        line("PPO-like gRPC bf16 x baseline", ratio(bench, "ppo", "grpc-bf16", BASELINE), 6),
        line("PPO-like gRPC bf16 share of the bf16 ceiling", of_ceiling(bench, rates, "ppo", "grpc-bf16"), 0.5),
        line("GRPO-like score_groups bf16 x baseline", ratio(bench, "grpo", "grpc-bf16", BASELINE), 9),
        line("GRPO-like score_groups bf16 share of its ideal", grpo_ideal["bf16"], 0.9),
        "CPU without native bf16 (fp32 serving):",
        line("PPO-like gRPC fp32 / plain HF length-sorted fp32", ratio(bench, "ppo", "grpc-fp32", "hf-best-fp32"), 1.3),
        line("PPO-like gRPC fp32 share of the fp32 ceiling", of_ceiling(bench, rates, "ppo", "grpc-fp32"), 0.9),
        line("GRPO-like score_groups fp32 share of its ideal", grpo_ideal["fp32"], 0.9),
        "every CPU:",
    ]
    for w in bench.workloads:
        for short in ("fp32", "bf16"):
            out.append(line(f"{w.name} {short} gRPC / in-process engine", ratio(bench, w.name, f"grpc-{short}", f"engine-{short}"), 0.95))
    return out


def report(bench: Bench, rates: dict[str, float], args, argv: list[str], wall: float) -> str:
    lines = [
        f"# CPU scoring throughput ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- machine: {platform.platform()}; torch {torch.__version__}, python {platform.python_version()}",
        *cpu_lines(),
        f"- model: {'tiny random Llama (2 layers, hidden 64)' if args.tiny else 'SmolLM2-135M-Instruct backbone'}"
        f" + {NUM_HEADS} random heads; best of {args.repeat} interleaved round(s) (every variant once per round) "
        f"after a warm-up slice",
        f"- measured matmul rate in this run ({args.sizes.gemm}^3 torch.mm; bf16 {args.bf16_gemm}^3, "
        f"smaller where bf16 is emulated; best of 5 before and 5 after the rounds): fp32 {rates['fp32'] / 1e9:.1f} "
        f"GFLOP/s, bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s (bf16 / fp32 {rates['bf16'] / rates['fp32']:.2f}); "
        "the ceilings below are these rates over each workload's useful FLOPs",
        f"- command: `{shlex.join(['python', 'bench/bench_cpu.py', *argv])}`",
        "",
    ]
    for w in bench.workloads:
        ceiling = {d: rates[d] / w.flops * w.units for d in rates}  # the workload at the matmul rate
        lines.append(f"- {w.title}; {sum(map(len, w.seqs))} tokens sent, {w.useful_tokens} useful, "
                     f"{w.flops / 1e9:.3g} useful GFLOP; ceiling fp32 {per_s(w, ceiling['fp32'])}, "
                     f"bf16 {per_s(w, ceiling['bf16'])}")
    lines += ["", *table(bench, rates), "", "gRPC end to end / in-process engine throughput (same dtype):"]
    for w in bench.workloads:
        for short in ("fp32", "bf16"):
            r = ratio(bench, w.name, f"grpc-{short}", f"engine-{short}")
            if r is not None:
                lines.append(f"- {w.name} {short}: {r:.3f}")
    packed = [(w.name, short, r) for w in bench.workloads for short in ("fp32", "bf16")
              if (r := ratio(bench, w.name, f"engine-packed-{short}", f"engine-padded-{short}")) is not None]
    if packed:
        lines += ["", "Packed / padded engine throughput (same dtype):"]
        lines += [f"- {name} {short}: {r:.3f}" for name, short, r in packed]
    lines += ["", "Targets (information, not assertions):", *target_lines(bench, rates), "", f"total wall time {wall:.0f} s"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama, seconds (for tests)")
    ap.add_argument("--n", type=int, default=96, help="sequences in the PPO-like workload (--tiny: at most 24)")
    ap.add_argument("--groups", type=int, default=4, help="groups in the GRPO-like workload (--tiny: at most 2)")
    ap.add_argument("--repeat", type=int,
                    help="interleaved timed rounds, each running every variant once (best is kept); default 1, "
                         f"with --against {AGAINST_ROUNDS} (at least 3)")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                    help=f"variants to run ({BASELINE} always runs: everything is compared to it)")
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    ab = ap.add_argument_group("before/after (--against)")
    ab.add_argument("--against", metavar="REF",
                    help="instead of the variants: the gRPC workloads on a server from this checkout vs one from "
                         "git ref REF (e.g. 73db9bf), rounds interleaved (bench/before_after.py)")
    ab.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="both servers' --dtype (auto: bfloat16 where this CPU has native bf16, else float32; "
                         "resolved here, so both get the same)")
    ab.add_argument("--threads", type=int, help="OMP_NUM_THREADS and MKL_NUM_THREADS for both servers "
                    "(default: torch's default)")
    ab.add_argument("--cpus", help="pin both servers to these CPUs (e.g. 0-1 or 0,2); default: no pinning")
    ab.add_argument("--note", help="a line at the top of the report (e.g. 'smoke run on a shared machine')")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = AGAINST_ROUNDS if args.against else 1
    if args.against and args.repeat < 3:
        ap.error("--against needs --repeat >= 3 (at least three interleaved rounds)")
    if args.cpus and not args.against:
        ap.error("--cpus applies to --against")
    args.cpus = parse_cpus(args.cpus) if args.cpus else None
    args.sizes = TINY if args.tiny else Sizes()
    if args.tiny:
        args.n, args.groups = min(args.n, 24), min(args.groups, 2)
    return args


def parse_cpus(text: str) -> set[int]:
    """`0-1,4` -> {0, 1, 4} (the taskset list syntax)."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_and_report(argv, parse_args, run_all, "rmserve-bench-")


def run_against(args, argv: list[str], tmp: Path, t_start: float) -> str:
    """--against: the PPO and GRPO workloads through gRPC, this checkout's server vs the ref's."""
    import before_after  # bench/before_after.py

    from rmserve.service.engine.model import load_model, native_bf16_cpu

    model_dir = build_model_dir(tmp / "model", args.tiny)
    encoder = load_model(model_dir, dtype="float32", fused=False).encoder  # the model itself is not kept
    made = {
        "ppo": lambda: ppo_workload(args.n, args.sizes.min_len, args.sizes.max_len, len(encoder.tokenizer)),
        "grpo": lambda: grpo_workload(encoder, encoder.tokenizer, args.groups, args.sizes),
    }
    workloads = [made[name]() for name in WORKLOADS if name in args.workloads]
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if native_bf16_cpu() else "float32")
    return before_after.compare(
        against=args.against, model_dir=model_dir, workloads=workloads, score=grpc_scores,
        rate=lambda w, seconds: per_s(w, w.units / seconds), dtype=dtype, rounds=args.repeat,
        threads=args.threads, cpus=args.cpus, header=[f"- torch {torch.__version__} (client)", *cpu_lines()],
        command=argv, note=args.note, tmp=tmp, t_start=t_start,
        model_label=("tiny random Llama (2 layers, hidden 64)" if args.tiny else "SmolLM2-135M-Instruct backbone")
        + f" + {NUM_HEADS} random heads",
    )


def run_all(args, argv: list[str], tmp: Path, t_start: float) -> str:
    """Build the model and workloads, run every selected variant, return the report."""
    if args.against:
        return run_against(args, argv, tmp, t_start)
    from rmserve.service.engine.model import load_model, native_bf16_cpu

    model_dir = build_model_dir(tmp / "model", args.tiny)
    rm = load_model(model_dir, dtype="float32", fused=False)  # the plain HF modules the baselines run
    bb = rm.members[0].backbone
    made = {
        "ppo": lambda: ppo_workload(args.n, args.sizes.min_len, args.sizes.max_len, len(bb.tokenizer)),
        "grpo": lambda: grpo_workload(rm.encoder, bb.tokenizer, args.groups, args.sizes),
    }
    workloads = [made[name]() for name in WORKLOADS if name in args.workloads]
    for w in workloads:
        w.flops = decoder_flops(bb.model, w.useful_tokens, w.attn_pairs)
        w.baseline_flops = baseline_flops(bb.model, w)
    # emulated bf16 runs at ~1 GFLOP/s: a quarter-size GEMM measures that rate in seconds, not minutes
    args.bf16_gemm = args.sizes.gemm if native_bf16_cpu() else max(64, args.sizes.gemm // 4)

    def rates_now() -> dict[str, float]:
        return {"fp32": matmul_rate(torch.float32, args.sizes.gemm), "bf16": matmul_rate(torch.bfloat16, args.bf16_gemm)}

    rates = rates_now()
    bench = Bench(workloads, {BASELINE, *args.variants}, args.repeat)
    run_hf(bench, rm)
    run_engines(bench, model_dir)
    with contextlib.ExitStack() as servers:
        run_grpc(bench, model_dir, tmp / "registry", servers)
        bench.measure()
    # again after the rounds, keeping the faster: a neighbour that slowed the machine during one
    # measurement would otherwise lower the ceiling and inflate every "of ceiling" (seen: > 100%)
    after = rates_now()
    rates = {d: max(rates[d], after[d]) for d in rates}
    return report(bench, rates, args, argv, time.perf_counter() - t_start)


if __name__ == "__main__":
    sys.exit(main())
