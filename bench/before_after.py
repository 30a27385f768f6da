"""Before/after through gRPC: the same workloads against a server from this checkout and one
from another git ref, in one client process, rounds interleaved.

bench_cpu.py's `--against REF` uses this (it supplies the model and the workloads):

    .venv/bin/python bench/bench_cpu.py --against 73db9bf --out bench/results/refactor-vs-73db9bf-$(date +%F).md

A change that is meant to keep serving speed ("behaviour stays") is checked by
timing both versions in the same run: this machine's speed drifts by up to 2x
within minutes, so numbers from two runs are not comparable. How:

- Each side is staged as installed: the ref's tree (`git archive`, no worktree to
  clean up) or this checkout's working tree, copied by the tree's own
  pyproject.toml (setuptools' package-dir map, as scripts/lint_imports.py stages
  it, plus the package data: the default model, kernels/*.cpp, the protos) into
  one `rmserve/` folder. Both sides are staged the same way, so the only
  difference between them is the code.
- Each server is `python -m rmserve.service.cli serve` (its `main`, behind a
  prelude that reports what it imported) with the same venv python, the staged
  folder first on PYTHONPATH, the same model, dtype, thread settings and flags,
  its own empty registry, metrics off, on a port picked here. The editable
  install's finder sits after PathFinder on sys.meta_path, so PYTHONPATH wins;
  the prelude prints `rmserve.__file__` and a server that imported rmserve from
  anywhere but its staged copy is refused.
- One client process (this one) drives one server at a time; the other sits idle
  (its CPU time during the other's passes is measured and reported). After both
  are SERVING, each gets one untimed full pass of every workload (warm-up, and
  the check that both return the same scores for the same inputs), then
  `rounds` rounds: every workload on both sides, the side that goes first
  alternating per round.

Reported per workload: each round's wall time and server CPU time per side, the
best ratio (best new / best old), the median ratio (median / median), the
per-round paired ratios (median, min, max), how many rounds the new side was
slower, and each side's own spread over the rounds (max / min: the noise). A
ratio is time new / time old, so > 1 means the new code is slower. The verdict
is information, not an assertion: "slower beyond noise" only when both the best
and the median ratio exceed 1 by more than the larger of the two sides' spreads.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
INFO_TAG = "rmserve-before-after"  # a line tag on the child's stdout, not a variable
# Runs in the server's process before the CLI: says which rmserve and torch it imported and with
# how many threads, then serves exactly as `python -m rmserve.service.cli serve ...` would.
PRELUDE = (
    "import json, sys\n"
    "import rmserve, torch\n"
    f"print({INFO_TAG!r}, json.dumps({{'rmserve': rmserve.__file__, 'torch': torch.__version__, "
    "'threads': torch.get_num_threads(), 'interop_threads': torch.get_num_interop_threads()}), flush=True)\n"
    "from rmserve.service.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- #
# staging a tree as installed
# --------------------------------------------------------------------------- #

def stage(dest: Path, root: Path) -> Path:
    """Copy the package under `root` as setuptools installs it (its own pyproject.toml's
    package-dir map: every mapped folder's .py files, and the package data its globs name)
    into `dest/rmserve/...`; returns `dest`."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    if not isinstance(setup.get("packages"), list):
        raise SystemExit(f"before/after: {root}/pyproject.toml lists no [tool.setuptools] packages to stage")
    data = setup.get("package-data", {})
    for package in setup["packages"]:
        src = root / package_dir(package, setup.get("package-dir", {}))
        out = dest.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):
            shutil.copy2(f, out / f.name)
        for pattern in data.get(package, []):
            for f in src.glob(pattern):
                if f.is_file():
                    target = out / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
    return dest


def package_dir(package: str, mapping: dict[str, str]) -> str:
    """Where setuptools finds `package`: its package-dir entry, else its nearest mapped parent's
    folder joined with the rest of the name (a subpackage need not be listed)."""
    parts = package.split(".")
    for n in range(len(parts), -1, -1):  # n = 0: the root entry "" (a src layout)
        base = ".".join(parts[:n])
        if base in mapping:
            return "/".join(p for p in (mapping[base], *parts[n:]) if p)
    return "/".join(parts)


def git(*args: str, repo: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def resolve(ref: str, repo: Path = ROOT) -> str:
    """The full commit id `ref` names; a clear error when it names none."""
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", repo=repo)
    except subprocess.CalledProcessError:
        raise SystemExit(f"before/after: {ref!r} is not a commit in {repo}") from None


def export_ref(ref: str, dest: Path, repo: Path = ROOT) -> str:
    """The tree of commit `ref` extracted into `dest` (git archive: nothing to clean up in the
    repository afterwards); returns the full commit id."""
    commit = resolve(ref, repo)
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"before/after: git archive {commit} failed")
    return commit


def describe(commit: str, repo: Path = ROOT) -> str:
    """`<short id> <subject>` of a commit."""
    return git("log", "-1", "--format=%h %s", commit, repo=repo)


def checkout_state(repo: Path = ROOT) -> tuple[str, bool]:
    """HEAD's commit id and whether tracked files differ from it (the staged copy is the working tree)."""
    return git("rev-parse", "HEAD", repo=repo), bool(git("status", "--porcelain", "--untracked-files=no", repo=repo))


# --------------------------------------------------------------------------- #
# a server process per side
# --------------------------------------------------------------------------- #

def free_ports(n: int) -> list[int]:
    """n distinct free localhost ports (all held open while picking, so none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat; NaN elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Side:
    """One server: which code it runs, its process, its client, what it reported."""

    name: str              # "new" or "old"
    commit: str            # full commit id
    label: str             # how the report names the code
    staged: Path
    workdir: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    client: object = None
    info: dict = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    idle_cpu: float = 0.0  # its CPU seconds while the other side was driven
    scores: dict[str, np.ndarray] = field(default_factory=dict)   # the warm-up pass
    drift: dict[str, float] = field(default_factory=dict)         # max |round - warm-up| score

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        lines = []
        for name in ("stdout.log", "stderr.log"):
            p = self.workdir / name
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)


def server_command(model_dir: Path, dtype: str, port: int, registry: Path, extra: Sequence[str] = ()) -> list[str]:
    """`python -m rmserve.service.cli serve ...` (through PRELUDE), the flags both sides share."""
    return [sys.executable, "-c", PRELUDE, "serve", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", "-1", "--dtype", dtype, "--registry", str(registry), *extra]


def start(side: Side, model_dir: Path, dtype: str, port: int, threads: int | None,
          cpus: set[int] | None) -> None:
    """Start the side's server; returns at once (wait_serving waits)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(side.staged), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("PYTHONSAFEPATH", None)
    if threads:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    side.port = port
    side.workdir.mkdir(parents=True, exist_ok=True)
    cmd = server_command(model_dir, dtype, port, side.workdir / "registry")
    with open(side.workdir / "stdout.log", "w") as out, open(side.workdir / "stderr.log", "w") as err:
        side.proc = subprocess.Popen(
            cmd, cwd=side.workdir, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )


def wait_serving(side: Side, timeout: float) -> None:
    """Until the side's health is SERVING (SDK health check); then read and check what it imported."""
    from rmserve.client import RewardClient

    side.client = RewardClient(side.address, timeout=3600)
    end = time.monotonic() + timeout
    while not side.client.health(timeout=2.0):
        if side.proc.poll() is not None:
            raise RuntimeError(f"the {side.name} server ({side.label}) exited with {side.proc.returncode}:\n"
                               f"{side.log_tail()}")
        if time.monotonic() > end:
            raise RuntimeError(f"the {side.name} server not SERVING after {timeout:.0f} s:\n{side.log_tail()}")
        time.sleep(0.5)
    line = next((ln for ln in (side.workdir / "stdout.log").read_text().splitlines() if ln.startswith(INFO_TAG)), None)
    if line is None:
        raise RuntimeError(f"the {side.name} server printed no {INFO_TAG} line:\n{side.log_tail()}")
    side.info = json.loads(line[len(INFO_TAG):])
    if not Path(side.info["rmserve"]).resolve().is_relative_to(side.staged.resolve()):
        raise RuntimeError(f"the {side.name} server imported rmserve from {side.info['rmserve']}, "
                           f"not from its staged copy {side.staged}: the comparison would not be of its code")


def stop(side: Side) -> None:
    if side.client is not None:
        side.client.close()
    if side.proc is not None and side.proc.poll() is None:
        side.proc.terminate()
        try:
            side.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            side.proc.kill()
            side.proc.wait()


# --------------------------------------------------------------------------- #
# the rounds
# --------------------------------------------------------------------------- #

def drive(side: Side, other: Side, w, score: Callable) -> tuple[float, float, np.ndarray]:
    """One pass of workload `w` on `side`: wall seconds, the side's CPU seconds, the scores;
    the idle side's CPU time meanwhile is added to its idle_cpu."""
    idle0, cpu0 = cpu_seconds(other.proc.pid), cpu_seconds(side.proc.pid)
    t0 = time.perf_counter()
    scores = score(side.client, w)
    seconds = time.perf_counter() - t0
    other.idle_cpu += cpu_seconds(other.proc.pid) - idle0
    return seconds, cpu_seconds(side.proc.pid) - cpu0, scores


def run_rounds(sides: tuple[Side, Side], workloads: Sequence, score: Callable, rounds: int) -> None:
    """Warm-up (one untimed full pass per side and workload), then `rounds` interleaved rounds."""
    for side in sides:
        for w in workloads:
            side.scores[w.name] = score(side.client, w)
            side.drift[w.name] = 0.0
            print(f"  warm-up {side.name} {w.name} done", file=sys.stderr, flush=True)
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for w in workloads:
            for side in order:
                other = sides[1] if side is sides[0] else sides[0]
                seconds, cpu, scores = drive(side, other, w, score)
                side.times.setdefault(w.name, []).append(seconds)
                side.cpu.setdefault(w.name, []).append(cpu)
                side.drift[w.name] = max(side.drift[w.name], float(np.abs(scores - side.scores[w.name]).max()))
                print(f"  round {r + 1}/{rounds} {w.name} {side.name}: {seconds:.2f} s (server CPU {cpu:.2f} s)",
                      file=sys.stderr, flush=True)


@dataclass
class Summary:
    best: float            # best new / best old
    median: float          # median new / median old
    paired: list[float]    # per round new / old
    spread_new: float      # max / min of the new side's rounds
    spread_old: float
    cpu_median: float      # median server CPU time new / old

    @property
    def verdict(self) -> str:
        noise = max(self.spread_new, self.spread_old) - 1
        if self.best - 1 > noise and self.median - 1 > noise:
            return "slower beyond noise"
        if 1 - self.best > noise and 1 - self.median > noise:
            return "faster beyond noise"
        return "within noise"


def summarise(new: list[float], old: list[float], new_cpu: list[float], old_cpu: list[float]) -> Summary:
    """Ratios are new / old times (> 1: the new side is slower)."""
    med = statistics.median
    return Summary(min(new) / min(old), med(new) / med(old), [a / b for a, b in zip(new, old, strict=True)],
                   max(new) / min(new), max(old) / min(old), med(new_cpu) / med(old_cpu))


# --------------------------------------------------------------------------- #
# the whole comparison
# --------------------------------------------------------------------------- #

def compare(*, against: str, model_dir: Path, model_label: str, workloads: Sequence, score: Callable,
            rate: Callable, dtype: str, rounds: int, threads: int | None, cpus: set[int] | None,
            header: Sequence[str], command: Sequence[str], note: str | None, tmp: Path, t_start: float,
            ready_timeout: float = 1800.0) -> str:
    """Stage both sides, start both servers, run the rounds, return the markdown report.

    `score(client, w)` scores workload `w` through an SDK client and returns its scores;
    `rate(w, seconds)` formats its throughput.
    """
    head, dirty = checkout_state()
    old_commit = export_ref(against, tmp / "old-src")
    new = Side("new", head, f"this checkout's working tree, HEAD {describe(head)}"
               + (" + uncommitted changes" if dirty else ""), stage(tmp / "new-staged", ROOT), tmp / "new-server")
    old = Side("old", old_commit, f"{against} = {describe(old_commit)}", stage(tmp / "old-staged", tmp / "old-src"),
               tmp / "old-server")
    sides = (new, old)
    with ExitStack() as stack:
        for side, port in zip(sides, free_ports(2), strict=True):
            stack.callback(stop, side)
            start(side, model_dir, dtype, port, threads, cpus)
        for side in sides:
            wait_serving(side, ready_timeout)
            print(f"  [{time.perf_counter() - t_start:.0f} s] {side.name} server SERVING on {side.address}: rmserve from {side.info['rmserve']}, "
                  f"torch {side.info['torch']}, {side.info['threads']} threads", file=sys.stderr, flush=True)
        t_rounds = time.perf_counter()
        print(f"  [{t_rounds - t_start:.0f} s] warm-up and rounds", file=sys.stderr, flush=True)
        run_rounds(sides, workloads, score, rounds)
        rounds_s = time.perf_counter() - t_rounds
    return report(sides, workloads, rate=rate, against=against, model_label=model_label, dtype=dtype, rounds=rounds,
                  threads=threads, cpus=cpus, header=header, command=command, note=note, rounds_s=rounds_s,
                  wall=time.perf_counter() - t_start)


def report(sides: tuple[Side, Side], workloads: Sequence, *, rate: Callable, against: str, model_label: str,
           dtype: str, rounds: int, threads: int | None, cpus: set[int] | None, header: Sequence[str],
           command: Sequence[str], note: str | None, rounds_s: float, wall: float) -> str:
    new, old = sides
    threads_set = ", ".join(f"{k}={os.environ[k]}" for k in THREAD_VARS if os.environ.get(k))
    thread_line = (f"{threads} (OMP_NUM_THREADS and MKL_NUM_THREADS set for both servers)" if threads
                   else f"torch's default ({threads_set or 'no OMP/MKL thread variables set'})")
    lines = [
        f"# Before/after through gRPC: this checkout vs {against} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        *([f"**{note}**", ""] if note else []),
        f"- machine: {platform.platform()}; python {platform.python_version()}",
        *header,
        f"- new: {new.commit} ({new.label})",
        f"- old: {old.commit} ({old.label})",
        f"- servers: `rmserve.service.cli serve --dtype {dtype} --metrics-port -1` (each its own empty registry, "
        f"localhost port), each staged as installed from its own tree, one venv python; "
        f"rmserve imported from the staged copies (checked): new {new.info['rmserve']}, old {old.info['rmserve']}",
        f"- torch in the servers: new {new.info['torch']}, {new.info['threads']} threads "
        f"({new.info['interop_threads']} inter-op); old {old.info['torch']}, {old.info['threads']} threads "
        f"({old.info['interop_threads']} inter-op); threads: {thread_line}"
        + (f"; both pinned to CPUs {sorted(cpus)}" if cpus else ""),
        f"- model: {model_label}, dtype {dtype}",
        *[f"- {w.title}; {sum(map(len, w.seqs))} tokens sent" for w in workloads],
        f"- {rounds} timed rounds after one untimed full pass per server and workload; in each round every "
        "workload runs on both servers, one at a time (the idle one waits), the side going first alternating "
        "(new first in odd rounds); PPO through `score` on token ids, GRPO through `score_groups_many`",
        f"- command: `{shlex.join(['python', 'bench/bench_cpu.py', *command])}`",
        "",
        "Same work (the warm-up pass; num_tokens checked equal to the client's token ids on every pass):",
    ]
    for w in workloads:
        a, b = new.scores[w.name], old.scores[w.name]
        diff = float(np.abs(a - b).max())
        std = max(float(b.std()), 1e-12)
        lines.append(f"- {w.name}: max |score new - score old| = {diff:.3g} ({diff / std:.2e} x the old scores' std); "
                     f"largest change over the rounds: new {new.drift[w.name]:.3g}, old {old.drift[w.name]:.3g}")
    lines += ["", "Per round (wall seconds of one pass; server CPU seconds in brackets):", "",
              "| round | workload | new s | old s | new / old |", "| --- | --- | --- | --- | --- |"]
    for r in range(rounds):
        for w in workloads:
            tn, to = new.times[w.name][r], old.times[w.name][r]
            lines.append(f"| {r + 1} ({'new' if r % 2 == 0 else 'old'} first) | {w.name} | {tn:.3f} ({new.cpu[w.name][r]:.2f}) "
                         f"| {to:.3f} ({old.cpu[w.name][r]:.2f}) | {tn / to:.3f} |")
    lines += ["", "Ratios are time new / time old: > 1 means the new code is slower.", "",
              "| workload | new best | old best | best ratio | median ratio | paired ratios median [min, max] "
              "| new slower in | spread new / old (max/min) | server CPU median ratio | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in workloads:
        s = summarise(new.times[w.name], old.times[w.name], new.cpu[w.name], old.cpu[w.name])
        slower = sum(p > 1 for p in s.paired)
        lines.append(
            f"| {w.name} | {rate(w, min(new.times[w.name]))} | {rate(w, min(old.times[w.name]))} | {s.best:.3f} | "
            f"{s.median:.3f} | {statistics.median(s.paired):.3f} [{min(s.paired):.3f}, {max(s.paired):.3f}] | "
            f"{slower}/{rounds} rounds | {s.spread_new:.3f} / {s.spread_old:.3f} | {s.cpu_median:.3f} | {s.verdict} |")
    lines += [
        "",
        f"Idle server's CPU time while the other was driven: new {new.idle_cpu:.2f} s, old {old.idle_cpu:.2f} s "
        f"(over {rounds_s:.0f} s of rounds).",
        "The verdict is information, not an assertion: \"slower beyond noise\" when both the best and the median "
        "ratio exceed 1 by more than the larger spread.",
        "",
        f"total wall time {wall:.0f} s",
    ]
    return "\n".join(lines)
