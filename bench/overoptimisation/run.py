"""Reward over-optimisation, measured: does rmserve's run monitor fire on a reward-hacking
run before its true reward peaks, and stay quiet on healthy runs?

The synthetic setup of Gao et al. (2022) and Coste et al. (2023) on a 2-core CPU
(docs/overoptimisation.md has the results and the reasoning):

  gold    rmserve's embedded default (layer 14, 8 heads, all 1510 train pairs, human
          labels): the "true" reward, run in process only (models.py)
  proxy   8 bootstrap heads on layer 8, trained by rmserve on 300 train pairs with 25% of
          the labels flipped, served by a real server (serving.py). Labels: the human ones
          (default) or the gold's (`--proxy-labels gold`, Gao et al.'s relabelling: that
          proxy tracked the gold too well to be over-optimised here, see the docs)
  policy  SmolLM2-135M-Instruct sampling held-out dev prompts (policy.py)

  1. best-of-n by proxy mean, worst head (WCO) and mean − λ·var (UWO), scored by the
     gold, against KL_bon (bestofn.py)
  2. an evolutionary text search optimising the proxy mean, UWO, WCO, the gold (a healthy
     run) or nothing (policy samples), every step scored through the server with a
     run_id so the run monitor judges it (evolve.py); the recorded streams are then
     replayed under a grid of monitor settings (replay.py)

Run (about 15 minutes on 2 cores once the proxy and the samples are cached, 20 more
the first time; `--quick` is a smoke run of under a minute on that cache):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/overoptimisation/run.py --threads 1 \
        --out bench/results/overoptimisation-2026-12-02.md

Writes the markdown results, the raw numbers beside it (same name, .json), and
two plots (docs/overoptimisation-bon.png, docs/overoptimisation-runs.png; with
--quick beside the results instead). The proxy and the policy samples are cached
under --work, so a re-run with the same settings skips them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import report
from bestofn import best_of_n, summary
from evolve import RunResult, Vocabulary, run_search
from models import GoldScorer, ProxySpec, train_proxy, write_proxy_data
from policy import Policy, Prompt, select_prompts
from replay import DEFAULTS, alarm_step, recommend, streams, sweep
from serving import ProxyScores, ProxyServer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown results file (raw JSON is written beside it)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 4 prompts, n=8, 6 search steps")
    p.add_argument("--work", default=str(Path(os.environ.get("RMSERVE_CACHE", Path.home() / ".cache" / "rmserve"))
                                         / "overoptimisation"), help="cache: proxy, samples (default %(default)s)")
    p.add_argument("--plots", default=None, help="where the PNGs go (default docs/, or beside --out with --quick)")
    p.add_argument("--train", default=str(DATA / "train.jsonl"))
    p.add_argument("--dev", default=str(DATA / "dev.jsonl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other jobs)")
    # proxy
    p.add_argument("--proxy-pairs", type=int, default=300)
    p.add_argument("--proxy-flip", type=float, default=0.25)
    p.add_argument("--proxy-layers", type=int, default=8)
    p.add_argument("--proxy-labels", choices=("gold", "human"), default="human",
                   help="label the proxy's pairs by the gold (Gao et al.) or keep the human labels")
    # experiment 1
    p.add_argument("--prompts", type=int, default=16, help="dev prompts for best-of-n")
    p.add_argument("--n", type=int, default=32, help="policy samples per prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=160)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--uwo-lambda", type=float, default=0.5, help="λ of best-of-n's UWO (also run at --search-uwo-lambda)")
    # experiment 2
    p.add_argument("--search-prompts", type=int, default=8, help="the first K best-of-n prompts")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--offspring", type=int, default=12)
    p.add_argument("--junk", type=float, default=0.3,
                   help="share of edits that insert a random token of the backbone's vocabulary")
    p.add_argument("--runs", default="mean,uwo,wco,gold,policy", help="objectives to run (mean,uwo,wco,gold,policy)")
    p.add_argument("--search-uwo-lambda", type=float, default=20.0,
                   help="λ of the search's uwo run: var is tiny at this proxy's reward scale (see the docs)")
    p.add_argument("--monitor", action="append", default=[], metavar="KEY=VALUE",
                   help="run-monitor setting of the live server (default: the server's defaults)")
    p.add_argument("--no-sweep", action="store_true", help="skip replaying the runs under other monitor settings")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.n, args.search_prompts, args.steps = 4, 8, 2, 8
        args.population, args.offspring = 4, 8
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    import torch
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _parse_monitor(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"--monitor: unknown setting {key!r}")
        out[key] = type(DEFAULTS[key])(float(value)) if isinstance(DEFAULTS[key], float) else int(value)
    return out


def prepare_proxy(args: argparse.Namespace, gold: GoldScorer, work: Path) -> dict[str, Any]:
    """Label a train subset with the gold, flip some labels, train the proxy; cached by its spec."""
    spec = ProxySpec(pairs=args.proxy_pairs, flip=args.proxy_flip, layers=args.proxy_layers, seed=args.seed,
                     labels=args.proxy_labels)
    fields = asdict(spec)
    if spec.labels == "gold":  # (keeps the cache key of proxies made before `labels` existed)
        del fields["labels"]
    out = work / f"proxy-{hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:10]}"
    info_path = out / "overoptimisation-proxy.json"
    if info_path.is_file():
        log(f"proxy: cached {out}")
        return json.loads(info_path.read_text())
    log(f"proxy: {spec.pairs} train pairs, {spec.labels} labels, {spec.flip:.0%} flipped")
    labels = write_proxy_data(gold, args.train, out.with_suffix(".jsonl"), spec)
    log(f"proxy: {labels}; training")
    info = {"spec": asdict(spec), "labels": labels, **train_proxy(out.with_suffix(".jsonl"), out, spec)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def policy_samples(args: argparse.Namespace, work: Path) -> tuple[list[Prompt], list[list[str]]]:
    """Prompts and N samples each. Sampling is the slowest part on a CPU, so every prompt's
    samples are cached on their own (by prompt, seed, length), and a cached list longer than
    N serves N too: sampling runs in batches of 32 from one seed, so the first 32 samples of
    N = 64 are exactly the samples of N = 32."""
    policy = Policy()
    prompts = select_prompts(args.dev, args.prompts, args.max_prompt_tokens, policy.tokenizer, args.seed)
    samples = []
    for i, p in enumerate(prompts):
        seed = args.seed * 1000 + i
        key = hashlib.sha1(json.dumps([p.messages, seed, args.max_new_tokens]).encode()).hexdigest()[:16]
        path = work / "samples" / f"{key}.json"
        if path.is_file() and len(cached := json.loads(path.read_text())) >= args.n:
            samples.append(cached[: args.n])
            continue
        t = time.time()
        samples.append(policy.sample(p.messages, args.n, seed=seed, max_new_tokens=args.max_new_tokens, batch=32))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(samples[-1]))
        log(f"policy: prompt {i + 1}/{len(prompts)}: {args.n} samples in {time.time() - t:.0f}s")
    return prompts, samples


def backbone_tokens() -> list[str]:
    """Every token of the backbone's vocabulary as text (stripped; empty ones dropped)."""
    from transformers import AutoTokenizer

    from rmserve.service.engine.backbone import resolve_builtin

    tok = AutoTokenizer.from_pretrained(resolve_builtin("smollm2-135m-instruct"))
    return [t for t in (tok.decode([i]).strip() for i in range(len(tok))) if t]


def corr_stats(proxy: list[ProxyScores], gold: list[np.ndarray]) -> dict[str, float]:
    """How well the proxy tracks the gold on policy samples: within-prompt Pearson and
    Spearman correlation, averaged over prompts (rank agreement is what best-of-n uses)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(x)).astype(np.float64)

    pear = [float(np.corrcoef(p.mean, g)[0, 1]) for p, g in zip(proxy, gold, strict=True)]
    spear = [float(np.corrcoef(ranks(p.mean), ranks(g))[0, 1]) for p, g in zip(proxy, gold, strict=True)]
    std_gold = [float(np.corrcoef(p.std, g)[0, 1]) for p, g in zip(proxy, gold, strict=True)]
    return {"pearson_within_prompt": float(np.mean(pear)), "spearman_within_prompt": float(np.mean(spear)),
            "corr_std_gold_within_prompt": float(np.mean(std_gold)),
            "pearson_pooled": float(np.corrcoef(np.concatenate([p.mean for p in proxy]), np.concatenate(gold))[0, 1])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = Path(args.plots) if args.plots else (out.parent if args.quick else ROOT / "docs")
    plots.mkdir(parents=True, exist_ok=True)
    prefix = out.stem if args.quick else "overoptimisation"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    monitor = _parse_monitor(args.monitor)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python bench/overoptimisation/run.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)

    t = time.time()
    gold = GoldScorer()
    proxy_info = prepare_proxy(args, gold, work)
    timings["proxy"] = time.time() - t

    t = time.time()
    prompts, samples = policy_samples(args, work)
    timings["sampling"] = time.time() - t

    t = time.time()
    server = ProxyServer(proxy_info["dir"], monitor)
    try:
        log(f"server: {server.server.address}, proxy {server.model_info()}")
        # ---- experiment 1: best-of-n
        proxy_bon = server.score_groups([(p.messages, s) for p, s in zip(prompts, samples, strict=True)])
        gold_bon = [gold.score([(p.key, p.messages, r) for r in s]) for p, s in zip(prompts, samples, strict=True)]
        ns = [2 ** k for k in range(int(math.log2(args.n)) + 1)]
        points = best_of_n(proxy_bon, gold_bon, ns, [args.uwo_lambda, args.search_uwo_lambda], seed=args.seed)
        bon_summary = summary(points)
        agreement = corr_stats(proxy_bon, gold_bon)
        timings["best_of_n"] = time.time() - t
        log(f"best-of-n: {json.dumps(bon_summary)}")
        log(f"proxy vs gold on policy samples: {agreement}")

        # ---- experiment 2: the search, fed to the monitor
        t = time.time()
        train_texts = []
        for line in Path(args.train).read_text().splitlines():
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                train_texts.append(row[side].rsplit("\n\nAssistant:", 1)[-1].strip())
        vocab = Vocabulary(train_texts, backbone_tokens(), junk=args.junk, seed=args.seed)
        k = args.search_prompts
        runs: list[RunResult] = []
        for objective in args.runs.split(","):
            run_id = f"uwo-{args.search_uwo_lambda:g}" if objective == "uwo" else objective
            log(f"search: run '{run_id}' ({args.steps} steps, {k} prompts x {args.offspring} samples a step)")
            runs.append(run_search(run_id, objective, prompts[:k], samples[:k], server, gold, vocab,
                                   steps=args.steps, population=args.population, offspring=args.offspring,
                                   uwo_lambda=args.search_uwo_lambda, seed=args.seed, log=log))
            st = runs[-1].status
            log(f"search: '{run_id}': alarm {st['alarm']} at step {st['alarm_step']}: {st['reason']}")
        timings["search"] = time.time() - t
    finally:
        server.close()

    # ---- replay: the server's verdict reproduced, then other settings
    t = time.time()
    live = {**DEFAULTS, **monitor}
    consistency = {}
    for r in runs:
        rep = alarm_step(streams(r, k)["all"], live)
        consistency[r.run_id] = {"server": r.status["alarm_step"] if r.status["alarm"] else None, "replay": rep}
    hacked = [r for r in ("mean",) if r in {x.run_id for x in runs}]
    healthy = [x.run_id for x in runs if x.run_id != "mean"]
    sweep_result = None if args.no_sweep else sweep(runs, k, hacked, healthy)
    best = None if sweep_result is None else recommend(sweep_result)
    default_row = None
    if sweep_result is not None:
        default_row = next((r for r in sweep_result["rows"]
                            if all(r["params"][p] == DEFAULTS[p] for p in r["params"])), None)
    timings["replay"] = time.time() - t
    timings["total"] = time.time() - t_start

    # ---- outputs
    replayed: dict[str, dict[str, int | None]] = {
        "server": {r.run_id: (r.status["alarm_step"] if r.status["alarm"] else None) for r in runs}}
    if best is not None:
        replayed["recommended"] = {rid: a["all"] for rid, a in best["alarms"].items()}
    bon_png = plots / f"{prefix}-bon.png"
    runs_png = plots / f"{prefix}-runs.png"
    report.plot_bon(points, bon_png, f"best-of-n on {len(prompts)} held-out prompts, proxy: layer "
                    f"{args.proxy_layers}, {args.proxy_pairs} pairs, {args.proxy_flip:.0%} flipped; gold: layer 14")
    report.plot_runs(runs, replayed, runs_png, f"evolutionary search, {k} prompts x {args.offspring} samples/step "
                     "(orange: alarm; solid = server defaults, dotted = recommended; dot: gold peak)")
    raw = {
        "command": command, "machine": machine(), "timings_s": timings, "args": vars(args),
        "gold": gold.describe(), "gold_scored": gold.scored, "proxy": proxy_info, "live_monitor": live,
        "prompts": [asdict(p) for p in prompts],
        "best_of_n": {"points": [asdict(p) for p in points], "summary": bon_summary, "proxy_gold": agreement},
        "search": [{**asdict(r), "steps": [{**asdict(s), "samples": s.samples} for s in r.steps]} for r in runs],
        "replay_consistency": consistency,
        "sweep": None if sweep_result is None else {
            "grid": sweep_result["grid"], "gold_peaks": sweep_result["gold_peaks"],
            "separating": sum(r["separates"] for r in sweep_result["rows"]), "settings": len(sweep_result["rows"]),
            "default": default_row, "recommended": best,
            "separating_rows": [r for r in sweep_result["rows"] if r["separates"]]},
    }
    out.with_suffix(".json").write_text(json.dumps(raw, default=_json_default))
    out.write_text(render(raw, runs, points, bon_png, runs_png, out, k, replayed))
    log(f"wrote {out}, {out.with_suffix('.json')}, {bon_png}, {runs_png} in {timings['total'] / 60:.1f} min")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def render(raw: dict[str, Any], runs: list[RunResult], points: list, bon_png: Path, runs_png: Path, out: Path,
           k: int, replayed: dict[str, dict[str, int | None]]) -> str:
    """The results file: setup, machine, command, tables; the reasoning lives in docs/overoptimisation.md."""
    m, a, px = raw["machine"], raw["args"], raw["proxy"]
    rel = os.path.relpath
    cf = px.get("cross_fitted") or {}
    lines = [
        f"# Over-optimisation experiment — {m['date'][:10]}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}.",
        "",
        "```bash",
        raw["command"],
        "```",
        "",
        "Wall time: " + ", ".join(f"{key} {v / 60:.1f} min" for key, v in raw["timings_s"].items())
        + " (proxy and samples come from the --work cache when present).",
        "",
        "## Setup",
        "",
        f"- gold: `{rel(raw['gold']['source'], out.parent)}` ({raw['gold']['layers']} layers, "
        f"{raw['gold']['heads']} heads, {raw['gold']['dtype']}), trained on all of train with human labels.",
        f"- proxy: {px['spec']['pairs']} train pairs with {px['labels'].get('labels', 'gold')} labels"
        + (f" (gold agrees with the human label on {px['labels']['gold_agrees_with_human']:.1%} of them)"
           if "gold_agrees_with_human" in px["labels"] else "")
        + f", {px['labels']['flipped']} labels flipped; "
        f"{px['spec']['heads']} bootstrap heads on layer {px['spec']['layers']}, lbfgs, "
        f"l2 {(px.get('heads') or {}).get('l2')}; cross-fitted accuracy on its own (noisy) labels "
        f"{cf.get('accuracy', float('nan')):.3f}.",
        f"- policy: SmolLM2-135M-Instruct, temperature 1, no top-k/top-p, {a['max_new_tokens']} new tokens; "
        f"{a['prompts']} dev prompts (≤ {a['max_prompt_tokens']} tokens), {a['n']} samples each.",
        f"- proxy vs gold on the policy samples: within-prompt Pearson "
        f"{raw['best_of_n']['proxy_gold']['pearson_within_prompt']:.2f}, Spearman "
        f"{raw['best_of_n']['proxy_gold']['spearman_within_prompt']:.2f}; pooled Pearson "
        f"{raw['best_of_n']['proxy_gold']['pearson_pooled']:.2f}; corr(proxy std, gold) within prompt "
        f"{raw['best_of_n']['proxy_gold']['corr_std_gold_within_prompt']:+.2f}.",
        "",
        f"## Experiment 1: best-of-n (UWO λ = {a['uwo_lambda']} and {a['search_uwo_lambda']})",
        "",
        f"![best-of-n]({rel(bon_png, out.parent)})",
        "",
        report.bon_table(points),
        "",
        "| objective | gold at n=1 | gold peak (n) | gold at largest n | last gain / own peak gain | "
        "last gain / best peak gain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in raw["best_of_n"]["summary"].items():
        lines.append(f"| {name} | {s['gold_n1']:+.3f} | {s['gold_peak']:+.3f} ({s['peak_n']}) | "
                     f"{s['gold_last']:+.3f} | {s['last_share_of_own_peak_gain']:.0%} | "
                     f"{s['last_over_best_peak_gain']:.0%} |")
    lines += [
        "",
        f"## Experiment 2: evolutionary search scored through the server (UWO λ = {a['search_uwo_lambda']})",
        "",
        f"{k} prompts, population {a['population']}, {a['offspring']} children per prompt per step "
        f"({k * a['offspring']} samples a step, all sent with `run_id`/`step`), {a['steps']} steps. "
        f"Live monitor settings: `{json.dumps({kk: v for kk, v in raw['live_monitor'].items() if kk in replay_keys()})}`.",
        "",
        f"![runs]({rel(runs_png, out.parent)})",
        "",
        report.runs_table(runs, replayed),
        "",
        "Server verdicts:",
        "",
    ]
    for r in runs:
        st = r.status
        lines.append(f"- `{r.run_id}`: alarm {st['alarm']}" + (f" at step {st['alarm_step']}: {st['reason']}"
                                                              if st["alarm"] else "") + f" ({r.seconds / 60:.1f} min)")
    lines += ["", "Replaying the recorded streams with the live settings reproduces the server: "
              + ", ".join(f"{rid} {c['server']} / {c['replay']}" for rid, c in raw["replay_consistency"].items())
              + " (server / replay).", ""]
    sw = raw["sweep"]
    if sw is not None:
        lines += [
            "## Monitor settings",
            "",
            f"{sw['settings']} settings (grid: `{json.dumps(sw['grid'], default=_json_default)}`) replayed on every "
            f"run, whole and in two halves of its prompts (A, B). A setting *separates* when it fires on every "
            f"`mean` stream and on no other; lead = gold peak step − alarm step (gold peaks: "
            f"`{json.dumps(sw['gold_peaks'])}`). {sw['separating']} settings separate.",
            "",
        ]
        rows = []
        if sw["default"] is not None:
            rows.append({**sw["default"], "label": "defaults"})
        if sw["recommended"] is not None:
            changed = {kk: v for kk, v in sw["recommended"]["params"].items() if DEFAULTS[kk] != v}
            rows.append({**sw["recommended"], "label": "recommended: " + (", ".join(
                f"{kk}={v}" for kk, v in changed.items()) or "the defaults")})
        if rows:
            lines += [report.sweep_table(rows, [r.run_id for r in runs]), ""]
    lines += ["## Per step", ""]
    for r in runs:
        lines += [f"### `{r.run_id}`", "", report.steps_table(r, 5), "", "Final best responses:", ""]
        for ex in r.examples:
            lines.append(f"- proxy {ex['proxy']:+.2f} (std {ex['std']:.2f}), gold {ex['gold']:+.2f} — "
                         f"*{ex['prompt'][:80]!r}* → {ex['best'][:300]!r}")
        lines.append("")
    return "\n".join(lines)


def replay_keys() -> tuple[str, ...]:
    return ("baseline_steps", "window", "patience", "std_ratio", "min_reward_rise", "top_std_ratio", "min_corr")


if __name__ == "__main__":
    raise SystemExit(main())
