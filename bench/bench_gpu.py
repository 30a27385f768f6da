"""GPU scoring throughput: Hugging Face baselines vs rmserve's engine, side by side in one process.

Run on one H100 (one device call, well under 10 minutes; nothing is downloaded,
the models are random-weight Llama-architecture configs built in place):

    python bench/bench_gpu.py --out bench/results/gpu-h100-$(date +%F).md

Models (bf16): 1B = hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192,
vocab 128256; 8B = hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336.
Workloads: PPO-like, 512 (1B) / 256 (8B) sequences with lengths U[128, 2048];
GRPO-like, `--groups` groups of one 1024-token prompt and 16 completions of 256
tokens. Variants, all on the same token ids and the same weights:

  hf-padded   bare HF model + linear heads at the last token (what
              AutoModelForSequenceClassification computes), sdpa, fixed padded
              batches of 32 in arrival order (OpenRLHF serve_rm): the baseline
  hf-sorted   the same, length-sorted batches under a padded-token budget
              (the best plain-HF variant)
  rmserve     ScoringEngine: packed padding-free batches (varlen attention),
              the last-token kernel, GRPO prompts encoded once (prefix sharing),
              token budget sized from measured memory

Prints tokens/s, completions/s, MFU (useful FLOPs over the bf16 matmul rate
measured in the same run by timing a large matmul), the ratio to the baseline,
and the largest score difference to the baseline (relative to the baseline's
score std; bf16 makes scores depend on batching, so the check's tolerance is
`--tol` x std, 0.2 in bf16). Exits 1 if a variant's scores leave the tolerance.
Useful FLOPs (bench/common.py, the same count as bench_cpu.py's "of ceiling"):
2 x (linear-layer weights) per token computed by an ideal engine, plus causal
attention 4 x d_attn x layers per (query, key) pair, n(n + 1)/2 pairs for n
tokens; for a GRPO group the prompt counts once (so the baseline's MFU there is
low by design).

`--tiny` runs a tiny random Llama in fp32 on CPU in seconds (the packed path
with the CPU varlen fallback); tests/test_bench_gpu.py runs it so the script
cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import causal_pairs, decoder_flops  # bench/common.py: both benchmarks' FLOPs

SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}
NUM_HEADS = 4  # reward heads (an ensemble of heads); they do not change the cost


@dataclass
class Workload:
    name: str
    seqs: list[list[int]]
    useful_flops: float      # what an ideal engine must compute (see the module docstring)
    completions: int


@dataclass
class Row:
    model: str
    workload: str
    variant: str
    seconds: float
    tokens: int              # tokens in the workload as sent (every completion with its prompt)
    completions: int
    useful_flops: float
    scores: np.ndarray


# --------------------------------------------------------------------------- #
# models and workloads
# --------------------------------------------------------------------------- #

def build_model(size: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight bare LlamaModel, built on the device (no host copy of 16 GB)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, pad_token_id=0,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def ppo_workload(model, n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    seqs = [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    tokens = sum(map(len, seqs))
    return Workload("ppo", seqs, decoder_flops(model, tokens, sum(causal_pairs(len(s)) for s in seqs)), n)


def grpo_workload(model, groups: int, prompt: int, completions: int, completion: int, vocab: int,
                  seed: int = 1) -> Workload:
    rng = random.Random(seed)
    seqs = []
    for _ in range(groups):
        p = [rng.randrange(1, vocab) for _ in range(prompt)]
        seqs += [p + [rng.randrange(1, vocab) for _ in range(completion)] for _ in range(completions)]
    # arrival order: a trainer sends a group's completions together
    tokens = groups * (prompt + completions * completion)
    pairs = groups * (causal_pairs(prompt) + completions * causal_pairs(completion, prompt))
    return Workload("grpo", seqs, decoder_flops(model, tokens, pairs), groups * completions)


# --------------------------------------------------------------------------- #
# variants
# --------------------------------------------------------------------------- #

def hf_scores(model, weight: torch.Tensor, bias: torch.Tensor, seqs: list[list[int]],
              batches: list[list[int]]) -> np.ndarray:
    """Plain HF: right-padded batches, heads at the last real token (found from lengths)."""
    dev = weight.device
    out = torch.empty(len(seqs), device=dev)
    with torch.inference_mode():
        for idx in batches:
            b = [seqs[i] for i in idx]
            lengths = torch.tensor([len(s) for s in b])
            t = int(lengths.max())
            ids = torch.zeros((len(b), t), dtype=torch.long)
            for j, s in enumerate(b):
                ids[j, : len(s)] = torch.tensor(s)
            mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
            h = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            last = h[torch.arange(len(b), device=dev), lengths.to(dev) - 1].float()
            out[idx] = (last @ weight.T + bias).mean(1)
    return out.double().cpu().numpy()


def reward_model(model, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype):
    """The bare model + heads as an rmserve RewardModel (tokenizer-free: the pad id is all it reads)."""
    from rmserve.service.engine.backbone import wrap_backbone
    from rmserve.service.engine.model import Member, RewardModel

    bb = wrap_backbone(model, SimpleNamespace(pad_token_id=0), "bench-llama")
    k = weight.shape[0]
    return RewardModel(name="bench", version="bench", kind="heads", members=[Member("member0", bb, weight, bias, None)],
                       encoder=None, dtype=dtype, max_tokens=4096, uncertainty_penalty=0.0,
                       shift=[0.0] * k, scale=[1.0] * k, source="bench")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], np.ndarray], repeat: int, device: torch.device) -> tuple[float, np.ndarray]:
    """Best of `repeat` after one warm-up run."""
    result = fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, result


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of a large square matmul in `dtype`: the MFU ceiling, measured in this run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #

def run_model(size: str, args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    from rmserve.service.engine.contract import plan_batches
    from rmserve.service.engine.scoring import ScoringEngine

    tiny = size == "tiny"
    model = build_model(size, device, dtype)
    vocab = SIZES[size]["vocab_size"]
    g = torch.Generator().manual_seed(2)
    h = SIZES[size]["hidden_size"]
    weight = (torch.randn(NUM_HEADS, h, generator=g) / h**0.5).to(device)
    bias = torch.zeros(NUM_HEADS, device=device)
    n_seqs = args.tiny_n if tiny else (args.n_1b if size == "1b" else args.n_8b)
    lo, hi = (8, 64) if tiny else (args.min_len, args.max_len)
    workloads = [
        ppo_workload(model, n_seqs, lo, hi, vocab),
        grpo_workload(model, 2 if tiny else args.groups, 32 if tiny else args.prompt, 4 if tiny else args.completions,
                      8 if tiny else args.completion, vocab),
    ]
    rows: list[Row] = []
    for w in workloads:
        tokens = sum(map(len, w.seqs))
        arrival = [list(range(i, min(i + 32, len(w.seqs)))) for i in range(0, len(w.seqs), 32)]
        variants: list[tuple[str, Callable[[], np.ndarray]]] = [
            ("hf-padded (baseline)", lambda w=w, b=arrival: hf_scores(model, weight, bias, w.seqs, b)),
        ]
        sorted_batches = plan_batches([len(s) for s in w.seqs], args.hf_budget, 256)
        variants.append((f"hf-sorted (budget {args.hf_budget})",
                         lambda w=w, b=sorted_batches: hf_scores(model, weight, bias, w.seqs, b)))
        for name, fn in variants:
            t, s = timed(fn, args.repeat, device)
            rows.append(Row(size, w.name, name, t, tokens, w.completions, w.useful_flops, s))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # packing "on" so that --tiny exercises the packed path on CPU too ("auto" packs on CUDA anyway)
        engine = ScoringEngine(reward_model(model, weight, bias, dtype), token_budget=args.hf_budget,
                               max_batch=args.max_batch, packing="on", memory_fraction=args.memory_fraction)
        t, s = timed(lambda w=w, e=engine: e.score(w.seqs).mean.astype(np.float64), args.repeat, device)
        rows.append(Row(size, w.name, f"rmserve (budget {engine.token_budget})", t, tokens, w.completions,
                        w.useful_flops, s))
    return rows


def table(rows: list[Row], rate: float, tol: float, header: list[str]) -> tuple[str, bool]:
    lines = [*header, "",
             "| model | workload | variant | seconds | tok/s | completions/s | MFU | x baseline | max abs score diff | / score std |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ok = True
    base: dict[tuple[str, str], Row] = {}
    for r in rows:
        b = base.setdefault((r.model, r.workload), r)
        diff = float(np.abs(r.scores - b.scores).max())
        rel = diff / max(float(b.scores.std()), 1e-12)
        ok &= rel <= tol
        lines.append(
            f"| {r.model} | {r.workload} | {r.variant} | {r.seconds:.3f} | {r.tokens / r.seconds:,.0f} | "
            f"{r.completions / r.seconds:,.1f} | {r.useful_flops / r.seconds / rate:.1%} | {b.seconds / r.seconds:.2f} | "
            f"{diff:.2e} | {rel:.3f}{'' if rel <= tol else ' FAIL'} |"
        )
    return "\n".join(lines), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama, fp32 on CPU, seconds (for tests)")
    ap.add_argument("--models", default="1b,8b", help="comma-separated: 1b, 8b")
    ap.add_argument("--n-1b", type=int, default=512)
    ap.add_argument("--n-8b", type=int, default=256)
    ap.add_argument("--tiny-n", type=int, default=24)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--groups", type=int, default=8, help="GRPO groups")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--completions", type=int, default=16)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--hf-budget", type=int, default=32768, help="padded tokens per hf-sorted batch (and rmserve's CPU budget)")
    ap.add_argument("--max-batch", type=int, default=1024, help="rmserve: sequences per forward at most")
    ap.add_argument("--memory-fraction", type=float, default=0.8, help="rmserve: share of free GPU memory for the budget")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per variant after a warm-up (best is kept)")
    ap.add_argument("--tol", type=float, default=None, help="max score diff / baseline score std (default 0.2 bf16, 1e-3 fp32)")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()

    if args.tiny:
        device, dtype, sizes = torch.device("cpu"), torch.float32, ["tiny"]
        args.hf_budget = min(args.hf_budget, 256)
        args.repeat = min(args.repeat, 1)
    else:
        if not torch.cuda.is_available():
            print("bench_gpu.py needs a CUDA device (or --tiny for the CPU smoke run)", file=sys.stderr)
            return 2
        device, dtype, sizes = torch.device("cuda"), torch.bfloat16, args.models.split(",")
    tol = args.tol if args.tol is not None else (1e-3 if dtype == torch.float32 else 0.2)

    t_start = time.perf_counter()
    rate = matmul_rate(device, dtype, 256 if args.tiny else 8192)
    rows: list[Row] = []
    for size in sizes:
        rows += run_model(size, args, device, dtype)
        gc.collect()  # the model dies with run_model's frame; give its memory back before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    header = [
        f"# GPU scoring throughput ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- device: {where}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}",
        f"- measured {str(dtype).removeprefix('torch.')} matmul rate (the MFU ceiling): {rate / 1e12:.3g} TFLOP/s",
        f"- PPO: lengths U[{8 if args.tiny else args.min_len}, {64 if args.tiny else args.max_len}]; "
        f"GRPO: prompt {32 if args.tiny else args.prompt} + {4 if args.tiny else args.completions} completions x "
        f"{8 if args.tiny else args.completion}; best of {args.repeat} after a warm-up; tolerance {tol} x score std",
        f"- command: `python bench/bench_gpu.py {' '.join(sys.argv[1:])}`",
    ]
    text, ok = table(rows, rate, tol, header)
    text += f"\n\ntotal wall time {time.perf_counter() - t_start:.0f} s"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
