"""Study: how much does a sample's score depend on its batch, per precision recipe, and at what speed?

Recipes on the default backbone (SmolLM2-135M), a random unit-norm head:
  fp32       everything float32
  bf16       every weight and activation bfloat16 (what `.to(bfloat16)` gives)
  autocast   torch.autocast(cpu, bfloat16) over fp32 weights
  mixed      linear weights stored bf16, matmuls bf16 (fp32 accumulate), residual/norms/attention fp32
  mixed_inv  mixed + the batch-invariant blocked attention
  bf16_inv   bf16 + the batch-invariant blocked attention
Batchings: each sequence alone, length-sorted padded batches, arrival-order padded batches of 32.
Prints, per recipe, max |score difference| between batchings / score std, and tokens/s of the sorted path.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch

from rmserve.service.engine import invariant_attention
from rmserve.service.engine.backbone import load_backbone
from rmserve.service.engine.contract import plan_batches
from rmserve.service.engine.padding import right_pad
from rmserve.service.engine.precision import mixed_bf16


def last_hidden(model, seqs, batches, pad, ctx):
    out = torch.empty(len(seqs), model.config.hidden_size)
    with torch.inference_mode(), ctx():
        for idx in batches:
            ids, mask, lengths = right_pad([seqs[i] for i in idx], pad)
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[idx] = h[torch.arange(len(idx)), lengths - 1].float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--recipes", nargs="+", default=["fp32", "bf16", "autocast", "mixed", "mixed_inv"])
    ap.add_argument("--speed-only", action="store_true", help="time the sorted batches only (no invariance check)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 49000) for _ in range(rng.randint(32, 512))] for _ in range(a.n)]
    w = torch.randn(576, generator=torch.Generator().manual_seed(0))
    batchings = {
        "alone": [[i] for i in range(len(seqs))],
        "sorted": plan_batches([len(s) for s in seqs], 4096, 256),
        "arrival32": [list(range(i, min(i + 32, len(seqs)))) for i in range(0, len(seqs), 32)],
    }
    if a.speed_only:
        batchings = {"sorted": batchings["sorted"]}
    tokens = sum(len(s) for s in seqs)
    ref = None
    for recipe in a.recipes:
        bb = load_backbone("builtin:smollm2-135m-instruct",
                           dtype=torch.bfloat16 if recipe.startswith("bf16") else torch.float32)
        if recipe in ("mixed", "mixed_inv"):
            mixed_bf16(bb.model)
        if recipe.endswith("_inv"):
            invariant_attention.enable(bb.model)
        ctx = (lambda: torch.autocast("cpu", torch.bfloat16)) if recipe == "autocast" else contextlib.nullcontext
        scores, secs = {}, {}
        for name, batches in batchings.items():
            t0 = time.perf_counter()
            scores[name] = last_hidden(bb.model, seqs, batches, 0, ctx) @ w
            secs[name] = time.perf_counter() - t0
        std = float(scores["sorted"].std())
        if a.speed_only:
            print(f"{recipe:9s} sorted {tokens / secs['sorted']:.0f} tok/s", flush=True)
            continue
        diff = max(float((scores[x] - scores[y]).abs().max()) for x in scores for y in scores)
        vs_fp32 = "" if ref is None else f", max diff vs fp32 {float((scores['sorted'] - ref).abs().max()) / std:.4f} x std"
        if ref is None:
            ref = scores["sorted"]
        print(f"{recipe:9s} max diff across batchings {diff:.3e} = {diff / std:.4f} x std (std {std:.3f}){vs_fp32}; "
              f"sorted {tokens / secs['sorted']:.0f} tok/s, arrival32 {tokens / secs['arrival32']:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
