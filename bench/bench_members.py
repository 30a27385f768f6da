"""What uncertainty costs to serve: the embedded default against a members ensemble and the OOD score.

Run (2-core CPU, a few minutes):

    .venv/bin/python bench/bench_members.py --out bench/results/members-$(date +%F).md

Same process, same PPO-like workload (bench_cpu.py's: random token ids, lengths
U[32, 512]), the engine in process, each variant timed in interleaved rounds
(best kept). Variants:

  default         the embedded default as committed (8 heads on a 14-layer cut)
  default-no-ood  the same without its OOD statistics: what the OOD score costs
  members-shared  K members on the same 14-layer cut, each with its own last N
                  layers (random deltas: weights do not change the cost) and 2
                  heads, served over one shared trunk (service/engine/trunk.py)
  members-alone   the same K members, each on a backbone of its own (K full
                  forwards): what serving cost was before the trunk was shared

Printed: tokens/s and each variant's throughput relative to `default`, and the
ideal for members-shared, L / (L - N + K N) for an L-layer cut.
`--tiny` runs a tiny random Llama in seconds (tests/test_bench_members.py).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from bench_cpu import _save_tiny_backbone, cpu_model, ppo_workload
from common import run_and_report

from rmserve.service.engine.backbone import find_layers, load_backbone
from rmserve.service.engine.ensemble import (
    EnsembleManifest,
    MemberSpec,
    MemberTensors,
    read_manifest,
    save_member,
    write_manifest,
)
from rmserve.service.engine.model import load_model
from rmserve.service.engine.scoring import ScoringEngine

DEFAULT = Path(__file__).resolve().parent.parent / "service" / "default_model"


def members_dir(root: Path, backbone: str, cut: int | None, k: int, n: int, seed: int = 0) -> list[Path]:
    """`root/shared` with K members (own last N layers + norm, 2 heads each) and `root/alone<i>`,
    each member as an ensemble of its own."""
    bb = load_backbone(backbone if backbone.startswith("builtin:") else str(root / backbone), num_layers=cut)
    prefix, blocks = find_layers(bb.model)
    layers = len(blocks)
    sd = bb.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    h = bb.hidden_size
    members = []
    for i in range(k):
        delta = {name: t + 0.01 * torch.randn(t.shape, generator=g) for name, t in sd.items()
                 if name == "norm.weight" or any(name.startswith(f"{prefix}.{j}.") for j in range(layers - n, layers))}
        heads = MemberTensors(torch.randn(2, h, generator=g) / h**0.5, torch.zeros(2), delta=delta)
        members.append((MemberSpec(name=f"member{i}", backbone=backbone, num_layers=cut), heads))
    out = [root / "shared"] + [root / f"alone{i}" for i in range(k)]
    for d, chosen in zip(out, [members] + [[m] for m in members], strict=True):
        for spec, tensors in chosen:
            save_member(d, MemberSpec(**vars(spec)), tensors)
        write_manifest(d, EnsembleManifest(name=d.name, version="bench", kind="members",
                                           members=[MemberSpec(**{**vars(s), "delta": "delta.safetensors"})
                                                    for s, _ in chosen], max_tokens=1024, dtype="bfloat16"))
    return out


def timed(engines: list[ScoringEngine], seqs: list[list[int]]) -> float:
    t0 = time.perf_counter()
    for e in engines:
        e.score(seqs)
    return time.perf_counter() - t0


def run_all(args, argv: list[str], tmp: Path, t_start: float) -> str:
    torch.manual_seed(0)
    if args.tiny:
        _save_tiny_backbone(tmp / "backbone", 64)
        default = tmp / "default"
        backbone, cut = "backbone", None
        spec = MemberSpec(name="member0", backbone=str(tmp / "backbone"))
        save_member(default, spec, MemberTensors(torch.randn(8, 64) / 8, torch.zeros(8)))
        write_manifest(default, EnsembleManifest(name="tiny", version="t", kind="heads", members=[spec], max_tokens=1024))
        n_layers, vocab = 2, 1000
    else:
        default = tmp / "default"
        shutil.copytree(DEFAULT, default)
        man = read_manifest(default)
        backbone, cut = man.members[0].backbone, man.members[0].num_layers
        n_layers, vocab = cut or 30, 49152
    no_ood = tmp / "default-no-ood"
    shutil.copytree(default, no_ood)
    man = read_manifest(no_ood)
    has_ood = man.ood is not None
    man.ood = None
    for m in man.members:
        m.ood = None
    write_manifest(no_ood, man)
    k, n = args.members, min(args.own_layers, n_layers)
    if args.tiny:  # the tiny backbone lives in tmp: members point at it by absolute path
        backbone = str(tmp / "backbone")
    shared, *alone = members_dir(tmp / "members", backbone, cut, k, n)

    w = ppo_workload(args.n, 32, 128 if args.tiny else 512, vocab)
    dtype = args.dtype
    variants = {
        "default": [ScoringEngine(load_model(default, dtype=dtype))],
        "default-no-ood": [ScoringEngine(load_model(no_ood, dtype=dtype))],
        "members-shared": [ScoringEngine(load_model(shared, dtype=dtype))],
        "members-alone": [ScoringEngine(load_model(p, dtype=dtype)) for p in alone],
    }
    # the shared trunk scores as each member alone (tests/test_trunk.py); checked here on this workload
    got = variants["members-shared"][0].score(w.seqs[:4]).rewards
    want = np.concatenate([e.score(w.seqs[:4]).rewards for e in variants["members-alone"]], axis=1)
    max_diff = float(np.abs(got - want).max())
    for engines in variants.values():  # warm-up
        timed(engines, w.seqs[:4])
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeat):
        for name, engines in variants.items():
            best[name] = min(best[name], timed(engines, w.seqs))
    tokens = sum(map(len, w.seqs))
    ideal = n_layers / (n_layers - n + k * n)
    lines = [
        "# Serving cost of uncertainty: members and the OOD score",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()} ({torch.get_num_threads()} threads); torch {torch.__version__}; python {platform.python_version()}",
        f"- command: `python bench/bench_members.py {' '.join(argv)}`",
        f"- workload: {w.title} ({tokens} tokens); dtype {dtype}; best of {args.repeat} interleaved rounds",
        f"- members: K={k}, each its own last {n} of {n_layers} layers + final norm, 2 heads; "
        f"default OOD statistics present: {has_ood}",
        f"- members-shared vs members-alone, max |reward difference| on 4 sequences: {max_diff:.2e}",
        "",
        "| variant | tokens/s | vs default |",
        "|---|---:|---:|",
    ]
    for name, secs in best.items():
        lines.append(f"| {name} | {tokens / secs:.0f} | {best['default'] / secs:.2f} |")
    lines += ["", f"Ideal members-shared / default for a trunk of {n_layers - n} shared and {k} x {n} own layers: "
                  f"{ideal:.2f}; members-alone's ideal: {1 / k:.2f}.",
              f"Wall time {time.perf_counter() - t_start:.0f} s."]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama, seconds (for tests)")
    ap.add_argument("--n", type=int, default=48, help="sequences in the PPO-like workload")
    ap.add_argument("--members", type=int, default=4, help="K members")
    ap.add_argument("--own-layers", type=int, default=2, help="N: each member's own last layers")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", help="also write the report (markdown) to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_and_report(argv, parse_args, run_all, "rmserve-bench-members-")


if __name__ == "__main__":
    sys.exit(main())
