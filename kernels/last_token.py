"""Fused last-token scoring: gather -> K heads -> mean/var/min/epistemic.

One file holds the Triton kernel, its launcher, the torch reference and the
dispatcher (Liger-Kernel style). docs/kernels.md describes the design.

Dispatch (`last_token_scores`): the Triton kernel when `hidden` is on CUDA, or on
CPU when TRITON_INTERPRET=1 is set at call time (the Triton interpreter runs the
kernel itself, which is how CI tests it); otherwise, or where triton is not
installed (macOS client installs), the torch reference.

No `conservative` (mean - lam * var) here: lam is chosen per request, while one
launch spans many requests' samples, so the server applies it per request
(service/server/requests.py `result_pb`) from `mean` and `var`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # no triton (e.g. macOS client installs): the torch reference serves
    triton = None

MAX_HEADS = 16
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Tile sizes. Heads are padded to 16 because tl.dot needs every dimension >= 16
# (and K <= 16, so one size fits all K and there is one compilation). The others
# are first choices that no GPU has tuned yet (see docs/kernels.md).
_K_PAD = 16
_BLOCK_H = 128   # hidden chunk of the head loop: 16 rows x 128 bf16 = 4 KiB per load
_BLOCK_HU = 64   # hidden chunk of the e @ L loop
_BLOCK_N = 64    # output columns of e @ L per program


@dataclass
class LastTokenScores:
    """Per sequence, over the K heads of this launch (one ensemble member: the engine
    combines members' statistics exactly, service/engine/heads.py combine_member_stats)."""

    rewards: torch.Tensor              # [B, K] float32
    mean: torch.Tensor                 # [B]
    var: torch.Tensor                  # [B] population variance over heads
    min: torch.Tensor                  # [B]
    epistemic: torch.Tensor | None     # [B] ||L^T e||, or None


# --------------------------------------------------------------------------- #
# Triton kernel
# --------------------------------------------------------------------------- #

def _add(a, b):
    return a + b


def _minimum(a, b):
    return tl.minimum(a, b)


if triton is not None:
    # The kernel reduces with these rather than tl.sum/tl.min: those are @triton.jit
    # objects built when triton.language is first imported, in the TRITON_INTERPRET
    # mode of that moment, and a kernel built in the other mode cannot call them.
    # Plain JITFunctions serve as reduce combiners in both modes.
    _add = JITFunction(_add)
    _minimum = JITFunction(_minimum)


def _last_token_kernel(
    hidden_ptr, ends_ptr, weight_ptr, bias_ptr, unc_ptr,
    rewards_ptr, mean_ptr, var_ptr, min_ptr, epi_ptr,
    partial_ptr, ticket_ptr,
    B, K, H, n_col_tiles,
    stride_hb, stride_ht, stride_hh, stride_end,
    stride_wk, stride_wh, stride_bias, stride_ur, stride_uc,
    HAS_UNC: tl.constexpr, UNC_NATIVE_DOT: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HU: tl.constexpr,
    BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
):
    """Program (i, j) owns sequences [i*BLOCK_B, (i+1)*BLOCK_B).

    Column 0 of the grid computes the heads and their statistics. With an
    uncertainty factor every program j also computes columns
    [j*BLOCK_N, (j+1)*BLOCK_N) of e @ L and their sum of squares; the last
    program of a row block to finish (a ticket counter) adds the partial sums
    in a fixed order and writes the square root, so the result is deterministic.

    The last token of sequence b sits at row ends[b] - 1, where ends is lengths
    (padded, stride_hb = hidden.stride(0)) or cu_seqlens[1:] (packed,
    stride_hb = 0). All hidden offsets are int64: B*T*H passes 2**31.
    """
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ends = tl.load(ends_ptr + rows64 * stride_end, mask=row_ok, other=1).to(tl.int64)
    row_ptrs = hidden_ptr + rows64 * stride_hb + (ends - 1) * stride_ht

    if pid_n == 0:
        heads = tl.arange(0, K_PAD)
        head_ok = heads < K
        acc = tl.full([BLOCK_B, K_PAD], 0.0, tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            col_ok = cols < H
            e = tl.load(row_ptrs[:, None] + cols[None, :] * stride_hh,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + heads[None, :] * stride_wk + cols[:, None] * stride_wh,
                        mask=col_ok[:, None] & head_ok[None, :], other=0.0)
            # fp32 operands: the heads are memory-bound, so the extra MMAs of the
            # near-fp32 "tf32x3" mode cost nothing and fp32 weights keep their precision.
            acc = tl.dot(e.to(tl.float32), w.to(tl.float32), acc, input_precision=FP32_PRECISION)
        bias = tl.load(bias_ptr + heads * stride_bias, mask=head_ok, other=0.0).to(tl.float32)
        rewards = acc + bias[None, :]
        mean = tl.reduce(tl.where(head_ok[None, :], rewards, 0.0), 1, _add) / K
        dev = tl.where(head_ok[None, :], rewards - mean[:, None], 0.0)
        var = tl.reduce(dev * dev, 1, _add) / K
        low = tl.reduce(tl.where(head_ok[None, :], rewards, float("inf")), 1, _minimum)
        tl.store(rewards_ptr + rows64[:, None] * K + heads[None, :], rewards,
                 mask=row_ok[:, None] & head_ok[None, :])
        tl.store(mean_ptr + rows64, mean, mask=row_ok)
        tl.store(var_ptr + rows64, var, mask=row_ok)
        tl.store(min_ptr + rows64, low, mask=row_ok)

    if HAS_UNC:
        out_cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        out_ok = out_cols < H
        acc_u = tl.full([BLOCK_B, BLOCK_N], 0.0, tl.float32)
        for h0 in range(0, H, BLOCK_HU):
            cols = (h0 + tl.arange(0, BLOCK_HU)).to(tl.int64)
            col_ok = cols < H
            e = tl.load(row_ptrs[:, None] + cols[None, :] * stride_hh,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            u = tl.load(unc_ptr + cols[:, None] * stride_ur + out_cols[None, :] * stride_uc,
                        mask=col_ok[:, None] & out_ok[None, :], other=0.0)
            if UNC_NATIVE_DOT:  # e and L share a 16-bit dtype: full tensor-core rate
                acc_u = tl.dot(e, u, acc_u)
            else:
                acc_u = tl.dot(e.to(tl.float32), u.to(tl.float32), acc_u,
                               input_precision=FP32_PRECISION)
        partial_ptrs = partial_ptr + rows64
        tl.store(partial_ptrs + pid_n * B, tl.reduce(acc_u * acc_u, 1, _add), mask=row_ok)
        # Publish the partial sums before taking a ticket: the barrier orders every
        # thread's stores before the acq_rel atomic (the pattern of CUDA's grid sync);
        # the last program reads them at L2 (.cg), past any stale L1 line.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_b, 1, sem="acq_rel")
        if ticket == n_col_tiles - 1:
            total = tl.full([BLOCK_B], 0.0, tl.float32)
            for j in range(0, n_col_tiles):
                total += tl.load(partial_ptrs + j * B, mask=row_ok, other=0.0, cache_modifier=".cg")
            tl.store(epi_ptr + rows64, tl.sqrt(total), mask=row_ok)


@functools.cache
def _kernel(interpret: bool):
    """The kernel, built on first use in the requested mode.

    triton.jit picks the interpreter or the compiler from TRITON_INTERPRET when it
    decorates, so a module-level @triton.jit would freeze the mode at import.
    Building both kinds explicitly lets the mode follow the environment at call time.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_last_token_kernel)
    return JITFunction(_last_token_kernel)


def _interpret_requested() -> bool:
    """TRITON_INTERPRET, parsed as triton parses it, read now rather than at import."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _output_shapes(batch: int, heads: int, has_unc: bool) -> dict[str, tuple[int, ...] | None]:
    return {
        "rewards": (batch, heads), "mean": (batch,), "var": (batch,), "min": (batch,),
        "epistemic": (batch,) if has_unc else None,
    }


def _check_out(out: LastTokenScores, shapes: dict, device: torch.device) -> None:
    for name, shape in shapes.items():
        t = getattr(out, name)
        if shape is None:
            if t is not None:
                raise ValueError(f"out.{name} must be None without unc_factor")
        elif (t is None or tuple(t.shape) != shape or t.dtype != torch.float32
              or t.device != device or not t.is_contiguous()):
            raise ValueError(f"out.{name} must be a contiguous float32 tensor of shape {shape} on {device}")


def last_token_scores_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    unc_factor: torch.Tensor | None = None,
    out: LastTokenScores | None = None,
) -> LastTokenScores:
    """Launch the Triton kernel; arguments as for `last_token_scores`, which validates them.

    This launcher checks nothing that needs the device (no host sync), so with
    preallocated `out` buffers (contiguous float32, written in full) it can be
    captured in a CUDA graph. It needs CUDA tensors, or TRITON_INTERPRET=1.
    With unc_factor it also allocates a [n_col_tiles, B] float32 workspace and
    zero-fills a ticket counter per row block. Inference only: no autograd.
    """
    if lengths is not None:
        ends = lengths
        stride_hb, stride_ht, stride_hh = hidden.stride()
    else:
        ends = cu_seqlens[1:]
        stride_hb, (stride_ht, stride_hh) = 0, hidden.stride()
    batch, (heads, hidden_size) = ends.shape[0], weight.shape
    has_unc = unc_factor is not None
    shapes = _output_shapes(batch, heads, has_unc)
    if out is None:
        out = LastTokenScores(**{
            name: None if shape is None else torch.empty(shape, dtype=torch.float32, device=hidden.device)
            for name, shape in shapes.items()
        })
    else:
        _check_out(out, shapes, hidden.device)

    # 16 rows per program keeps >= 256 programs from B = 4096 on; past that, 32
    # rows halve how often each program re-reads W (and L) from L2.
    block_b = 16 if batch < 4096 else 32
    n_row_blocks = triton.cdiv(batch, block_b)
    n_col_tiles = triton.cdiv(hidden_size, _BLOCK_N) if has_unc else 1
    partial = ticket = None
    ur = uc = 0
    if has_unc:
        partial = torch.empty((n_col_tiles, batch), dtype=torch.float32, device=hidden.device)
        ticket = torch.zeros(n_row_blocks, dtype=torch.int32, device=hidden.device)
        ur, uc = unc_factor.stride()
    interpret = _interpret_requested()
    # The interpreter multiplies bf16 operands of tl.dot as raw uint16 bits (triton
    # 3.9), so under it e @ L always takes the fp32 path.
    unc_native = (has_unc and not interpret and hidden.dtype != torch.float32
                  and unc_factor.dtype == hidden.dtype)
    device_ctx = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
    with device_ctx:
        _kernel(interpret)[(n_row_blocks, n_col_tiles)](
            hidden, ends, weight, bias, unc_factor,
            out.rewards, out.mean, out.var, out.min, out.epistemic,
            partial, ticket,
            batch, heads, hidden_size, n_col_tiles,
            stride_hb, stride_ht, stride_hh, ends.stride(0),
            weight.stride(0), weight.stride(1), bias.stride(0), ur, uc,
            HAS_UNC=has_unc, UNC_NATIVE_DOT=unc_native,
            FP32_PRECISION="ieee" if torch.version.hip else "tf32x3",  # ROCm lacks tf32x3
            BLOCK_B=block_b, BLOCK_H=_BLOCK_H, BLOCK_HU=_BLOCK_HU, BLOCK_N=_BLOCK_N, K_PAD=_K_PAD,
        )
    return out


# --------------------------------------------------------------------------- #
# Reference, validation, dispatch
# --------------------------------------------------------------------------- #

def _last_index(hidden: torch.Tensor, lengths: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    if cu_seqlens is not None:
        if hidden.ndim != 2:
            raise ValueError("with cu_seqlens, hidden must be packed [T_total, H]")
        return cu_seqlens[1:].long() - 1
    if lengths is None or hidden.ndim != 3:
        raise ValueError("give hidden [B, T, H] with lengths [B], or hidden [T_total, H] with cu_seqlens [B+1]")
    return lengths.long() - 1


def last_token_scores_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    unc_factor: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> LastTokenScores:
    """Plain torch; `compute_dtype=torch.float64` makes it the test oracle."""
    idx = _last_index(hidden, lengths, cu_seqlens)
    if cu_seqlens is not None:
        last = hidden[idx]
    else:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    e = last.to(compute_dtype)
    rewards = e @ weight.to(compute_dtype).T + bias.to(compute_dtype)
    epistemic = None
    if unc_factor is not None:
        epistemic = (e @ unc_factor.to(compute_dtype)).norm(dim=1)
    out_dtype = torch.float32 if compute_dtype != torch.float64 else torch.float64
    return LastTokenScores(
        rewards=rewards.to(out_dtype),
        mean=rewards.mean(dim=1).to(out_dtype),
        var=rewards.var(dim=1, unbiased=False).to(out_dtype),
        min=rewards.min(dim=1).values.to(out_dtype),
        epistemic=None if epistemic is None else epistemic.to(out_dtype),
    )


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lengths: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    unc_factor: torch.Tensor | None,
) -> None:
    """Raise ValueError on anything the kernel would read out of bounds or misread.

    The last check looks at the values of lengths / cu_seqlens: one host sync on
    CUDA. Callers that must not sync use last_token_scores_triton directly.
    """
    if (lengths is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of lengths (hidden [B, T, H]) or cu_seqlens (hidden [T_total, H])")
    index = lengths if lengths is not None else cu_seqlens
    if index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"lengths / cu_seqlens must be int32 or int64, got {index.dtype}")
    if lengths is not None:
        if hidden.ndim != 3:
            raise ValueError(f"with lengths, hidden must be padded [B, T, H], got shape {tuple(hidden.shape)}")
        batch, tokens, hidden_size = hidden.shape
        if tuple(lengths.shape) != (batch,) or batch < 1:
            raise ValueError(f"lengths must have shape [B] = [{batch}] with B >= 1, got {tuple(lengths.shape)}")
    else:
        if hidden.ndim != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed [T_total, H], got shape {tuple(hidden.shape)}")
        tokens, hidden_size = hidden.shape
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must have shape [B+1] with B >= 1, got {tuple(cu_seqlens.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight must be [K, H] with H = {hidden_size}, got {tuple(weight.shape)}")
    heads = weight.shape[0]
    if not 1 <= heads <= MAX_HEADS:
        raise ValueError(f"the kernel supports 1 to {MAX_HEADS} heads, got K = {heads}")
    if tuple(bias.shape) != (heads,):
        raise ValueError(f"bias must be [K] = [{heads}], got {tuple(bias.shape)}")
    if unc_factor is not None and tuple(unc_factor.shape) != (hidden_size, hidden_size):
        raise ValueError(f"unc_factor must be [H, H] = [{hidden_size}, {hidden_size}], got {tuple(unc_factor.shape)}")
    floats = {"hidden": hidden, "weight": weight, "bias": bias, "unc_factor": unc_factor}
    for name, t in {**floats, "lengths / cu_seqlens": index}.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    for name, t in floats.items():
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if lengths is not None:
        bad = bool(((lengths < 1) | (lengths > tokens)).any())
        what = f"every length must be in [1, T = {tokens}]"
    else:
        bad = bool((cu_seqlens[0] < 0) | (cu_seqlens[-1] > tokens) | (cu_seqlens.diff() < 1).any())
        what = f"cu_seqlens must start at >= 0, grow by >= 1 per sequence and end at <= T_total = {tokens}"
    if bad:
        raise ValueError(what)


def _use_kernel(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpret_requested())


def last_token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    unc_factor: torch.Tensor | None = None,
) -> LastTokenScores:
    """Rewards and ensemble statistics at each sequence's last real token.

    hidden is [B, T, H] right-padded with `lengths` [B], or packed [T_total, H]
    with `cu_seqlens` [B+1]; any strides. reward_k = e . weight_k + bias_k (a served model's
    normalisation is folded into its heads at load, service/engine/heads.py).
    Runs the Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1), else the
    torch reference; both validate the arguments the same way.
    """
    _validate(hidden, weight, bias, lengths, cu_seqlens, unc_factor)
    args = dict(lengths=lengths, cu_seqlens=cu_seqlens, unc_factor=unc_factor)
    if _use_kernel(hidden.device):
        return last_token_scores_triton(hidden, weight, bias, **args)
    return last_token_scores_reference(hidden, weight, bias, **args)
