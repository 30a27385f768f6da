"""`rmserve train` and `rmserve eval`: argparse wiring, a tqdm bar, Ctrl-C as a clean stop.

The subcommand parser is built elsewhere; it calls `add_train_args(parser)` and
dispatches to `run_train(args)` (likewise for eval). Both return a process exit
code: 0 done, 2 bad input (message on stderr, no traceback), 130 stopped by
Ctrl-C after writing a checkpoint (rerun with --resume).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, get_args

from rmserve.service.data.train_config import (
    AUGMENT_KINDS,
    SERVE_DTYPES,
    Device,
    HeadSolver,
    Kind,
    LabelerKind,
    LengthDebias,
    TrainConfig,
)
from rmserve.training.data import DataError
from rmserve.training.events import ProgressEvent, TrainingStopped
from rmserve.training.metrics import format_report

_USER_ERRORS = (DataError, FileExistsError, FileNotFoundError, ValueError)


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data="-", out="")  # defaults, shown in --help
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", action="extend", metavar="FILE",
                        help="training preferences (JSONL: {chosen, rejected}, {prompt, chosen, rejected} or ranked "
                             "lists); several files (--data A B, or --data repeated) are concatenated, each pair "
                             "remembering its file (named by its folder, else its stem) for per-dataset reports")
    source.add_argument("--from-store", nargs="?", const=str(default_store()), metavar="STORE",
                        help="train on the labels in a preference store (the server's SQLite file; "
                             f"default {default_store()}), filtered by --store-*")
    p.add_argument("--store-kind", choices=get_args(LabelerKind), help="with --from-store: only this labeler kind")
    p.add_argument("--store-since", type=float, metavar="UNIX_S", help="with --from-store: labelled at or after")
    p.add_argument("--store-tag", help="with --from-store: only this dataset tag")
    p.add_argument("--store-labeler", help="with --from-store: only this labeler")
    p.add_argument("--dev", nargs="+", action="extend", metavar="FILE",
                   help="held-out preferences, evaluated once at the end for the report (never used to train or "
                        "select); several files are each evaluated and reported by name")
    p.add_argument("--augment", default=d.augment, metavar="KIND[:SHARE][,...]",
                   help="robust-training pairs whose rejected side does not answer the prompt, one per chosen "
                        f"training prompt with probability SHARE (default --augment-share); kinds: "
                        f"{', '.join(AUGMENT_KINDS)} (docs/training.md)")
    p.add_argument("--augment-share", type=float, default=d.augment_share,
                   help="share of the training prompts per augmentation kind that names none (default %(default)s)")
    p.add_argument("--augment-weight", type=float, default=d.augment_weight,
                   help="weight of each augmented pair (default %(default)s)")
    p.add_argument("--length-debias", choices=get_args(LengthDebias), default=d.length_debias,
                   help="balance: chosen-longer and chosen-shorter pairs weigh the same per dataset; decorrelate: "
                        "heads with zero covariance with response length on train (frozen features) "
                        "(default %(default)s)")
    p.add_argument("--out", required=True, help="ensemble directory to write")
    p.add_argument("--backbone", default=d.backbone, help="HF checkpoint directory or builtin:<name> (default %(default)s)")
    p.add_argument("--kind", choices=get_args(Kind), default=d.kind,
                   help="heads: one backbone, K bootstrap heads; members: K separately fine-tuned backbones")
    p.add_argument("-k", "--num-heads", type=int, default=d.num_heads, help="K: heads or members (default %(default)s)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="layer cut: use and serve only the backbone's first N transformer layers (default: all)")
    p.add_argument("--finetune-layers", type=int, default=d.finetune_layers,
                   help="train the last N transformer layers (0: frozen backbone, cached features; -1: all)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank on those layers (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=d.prefix_cache,
                   help="when fine-tuning the last N layers, run the frozen ones once and cache their output (default on)")
    p.add_argument("--bootstrap", action=argparse.BooleanOptionalAction, default=None,
                   help="per-head bootstrap resamples (default: on for heads, off for members)")
    p.add_argument("--head-solver", choices=get_args(HeadSolver), default=d.head_solver,
                   help="frozen backbone: adamw trains heads for --epochs; lbfgs fits each head's L2 logistic "
                        "regression exactly (default %(default)s)")
    p.add_argument("--head-l2", type=_l2, default=None, metavar="L2|auto",
                   help="lbfgs: L2 strength, or auto (default): chosen by 5-fold cross-validation on train")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="heads learning rate (default %(default)s)")
    p.add_argument("--backbone-lr", type=float, default=d.backbone_lr, help="fine-tuned layers / LoRA learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay of the heads")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per micro-batch (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="per-sample token limit, as served (prompt cut from the left)")
    p.add_argument("--serve-dtype", default=d.serve_dtype, choices=SERVE_DTYPES,
                   help="serving precision written to the manifest (what `rmserve serve --dtype auto` uses; "
                        "bfloat16 falls back to float32 on CPUs without native bf16); check it with `rmserve eval --dtype`")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--center-coef", type=float, default=d.center_coef, help="reward centring coefficient x mean (r_c + r_r)^2")
    p.add_argument("--lambda0", type=float, default=d.lambda0, help="epistemic prior: M = lambda0 I + sum e e^T")
    p.add_argument("--calib-frac", type=float, default=d.calib_frac, help="share of TRAIN held out to fit the temperature (0: none)")
    p.add_argument("--min-calib-pairs", type=int, default=d.min_calib_pairs)
    p.add_argument("--uncertainty-penalty", type=float, default=d.uncertainty_penalty, help="manifest default lambda for the conservative reward")
    p.add_argument("--ood-quantile", type=_quantile, default=d.ood_quantile, metavar="Q|none",
                   help="OOD flag threshold: this quantile of held-out in-distribution scores (default %(default)s: "
                        "1%% false alarms); none: no OOD statistics")
    p.add_argument("--ood-holdout", type=float, default=d.ood_holdout, help="share of pairs held out for that threshold")
    p.add_argument("--device", choices=get_args(Device), default=d.device)
    p.add_argument("--token-budget", type=int, default=d.token_budget, help="padded tokens per forward batch for features/eval")
    p.add_argument("--feature-cache", default=None, help="frozen-feature cache directory ('' disables; default $RMSERVE_CACHE/features)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every_s", type=float, default=d.checkpoint_every_s, help="seconds")
    p.add_argument("--log-every", type=int, default=d.log_every, help="optimizer steps between progress lines (0: ~200 per run)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an ensemble or checkpoint already in --out")
    p.add_argument("--keep-checkpoint", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed row instead of skipping and reporting it")
    p.add_argument("--name", help="manifest name (default: the --out directory name)")
    p.add_argument("--model-version", dest="version", help="manifest version (default: UTC time + data hash)")
    p.add_argument("--log-json", action="store_true", help="print progress as JSON lines on stdout instead of a bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _quantile(text: str) -> float | None:
    return None if text == "none" else float(text)


def _l2(text: str) -> float | None:
    return None if text == "auto" else float(text)


def default_store() -> Path:
    """Where `rmserve serve` keeps its labels by default: <registry>/preferences.sqlite3."""
    import os

    return Path(os.environ.get("RMSERVE_CACHE", Path.home() / ".cache" / "rmserve")) / "registry" / "preferences.sqlite3"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    for key, none in (("data", ""), ("dev", None)):  # one file stays a path, as the Train RPC sends it
        files = values.get(key) or []
        values[key] = files if len(files) > 1 else (files[0] if files else none)
    filters = {k: values.pop(f"store_{k}", None) for k in ("kind", "since", "tag", "labeler")}
    if values.get("from_store"):
        if not Path(values["from_store"]).is_file():
            raise ValueError(f"--from-store {values['from_store']}: no such preference store")
        values["store_filters"] = {k: v for k, v in filters.items() if v is not None} or None
    elif any(v is not None for v in filters.values()):
        raise ValueError("--store-kind/--store-since/--store-tag/--store-labeler need --from-store")
    return TrainConfig.from_dict(values)


class _Bar:
    """Progress callback: one tqdm bar per phase, or JSON lines with --log-json."""

    def __init__(self, json_lines: bool):
        self.json_lines = json_lines
        self.bar: Any = None
        self.phase = ""

    def __call__(self, ev: ProgressEvent) -> None:
        if self.json_lines:
            print(json.dumps(ev.to_dict()), flush=True)  # the `done` line carries the whole report
            return
        from tqdm import tqdm

        if ev.phase != self.phase or ev.event in ("phase", "stopped", "error", "done"):
            self.close()  # a bar covers the steps between two messages of one phase
            self.phase = ev.phase
        if ev.event == "step":
            if self.bar is None:  # train steps count over all members: a member's bar starts where it resumes
                train = ev.phase == "train"
                self.bar = tqdm(total=ev.total, desc=ev.phase, unit="step" if train else "seq",
                                initial=ev.step - 1 if train else 0, dynamic_ncols=True, file=sys.stderr)
            self.bar.update(ev.step - self.bar.n)
            if ev.loss is not None:
                self.bar.set_postfix(loss=f"{ev.loss:.4f}", acc=f"{ev.accuracy:.3f}", member=ev.member, refresh=False)
        elif ev.message and ev.event != "done":
            print(f"[{ev.phase}] {ev.message}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_train(args: argparse.Namespace) -> int:
    from rmserve.training.trainer import train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"rmserve train: {e}", file=sys.stderr)
        return 2
    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: checkpoint and stop; second: default (KeyboardInterrupt)
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = _Bar(args.log_json)
    try:
        result = train(cfg, progress=bar, should_stop=lambda: stop["requested"])
    except TrainingStopped as e:
        bar.close()
        print(f"rmserve train: {e}; rerun with --resume", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        bar.close()
        print(f"rmserve train: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
    bar.close()
    if not args.log_json:
        r = result.report
        print(f"wrote {result.out} (version {result.manifest.version}); temperature {r['temperature']:.3f}")
        tables = [(r.get(key), title) for key, title in (
            ("train", "train (pairs trained on)"), ("calibration_split", "held-out slice of train"),
            ("cross_fitted", "train, out-of-fold (5-fold cross-fitted heads)"))]
        tables += [(d, f"dev {name}: {d['data']}") for name, d in (r.get("dev_sets") or {}).items()]
        for table, title in tables:
            if table:
                print("\n" + format_report(table, title))
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ensemble directory (or a one-label HF seq-cls checkpoint)")
    p.add_argument("--data", required=True, nargs="+", action="extend", metavar="FILE",
                   help="preference JSONL to evaluate on; several files (--data A B, or --data repeated) "
                        "are each evaluated and reported on their own")
    p.add_argument("--report", help="where to write the JSON report, with one --data file only "
                                    "(default <model>/eval_<data stem>.json, one per file)")
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="serving precision to evaluate in (default: the model's own, as `rmserve serve` serves it)")
    p.add_argument("--threads", type=int, default=None)


def run_eval(args: argparse.Namespace) -> int:
    from rmserve.training.evaluate import evaluate, evaluate_many

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    datas = args.data
    try:
        if len(datas) == 1:
            reports = [evaluate(args.model, datas[0], strict=args.strict, token_budget=args.token_budget,
                                report_path=args.report, dtype=args.dtype)]
        else:
            reports = evaluate_many(args.model, datas, strict=args.strict, token_budget=args.token_budget,
                                    report_path=args.report, dtype=args.dtype)
    except _USER_ERRORS as e:
        print(f"rmserve eval: {e}", file=sys.stderr)
        return 2
    if args.json:  # one file: its report; several: a list of them, in --data order
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0
    for i, (data, report) in enumerate(zip(datas, reports, strict=True)):
        m = report["model"]
        print(("\n" if i else "") + format_report(report, f"{m['name']} {m['version']} on {data}"))
        skipped = report["data_report"]
        if skipped["errors"] or skipped["ties"]:
            print(f"skipped: errors {skipped['errors']}, ties {skipped['ties']}")
        print(f"report: {report.get('report_path')}")
    return 0


def add_calibrate_ood_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ensemble directory to add OOD statistics to (rewritten in place)")
    p.add_argument("--data", required=True, help="preference JSONL the model was trained on")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="the threshold is this quantile of held-out in-distribution scores (0.99: 1%% false alarms)")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of pairs held out to calibrate on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="precision of the embeddings (default: the one `rmserve serve` serves)")
    p.add_argument("--threads", type=int, default=None)


def run_calibrate_ood(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rmserve.service.engine.errors import EnsembleFormatError
    from rmserve.training.ood import calibrate_directory

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bars: dict[str, Any] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase) or bars.setdefault(phase, tqdm(total=total, desc=phase, unit="seq", file=sys.stderr))
        bar.update(done - bar.n)

    try:
        info = calibrate_directory(args.model, args.data, quantile=args.quantile, holdout=args.holdout,
                                   seed=args.seed, token_budget=args.token_budget, dtype=args.dtype,
                                   progress=progress)
    except (*_USER_ERRORS, EnsembleFormatError) as e:
        print(f"rmserve calibrate-ood: {e}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    print(json.dumps(info, indent=2))
    return 0
