"""The `rmserve` command: serve, score, info, train, eval.

Heavy imports (torch, transformers) happen inside the subcommands that need
them, so `rmserve score` and `rmserve info` work from a client-only install.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from rmserve.service.server.config import BACKEND_NAMES

if TYPE_CHECKING:
    from rmserve.client.types import ScoreResult

_BACKEND_FLAGS = {  # option -> (flag, the backend it belongs to)
    "device_map": ("--device-map", "accelerate"), "max_memory": ("--max-memory", "accelerate"),
    "offload_folder": ("--offload-folder", "accelerate"),
    "tensor_parallel_size": ("--tensor-parallel-size", "vllm"),
    "gpu_memory_utilization": ("--gpu-memory-utilization", "vllm"),
}


def _backend_options(args: argparse.Namespace) -> dict:
    """The --backend's own flags as load() keywords; a flag of another backend is an error."""
    out = {}
    for key, (flag, owner) in _BACKEND_FLAGS.items():
        value = getattr(args, key, None)
        if value is None:
            continue
        if args.backend != owner:
            raise ValueError(f"{flag} applies to --backend {owner} (serving with --backend {args.backend})")
        out[key] = value
    return out


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; the process ends here (`_exit_without_teardown`)."""
    import asyncio
    import signal

    from rmserve.service.server.app import RewardServer
    from rmserve.service.server.auth import install_reload_on_sighup
    from rmserve.service.server.config import ServerConfig
    from rmserve.service.server.errors import NotReady

    try:
        backend_options = _backend_options(args)
    except ValueError as e:
        print(f"rmserve: {e}", file=sys.stderr)
        return 2
    config = ServerConfig(
        model=args.model, host=args.host, port=args.port, backend_options=backend_options,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, metrics_host=args.metrics_host,
        dtype=args.dtype, device=args.device, backend=args.backend, max_tokens=args.max_tokens, token_budget=args.token_budget,
        batch_tokens=args.batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_queue_per_client=args.max_queue_per_client,
        max_samples_per_request=args.max_samples_per_request, registry=args.registry, data_roots=args.data_root,
        registry_poll_s=args.registry_poll,
        api_keys=args.api_keys, api_keys_env=args.api_keys_env, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, insecure_open=args.insecure_open,
        runs_file=args.runs_file, monitor=_monitor_settings(args.monitor), labels_db=args.labels_db,
        http_port=args.http_port, http_reward_field=args.http_reward_field, grace_s=args.grace,
    )

    async def run() -> int:
        try:
            server = RewardServer(config)
            await server.start()
        except (NotReady, ValueError, OSError) as e:
            print(f"rmserve: {e}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        if server.api_keys is not None:
            install_reload_on_sighup(loop, server.api_keys)
        ready = asyncio.ensure_future(server.wait_ready())
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:
            logging.getLogger("rmserve").error("could not load the model: %s", ready.exception())
            await server.stop(0)
            return 1
        await stop
        logging.getLogger("rmserve").info("stopping: finishing in-flight requests (grace %.0f s)", config.grace_s)
        await server.stop()
        return 0

    _exit_without_teardown(asyncio.run(run()))


def _exit_without_teardown(code: int) -> NoReturn:
    """End `rmserve serve` as soon as the server has stopped, skipping the interpreter's teardown.

    When `server.stop()` returns, everything the server owns is finished: calls drained, the
    run monitor saved, the store closed, training jobs stopped. What a normal exit then adds is
    Python freeing the ~2800 modules torch, transformers and triton bring: 3.8 s on an idle
    4-core machine, 5-7 s on the 2-core CI one, after rmserve's last line ran (measured with
    gdb in Py_FinalizeEx). The exit handlers still run (logging's flush, the removal of
    temporary folders registered with weakref.finalize), then the process ends with `code`."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _monitor_settings(items: list[str]) -> dict[str, float | int]:
    """--monitor KEY=VALUE pairs -> MonitorConfig fields (numbers; validated by MonitorConfig)."""
    out: dict[str, float | int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise SystemExit(f"rmserve serve: --monitor takes KEY=NUMBER, got {item!r}") from None
    return out


def _read_jsonl(path: str) -> Iterator[dict]:
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"rmserve score: {path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"rmserve score: {path}:{n}: each line must be a JSON object")
            yield row


def _result_fields(result: ScoreResult) -> dict[str, Any]:
    """Every field of a ScoreResult, read from the dataclass so that a new field reaches the
    output by itself. None (a model without OOD statistics, ...) is written as null, except
    `members` (there unless --members) and `id` (the input row keeps its own)."""
    out = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if f.name == "id" or (f.name == "members" and value is None):
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _score(args: argparse.Namespace) -> int:
    """JSONL in (one sample per line), JSONL out (the input row plus the scores)."""
    from rmserve.client import RewardClient, RewardServiceError

    rows = list(_read_jsonl(args.input))
    if not rows:
        print(f"rmserve score: {args.input} has no samples", file=sys.stderr)
        return 2
    samples = [{k: v for k, v in r.items() if k in ("messages", "prompt", "response", "token_ids")} for r in rows]
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        with RewardClient(args.address, timeout=args.timeout) as client:
            results = client.score(
                samples, uncertainty_penalty=args.uncertainty_penalty, return_members=args.members,
                run_id=args.run_id, step=args.step,
            )
        with out:
            for row, res in zip(rows, results, strict=True):
                out.write(json.dumps({**row, **_result_fields(res)}) + "\n")
    except (RewardServiceError, ValueError) as e:
        print(f"rmserve score: {e}", file=sys.stderr)
        return 1
    if args.output != "-":
        print(f"scored {len(rows)} samples -> {args.output}", file=sys.stderr)
    return 0


def _labels_export(args: argparse.Namespace) -> int:
    """Training rows from a server (LabelService) or straight from a store file; same rows either way."""
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    n = 0
    try:
        if args.store:
            from rmserve.service.data.preferences import Filters, SqliteStore

            store = SqliteStore(args.store)
            if not store.path.is_file():
                raise SystemExit(f"rmserve labels export: {args.store}: no such preference store")
            rows = (p.training_row() for p in store.query(Filters(kind=args.kind, since=args.since, tag=args.tag,
                                                                   labeler=args.labeler)))
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            store.close()
        else:
            from rmserve.client import RewardClient, RewardServiceError

            try:
                with RewardClient(args.address, timeout=args.timeout, api_key=args.api_key) as client:
                    for row in client.export_preferences(kind=args.kind, since=args.since, tag=args.tag,
                                                         labeler=args.labeler):
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        n += 1
            except RewardServiceError as e:
                print(f"rmserve labels export: {e}", file=sys.stderr)
                return 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {n} preferences -> {args.out}", file=sys.stderr)
    return 0


def _labels_report(args: argparse.Namespace) -> int:
    from rmserve.client import RewardClient, RewardServiceError

    try:
        with RewardClient(args.address, timeout=args.timeout, api_key=args.api_key) as client:
            stats = client.labeler_report(tag=args.tag)
    except RewardServiceError as e:
        print(f"rmserve labels report: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in stats], indent=2))
        return 0

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    print(f"{'labeler':<24} {'kind':<5} {'volume':>6} {'model':>6} {'kappa':>6} {'self':>6}  flag")
    for s in stats:
        print(f"{s.labeler[:24]:<24} {s.kind:<5} {s.volume:>6} {f(s.agreement_with_model):>6} "
              f"{f(s.agreement_with_others):>6} {f(s.self_consistency):>6}  {'FLAG ' + s.reason if s.flagged else ''}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    try:
        from rmserve.service.engine.errors import EnsembleFormatError
        from rmserve.service.engine.onnx_export import export_onnx
        from rmserve.service.server.config import DEFAULT_MODEL_DIR
    except ImportError as e:
        print(f"rmserve: export-onnx needs the onnx extra (pip install 'rmserve[onnx]'): {e}", file=sys.stderr)
        return 2
    source = DEFAULT_MODEL_DIR if args.model == "default" else args.model
    try:
        record = export_onnx(source, args.out, max_diff=args.max_diff, samples=args.samples, force=args.force,
                             quantize=args.quantize,
                             progress=lambda msg: print(f"export-onnx: {msg}", file=sys.stderr))
    except (EnsembleFormatError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"rmserve: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record["check"], indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    from rmserve.client import RewardClient, RewardServiceError

    try:
        with RewardClient(args.address, timeout=args.timeout) as client:
            info = client.model_info()
            serving = client.health()
    except RewardServiceError as e:
        print(f"rmserve info: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"serving": serving, **dataclasses.asdict(info)}, indent=2, default=list))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmserve", description="Reward-model ensemble serving for RLHF.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a reward model over gRPC")
    s.add_argument("--model", help="ensemble directory or one-label HF seq-cls checkpoint (default: the embedded model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (0: pick a free one)")
    s.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (-1: off)")
    s.add_argument("--metrics-host", help="address for /metrics (default: --host), e.g. 0.0.0.0 for a remote Prometheus")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="serving precision; auto = the model's own")
    s.add_argument("--device", default="cpu", help="cpu, cuda[:n] or auto (CUDA when there is one); "
                   "on CUDA the engine packs padding-free batches and sizes its token budget from memory")
    s.add_argument("--backend", default="torch", choices=sorted(BACKEND_NAMES),
                   help="what runs the forward: torch (default), onnx (a directory from `rmserve export-onnx`; "
                   "experimental on CUDA), accelerate (one model split over the node's GPUs; experimental over "
                   "several GPUs), vllm (experimental: vLLM's pooling runner, tensor parallel). Experimental: never "
                   "run on a GPU, tested against fakes until a GPU run is recorded in bench/results/ "
                   "(docs/STATUS.md); docs/big-models.md")
    s.add_argument("--device-map", metavar="MAP",
                   help="--backend accelerate: auto (default), balanced, balanced_low_0, sequential, or a JSON "
                   'object {"module": GPU index | "cpu" | "disk"} (or a file holding one)')
    s.add_argument("--max-memory", metavar="CAPS",
                   help="--backend accelerate: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    s.add_argument("--offload-folder", metavar="DIR",
                   help='--backend accelerate: where "disk" modules are kept (default: a temporary folder)')
    s.add_argument("--tensor-parallel-size", type=int, metavar="N",
                   help="--backend vllm: GPUs one model is split over (default 1)")
    s.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help="--backend vllm: the share of each GPU vLLM may take (default: vLLM's)")
    s.add_argument("--max-tokens", type=int, help="per-sample token limit (default: the model's)")
    s.add_argument("--token-budget", type=int, default=4096, help="padded tokens per engine forward")
    s.add_argument("--batch-tokens", type=int, default=16384, help="real tokens per scheduler batch")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    s.add_argument("--max-queue", type=int, default=8192, help="queued samples before RESOURCE_EXHAUSTED")
    s.add_argument("--max-queue-per-client", type=int, metavar="N",
                   help="samples one client (API key, else connection) may have queued or being scored before "
                        "its calls get RESOURCE_EXHAUSTED (default: half of --max-queue; 0: no per-client cap)")
    s.add_argument("--max-samples-per-request", type=int, default=1024)
    s.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long calls in flight may take to finish; the server exits "
                        "as soon as none is left (default %(default)s)")
    s.add_argument("--registry", help="directory of trained model versions (default: $RMSERVE_CACHE/registry)")
    s.add_argument("--registry-poll", type=float, default=5.0, metavar="SECONDS",
                   help="look at the registry's ACTIVE pointer this often and serve the version it names when it "
                   "changes (replicas sharing a registry follow each other: docs/scaling.md); 0 = off")
    s.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a directory the Train RPC may read data from (repeatable; none: Train is refused)")
    s.add_argument("--api-keys", metavar="FILE",
                   help='JSON {"key": ["score", "label", "admin"], ...}, re-read on SIGHUP; none: open')
    s.add_argument("--api-keys-env", metavar="VAR", help="the same JSON from this environment variable instead")
    s.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    s.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    s.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: require a client certificate signed by this CA (gRPC; needs --tls-cert)")
    s.add_argument("--insecure-open", action="store_true",
                   help="serve without API keys or client certificates on a non-loopback --host (docs/security.md)")
    s.add_argument("--http-port", type=int, metavar="PORT",
                   help="also serve HTTP/JSON on this port: OpenRLHF's POST /get_reward, slime's POST /score, "
                        "GET /health, GET /v1/model (docs/http.md); 0 picks a free port")
    s.add_argument("--http-reward-field", choices=["reward", "conservative", "min"], default="reward",
                   help="what POST /get_reward returns as `rewards` (default %(default)s)")
    s.add_argument("--labels-db", metavar="PATH",
                   help="the preference store labelers submit to (SQLite; default <registry>/preferences.sqlite3)")
    s.add_argument("--runs-file", metavar="PATH",
                   help="where the run monitor keeps its per-run summaries (default <registry>/runs.json; '' = memory only)")
    s.add_argument("--monitor", metavar="KEY=VALUE", action="append", default=[],
                   help="a run-monitor setting, e.g. std_ratio=1.5 or max_runs=64 (repeatable; "
                        "docs/monitoring/run-monitor.md lists them)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("score", help="score a JSONL file of samples through a server")
    c.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server")
    c.add_argument("--input", required=True, help="JSONL: {messages} or {prompt, response} or {token_ids} per line ('-' = stdin)")
    c.add_argument("--output", default="-", help="JSONL out: each input row plus its scores ('-' = stdout)")
    c.add_argument("--uncertainty-penalty", type=float, help="lambda for the conservative reward")
    c.add_argument("--members", action="store_true", help="include per-head rewards")
    c.add_argument("--run-id")
    c.add_argument("--step", type=int)
    c.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole call")
    c.set_defaults(func=_score)

    i = sub.add_parser("info", help="show the served model and health")
    i.add_argument("--address", default="127.0.0.1:50051")
    i.add_argument("--timeout", type=float, default=10.0)
    i.set_defaults(func=_info)

    lab = sub.add_parser("labels", help="the preference store: export labels, report on labelers")
    lsub = lab.add_subparsers(dest="labels_command", required=True)
    ex = lsub.add_parser("export", help="write stored preferences as training JSONL")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--address", help="a running server (needs the `label` scope with --api-key)")
    src.add_argument("--store", help="a preference store file (the server's --labels-db)")
    ex.add_argument("--out", required=True, help="JSONL to write ('-' for stdout)")
    ex.add_argument("--kind", choices=["human", "ai"], help="only this labeler kind")
    ex.add_argument("--since", type=float, metavar="UNIX_S", help="only labels given at or after this time")
    ex.add_argument("--tag", help="only this dataset tag")
    ex.add_argument("--labeler", help="only this labeler")
    ex.add_argument("--api-key", help="API key with the `label` scope")
    ex.add_argument("--timeout", type=float, default=120.0)
    ex.set_defaults(func=_labels_export)
    rep = lsub.add_parser("report", help="per-labeler agreement with the model and with each other")
    rep.add_argument("--address", required=True)
    rep.add_argument("--tag", help="only this dataset tag")
    rep.add_argument("--api-key", help="API key with the `label` scope")
    rep.add_argument("--json", action="store_true", help="JSON instead of a table")
    rep.add_argument("--timeout", type=float, default=300.0)
    rep.set_defaults(func=_labels_report)

    x = sub.add_parser("export-onnx", help="export a model for --backend onnx (checked against torch)")
    x.add_argument("model", metavar="MODEL", help="ensemble directory or seq-cls checkpoint; `default`: the embedded model")
    x.add_argument("--out", required=True, metavar="DIR", help="directory to write (serve it with --backend onnx --model DIR)")
    x.add_argument("--max-diff", type=float,
                   help="refuse the export when any reward differs from the torch path by more "
                        "(default 1e-3; with --quantize int8, a tenth of the rewards' std)")
    x.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: 8-bit matmul weights with int8 compute (faster on CPU, less exact; see docs/backends.md)")
    x.add_argument("--samples", type=int, default=24, help="sequences the check scores through both paths")
    x.add_argument("--force", action="store_true", help="replace DIR if it exists")
    x.set_defaults(func=_export_onnx)

    try:
        from rmserve.training.cli import (
            add_calibrate_ood_args,
            add_eval_args,
            add_train_args,
            run_calibrate_ood,
            run_eval,
            run_train,
        )
    except ImportError:  # a client-only install has no training dependencies
        pass
    else:
        t = sub.add_parser("train", help="train a reward-model ensemble (Bradley-Terry)")
        add_train_args(t)
        t.set_defaults(func=run_train)
        e = sub.add_parser("eval", help="evaluate an ensemble on preference pairs")
        add_eval_args(e)
        e.set_defaults(func=run_eval)
        o = sub.add_parser("calibrate-ood", help="add OOD statistics and a calibrated flag to an ensemble")
        add_calibrate_ood_args(o)
        o.set_defaults(func=run_calibrate_ood)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.verbose else logging.ERROR)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

