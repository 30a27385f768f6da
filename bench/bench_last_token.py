"""Benchmark the fused last-token kernel against the torch reference and the naive HF path.

On a GPU, from the repository root (takes a few minutes, needs ~40 GiB of GPU memory):

    python bench/bench_last_token.py --out bench/results/last_token_$(date +%F)_h100.md

On CPU, tiny shapes through the Triton interpreter with a perf_counter timer (a
smoke test: CI runs it; its timings mean nothing):

    python bench/bench_last_token.py --tiny

Compared, on the same bf16 hidden states [B, T, H] with random lengths:
- kernel: `last_token_scores_triton` with preallocated outputs (the launch alone,
  no validation sync);
- reference: `last_token_scores_reference` (gather, matmul, statistics in torch);
- naive HF: what `*ForSequenceClassification` does, the score head over every
  position (`hidden @ W.T`, bf16), then the gather at the last index, then the
  same statistics (mean, var, min; `conservative` is the server's, per request).
The kernel reads B*H*itemsize bytes of hidden state plus the fp32 heads and
writes the outputs; its achieved bandwidth is reported as a fraction of the
device-to-device copy bandwidth measured in the same run (2 x bytes / time of a
1 GiB copy). The epistemic variant (e @ L, 2*B*H^2 FLOPs) is reported
separately as a FLOP rate, for L in fp32 (tf32x3) and in bf16 (native MMA).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

GIB = 2**30


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: triton's do_bench (median) on CUDA, a perf_counter median on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    def timer(fn: Callable[[], object], reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return timer


def copy_bandwidth(device: torch.device, nbytes: int, timer) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src))


def naive_hf(hidden, weight_bf16, bias, lengths):
    """The score head over all positions, then the gather (HF sequence classification)."""
    logits = hidden @ weight_bf16.T                                   # [B, T, K]
    rewards = logits[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].float() + bias
    return rewards, rewards.mean(dim=1), rewards.var(dim=1, unbiased=False), rewards.min(dim=1).values


def num(x: float) -> str:
    """Three significant digits, without exponents for large values."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def run(tiny: bool, tokens: int, max_gib: float) -> str:
    from rmserve.kernels.last_token import (
        LastTokenScores,
        last_token_scores_reference,
        last_token_scores_triton,
    )

    device = torch.device("cpu" if tiny else "cuda")
    timer = make_timer(device)
    batches, sizes, heads = ([2, 17], [37, 64], [1, 8]) if tiny else ([64, 1024, 8192], [576, 2048, 4096, 8192], [1, 8])
    bw = copy_bandwidth(device, (64 << 20) if tiny else GIB, timer)
    name = "CPU (Triton interpreter)" if tiny else torch.cuda.get_device_name(device)
    g = torch.Generator(device=device).manual_seed(0)
    main_rows, epi_rows, notes = [], [], []

    for b in batches:
        for h in sizes:
            full_bytes = b * tokens * h * 2
            t = tokens if full_bytes <= max_gib * GIB else max(1, int(max_gib * GIB) // (b * h * 2))
            if t < tokens:
                notes.append(f"B={b}, H={h}: [B, {tokens}, H] bf16 would be {full_bytes / GIB:.0f} GiB > "
                             f"{max_gib:g} GiB: naive path skipped, kernel and reference timed with T={t}.")
            hidden = torch.randn(b, t, h, device=device, dtype=torch.bfloat16, generator=g)
            lengths = torch.randint(1, t + 1, (b,), device=device, generator=g)
            for k in heads:
                weight = torch.randn(k, h, device=device, generator=g) / h**0.5
                bias = torch.randn(k, device=device, generator=g)
                out = LastTokenScores(torch.empty(b, k, device=device),
                                      *(torch.empty(b, device=device) for _ in range(3)), None)
                t_kernel = timer(functools.partial(last_token_scores_triton, hidden, weight, bias,
                                                   lengths=lengths, out=out))
                t_ref = timer(functools.partial(last_token_scores_reference, hidden, weight, bias,
                                                lengths=lengths))
                moved = b * h * 2 + k * h * 4 + k * 4 + b * 8 + b * (k + 3) * 4
                row = [str(b), str(h), str(k), str(t), num(t_kernel * 1e6), num(moved / t_kernel / 1e9),
                       f"{moved / t_kernel / bw:.0%}", num(t_ref * 1e6), num(t_ref / t_kernel)]
                if t == tokens:
                    t_naive = timer(functools.partial(naive_hf, hidden, weight.bfloat16(), bias, lengths))
                    row += [num(t_naive * 1e6), num(t_naive / t_kernel)]
                else:
                    row += ["skipped", "—"]
                main_rows.append(row)
            for unc_dtype in (torch.float32, torch.bfloat16):   # with the last (largest) K's heads
                unc = (torch.randn(h, h, device=device, generator=g) / h**0.5).to(unc_dtype)
                kwargs = dict(lengths=lengths, unc_factor=unc)
                t_kernel = timer(functools.partial(last_token_scores_triton, hidden, weight, bias, **kwargs))
                t_ref = timer(functools.partial(last_token_scores_reference, hidden, weight, bias, **kwargs))
                epi_rows.append([str(b), str(h), str(unc_dtype).removeprefix("torch."), num(t_kernel * 1e6),
                                 num(2 * b * h * h / t_kernel / 1e12), num(t_ref * 1e6), num(t_ref / t_kernel)])
            del hidden
            if device.type == "cuda":
                torch.cuda.empty_cache()

    when = time.strftime("%Y-%m-%d")
    parts = [
        f"# last_token_scores on {name}, {when}",
        f"torch {torch.__version__}; device-to-device copy bandwidth {bw / 1e9:.0f} GB/s; bf16 hidden, "
        f"fp32 heads; naive HF = score head over all T positions, then gather.",
        "## Heads and statistics",
        table(["B", "H", "K", "T", "kernel µs", "kernel GB/s", "of copy BW", "reference µs", "× vs reference",
               "naive HF µs", "× vs naive"], main_rows),
        f"## With the epistemic term (K = {heads[-1]})",
        table(["B", "H", "L dtype", "kernel µs", "TFLOP/s (2·B·H²)", "reference µs", "× vs reference"], epi_rows),
    ]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--tokens", type=int, default=512, help="padded length T of the naive path (default 512)")
    parser.add_argument("--max-gib", type=float, default=20.0, help="largest [B, T, H] tensor to allocate")
    args = parser.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens = min(args.tokens, 8)
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    report = run(args.tiny, args.tokens, args.max_gib)
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
