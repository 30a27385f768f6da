"""CPU scoring throughput: Hugging Face baselines vs rmserve, side by side in one process.

Run (2-core CPU, ~5 minutes):

    .venv/bin/python bench/bench_cpu.py --out bench/results/cpu-$(date +%F).md

Variants, all on the same token ids with the embedded default's backbone
(SmolLM2-135M-Instruct) and random heads (heads do not change the cost):
  hf-padded   HF forward, fixed padded batches of 32 in arrival order
              (how OpenRLHF's serve_rm batches): the baseline
  hf-sorted   HF forward, length-sorted batches under a 4096-token budget
  engine      rmserve's engine in process
  grpc        rmserve end to end: SDK -> gRPC on localhost -> scheduler -> engine

Prints tokens/s, each variant's ratio to the baseline, gRPC as a fraction of
the in-process engine, and the largest score difference to the baseline.
`--tiny` runs a random tiny Llama in seconds (used by the test suite so the
script cannot rot).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def build_model_dir(root: Path, tiny: bool, num_heads: int = 5) -> Path:
    """An ensemble dir: the builtin backbone (or a tiny random one) + random heads."""
    from rmserve.service.ensemble import (
        EnsembleManifest,
        MemberSpec,
        MemberTensors,
        save_member,
        write_manifest,
    )

    if tiny:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 1000)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(root / "backbone")
        cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        torch.manual_seed(0)
        LlamaModel(cfg).save_pretrained(root / "backbone")
        backbone, hidden = "backbone", 64
    else:
        backbone, hidden = "builtin:smollm2-135m-instruct", 576
    g = torch.Generator().manual_seed(1)
    spec = MemberSpec(name="member0", backbone=backbone)
    save_member(root, spec, MemberTensors(weight=torch.randn(num_heads, hidden, generator=g) / hidden**0.5,
                                          bias=torch.zeros(num_heads)))
    write_manifest(root, EnsembleManifest(name="bench", version="bench", kind="heads", members=[spec], max_tokens=1024))
    return root


def hf_scores(model, head_w: torch.Tensor, head_b: torch.Tensor, seqs: list[list[int]], batches: list[list[int]], pad: int) -> np.ndarray:
    """Plain HF: right-padded batches, last token found from the attention mask."""
    out = np.empty(len(seqs), dtype=np.float64)
    with torch.inference_mode():
        for idx in batches:
            b = [seqs[i] for i in idx]
            t = max(map(len, b))
            ids = torch.full((len(b), t), pad)
            mask = torch.zeros((len(b), t), dtype=torch.long)
            for j, s in enumerate(b):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = h[torch.arange(len(b)), mask.sum(1) - 1]
            out[idx] = ((last @ head_w.T + head_b).mean(1)).double().numpy()
    return out


def timed(fn, repeat: int):
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, seconds (for tests)")
    ap.add_argument("--n", type=int, default=96, help="sequences in the PPO-like workload")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per variant (best is kept)")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    if args.tiny:
        args.n, args.max_len = min(args.n, 24), min(args.max_len, 64)
        args.min_len = min(args.min_len, 8)

    from rmserve.client import RewardClient
    from rmserve.service.background import BackgroundServer
    from rmserve.service.config import ServerConfig
    from rmserve.service.engine import ScoringEngine, plan_batches
    from rmserve.service.model import load_model

    tmp = Path(tempfile.mkdtemp(prefix="rmserve-bench-"))
    model_dir = build_model_dir(tmp / "model", args.tiny)
    rm = load_model(model_dir, dtype="float32")
    member = rm.members[0]
    rng = random.Random(0)
    vocab = len(member.backbone.tokenizer)
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))] for _ in range(args.n)]
    tokens = sum(map(len, seqs))
    pad = member.backbone.tokenizer.pad_token_id or 0
    model = member.backbone.model
    rows: list[tuple[str, float, np.ndarray]] = []

    arrival = [list(range(i, min(i + 32, len(seqs)))) for i in range(0, len(seqs), 32)]
    t, base = timed(lambda: hf_scores(model, member.weight, member.bias, seqs, arrival, pad), args.repeat)
    rows.append(("hf-padded (baseline)", t, base))
    sorted_batches = plan_batches([len(s) for s in seqs], 4096, 256)
    t, s = timed(lambda: hf_scores(model, member.weight, member.bias, seqs, sorted_batches, pad), args.repeat)
    rows.append(("hf-sorted", t, s))
    engine = ScoringEngine(rm, token_budget=4096)
    t, s = timed(lambda: engine.score(seqs).mean.astype(np.float64), args.repeat)
    rows.append(("rmserve engine (in process)", t, s))
    engine_t = t

    server = BackgroundServer(ServerConfig(model=str(model_dir), port=0, metrics_port=None, dtype="float32")).start()
    try:
        with RewardClient(server.address, timeout=3600) as client:
            samples = [{"token_ids": s} for s in seqs]
            t, res = timed(lambda: np.array([r.reward for r in client.score(samples)], dtype=np.float64), args.repeat)
        rows.append(("rmserve gRPC (end to end)", t, res))
    finally:
        server.stop()

    base_t = rows[0][1]
    lines = [
        f"# CPU scoring throughput ({date.today()})",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model: {'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct backbone'} fp32",
        f"- workload: {args.n} sequences, lengths U[{args.min_len}, {args.max_len}], {tokens} tokens; best of {args.repeat}",
        f"- command: `python bench/bench_cpu.py{' --tiny' if args.tiny else ''} --n {args.n} --repeat {args.repeat}`",
        "",
        "| variant | seconds | tok/s | x baseline | max abs score diff vs baseline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, t, s in rows:
        lines.append(f"| {name} | {t:.2f} | {tokens / t:.0f} | {base_t / t:.2f} | {np.abs(s - base).max():.2e} |")
    grpc_t = rows[-1][1]
    lines += ["", f"gRPC end to end / in-process engine throughput: {engine_t / grpc_t:.3f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
