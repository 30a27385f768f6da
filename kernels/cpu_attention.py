"""Fixed-order causal attention on CPU: kernel build, launcher and torch reference side by side.

The kernel (cpu_attention.cpp) computes every query row with the same
arithmetic in the same order whatever else is in the call, so it needs no grid
of padded query blocks to be batch-invariant: a GRPO completion's rows cost
only their own keys. docs/kernels.md describes it.

Build: one `c++ -O3 -march=native` of the .cpp against torch's headers
(RMSERVE_KERNEL_MARCH overrides the target: x86-64-v3 for an AVX2-only build on
an AVX-512 machine, say) into a cache keyed by the source, torch, the command
and the CPU's flags
(RMSERVE_KERNEL_CACHE, default ~/.cache/rmserve/kernels; a new build removes those
unused for 30 days), at install time
(scripts/setup.sh runs `python -m rmserve.kernels.cpu_attention`) or on first
use. Where it cannot be built (no compiler, RMSERVE_CPU_ATTENTION=0), `available()`
is False, `unavailable_reason()` says why, and the engine keeps its sdpa path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
KEY_BLOCK = 32                           # the kernel's KB: kt is padded to whole key blocks
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)   # the kernel's instantiations; others are zero-padded up
MIN_LANES = 8   # float lanes per vector: AVX (8) and AVX-512 (16) builds beat sdpa; 128-bit (SSE, NEON) ones did not


@dataclass(frozen=True)
class KernelSettings:
    """The kernel's environment knobs, read in one place (the kernels may not import the engine's
    settings; docs/configuration.md lists both). Read when the kernel builds or loads."""

    enabled: bool = True
    """RMSERVE_CPU_ATTENTION (default 1; 0: never build or load the kernel, the sdpa paths serve)."""
    march: str = "native"
    """RMSERVE_KERNEL_MARCH (default native): the -march of the build (x86-64-v3: an AVX2-only build)."""
    cache: Path | None = None
    """RMSERVE_KERNEL_CACHE (default ~/.cache/rmserve/kernels): where builds are kept."""

    @classmethod
    def from_env(cls) -> KernelSettings:
        env = os.environ
        return cls(
            enabled=env.get("RMSERVE_CPU_ATTENTION", "1") != "0",
            march=env.get("RMSERVE_KERNEL_MARCH") or "native",
            cache=Path(env.get("RMSERVE_KERNEL_CACHE") or Path.home() / ".cache" / "rmserve" / "kernels"),
        )


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _command(cxx: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return [
        cxx, "-O3", f"-march={KernelSettings.from_env().march}", "-std=c++20", "-shared", "-fPIC", "-ffp-contract=fast", "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        str(SOURCE), "-o", str(out), f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu",
    ]


def _cache_dir() -> Path:
    return KernelSettings.from_env().cache


def build() -> Path:
    """Compile the kernel if this source/torch/compiler/CPU has no build yet; returns the library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *version, _cpu_flags(),
                                    " ".join(_command(cxx, Path("x")))]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_attention-{key}.so"
    if target.exists():
        with contextlib.suppress(OSError):  # a read-only cache (an image, another user's) serves as it is
            os.utime(target)                # in use: kept by _prune
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # a private name, then an atomic rename: processes building at once never load a half-written file
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(_command(cxx, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}:\n{done.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", target)
    _prune(target)
    return target


KEEP_UNUSED_DAYS = 30
_TMP_PREFIX = ".cpu_attention-building-"


def _prune(keep: Path) -> None:
    """Drop builds no process has loaded for KEEP_UNUSED_DAYS (other sources, torch versions,
    CPUs): each is a ~10 s rebuild away, and without this a cache gains one per upgrade.
    A library a running process has loaded stays mapped after its file is gone."""
    cutoff = time.time() - KEEP_UNUSED_DAYS * 86400
    # only this module's builds and the temporary files of builds killed midway: the cache
    # directory is the operator's choice and may hold other libraries
    for f in [*keep.parent.glob("cpu_attention-*.so"), *keep.parent.glob(f"{_TMP_PREFIX}*.so")]:
        with contextlib.suppress(OSError):
            if f != keep and f.stat().st_mtime < cutoff:
                f.unlink()
                log.info("removed %s (unused for %d days)", f, KEEP_UNUSED_DAYS)


@functools.cache
def _load() -> str | None:
    """Build and load the op once per process; None if it loaded, else why not."""
    if not KernelSettings.from_env().enabled:
        return "disabled by RMSERVE_CPU_ATTENTION=0"
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("fixed-order CPU attention unavailable, sdpa serves instead: %s", e)
        return str(e)
    lanes = torch.ops.rmserve_cpu.vector_lanes()
    if lanes < MIN_LANES:
        why = f"built for {lanes}-lane vectors (no AVX): sdpa is faster there (measured 0.66x of sdpa)"
        log.warning("fixed-order CPU attention not used: %s", why)
        return why
    return None


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def _head_pad(d: int) -> int:
    return next((w for w in HEAD_DIMS if w >= d), 0)


def supports(*qkv: torch.Tensor) -> bool:
    """Whether the kernel can run a call on these tensors (q, k, v): all float32 on CPU, head dim <= 256."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in qkv)
            and _head_pad(qkv[0].shape[-1]) > 0 and available())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqs: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's query rows over its own keys.

    q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] (Hq a multiple of Hkv: grouped-query
    heads share a key head); seqs int64 [S, 6] rows (b, q_tok0, q_count, pos0,
    k_tok0, k_count): query i of a sequence is token q_tok0 + i of batch row b at
    absolute position pos0 + i and sees its keys k_tok0 + j for j <= pos0 + i,
    j < k_count (and j > pos0 + i - window). Writes into `out` (any strides with
    D contiguous, e.g. a transposed [B, Tq, Hq, D]) or a new [B, Hq, Tq, D];
    rows no sequence covers are left as they were.
    """
    d = q.shape[-1]
    dp = _head_pad(d)
    if dp != d:   # zero columns add exact zeros to every dot product
        q, k, v = (F.pad(t, (0, dp - d)) for t in (q, k, v))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    # K transposed, and padded so every key block the kernel loads lies inside it
    kt = F.pad(k.transpose(2, 3), (0, KEY_BLOCK)).contiguous()
    if out is None:
        out = q.new_empty(*q.shape[:-1], d)
    if out.stride(-1) != 1:
        raise ValueError("out must have a contiguous head dimension")
    target = out if dp == d else F.pad(out, (0, dp - d))   # a padded copy keeps the rows no sequence covers
    torch.ops.rmserve_cpu.fixed_order_attention(q, kt, v, target, seqs, float(scale), int(window or 0))
    if target is not out:
        out.copy_(target[..., :d])
    return out


def padded_seqs(k_len: torch.Tensor, q_len: int, q_offset: int) -> torch.Tensor:
    """seqs for a right-padded batch: row b's queries 0..q_len-1 at positions q_offset.., its first k_len[b] keys.

    Query rows at or past a row's key count are padding and are not computed.
    """
    k_len = k_len.to(torch.long).cpu()
    n = k_len.numel()
    q_count = (k_len - q_offset).clamp(0, q_len)
    zeros = torch.zeros(n, dtype=torch.long)
    return torch.stack([torch.arange(n), zeros, q_count, torch.full((n,), q_offset), zeros, k_len], 1)


def packed_seqs(cu: list[int]) -> torch.Tensor:
    """seqs for a packed stream [1, H, T, D] with sequence boundaries cu (positions restart at 0)."""
    rows = [(0, s, e - s, 0, s, e - s) for s, e in itertools.pairwise(cu)]
    return torch.tensor(rows, dtype=torch.long).view(-1, 6)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: torch.Tensor, *, scale: float,
              window: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same attention in plain torch (float64 by default), one sequence and head at a time; zeros elsewhere."""
    out = torch.zeros(q.shape, dtype=dtype)
    group = q.shape[1] // k.shape[1]
    for b, q0, nq, pos0, k0, nk in seqs.tolist():
        if nq == 0:
            continue
        pos = torch.arange(pos0, pos0 + nq)[:, None]
        j = torch.arange(nk)[None, :]
        visible = (j <= pos) & (j > pos - window) if window else j <= pos
        for h in range(q.shape[1]):
            qs = q[b, h, q0:q0 + nq].to(dtype)
            ks = k[b, h // group, k0:k0 + nk].to(dtype)
            vs = v[b, h // group, k0:k0 + nk].to(dtype)
            s = (qs @ ks.T * scale).masked_fill(~visible, float("-inf"))
            w = torch.softmax(s, -1).nan_to_num(0.0)     # a row that sees no key: zeros, as the kernel gives
            out[b, h, q0:q0 + nq] = w @ vs
    return out


def main() -> int:
    """`python -m rmserve.kernels.cpu_attention`: build now (install time), print where or why not."""
    logging.basicConfig(level=logging.INFO)
    try:
        print(build())
    except RuntimeError as e:
        print(f"not built: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
