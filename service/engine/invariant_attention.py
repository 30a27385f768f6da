"""Batch-invariant attention: a sequence's output bits do not depend on what it is batched with.

Why: in bf16 every rounding is a fork in the road. sdpa's kernels block the
key axis by the padded length, so a sequence padded in a batch, packed in a
stream, scored alone or as a GRPO suffix over a cached prompt reduces in a
different order; the 1e-7 differences flip bf16 roundings in the next layer and
30 layers amplify them to ~0.08 x the score std (bench/results/). The linear
layers are already invariant (oneDNN's bf16 GEMM gives a row the same bits
for any row count), so attention is the one place to fix.

How: a row's bits must depend only on its absolute position and its own
sequence. Queries go in blocks of BLOCK rows at absolute positions 0, BLOCK,
2·BLOCK, ... (a KV-cache call is padded in front to that grid), and block i is
one sdpa call over keys [0, (i+1)·BLOCK), with a mask for causality, the
sequence's length and an optional sliding window. The call's shapes, and with
them the kernel's blocking and reduction order, are then a function of i
alone; keys a row cannot see get weight exactly 0. So a row computes the same
bits in a padded batch, a packed stream, alone, or after a KV cache
(tests/test_invariant_attention.py checks it bit for bit). The same FLOPs as
causal attention up to the block edge and, measured, as fast as one masked
sdpa call over the padded batch (bench/results/).

Where the fixed-order CPU kernel builds (rmserve.kernels.cpu_attention: float32
on CPU with a C++ compiler at hand), it computes every call instead: its rows
reduce in a fixed order by construction, so no query grid is needed. A GRPO
completion's rows then cost only their own keys, padding rows of a batch are
skipped, and a packed stream is attended in place (no gather into padded rows).
Measured 1.2-1.9x sdpa's causal kernel and 1.3-2.1x this grid on the default's
heads (bench/results/cpu-attention-kernel-2026-12-06.md). The grid serves wherever
the kernel cannot (no compiler or no AVX, RMSERVE_CPU_ATTENTION=0, CUDA, inside a
trace); the two are each invariant, but not bitwise equal to each other.

Registered in transformers' AttentionInterface under ATTN_NAME, with a mask
function that hands the 2-D padding mask through untouched (right padding:
valid keys are a prefix), so any decoder written against the interface runs on it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from rmserve.kernels import cpu_attention
from rmserve.service.engine import varlen

ATTN_NAME = varlen.INVARIANT_NAME
BLOCK = 64


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int,
    k_len: torch.Tensor,
    *,
    scaling: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of N rows of queries over their own keys, one fixed-shape call per query block.

    q [N, Hq, Tq, d] at absolute positions q_offset .. q_offset + Tq - 1 (the
    same in every row); k, v [N, Hkv, Tk, d] at positions 0..Tk-1, of which the
    first k_len [N] are valid. -> [N, Hq, Tq, d] in q's dtype.
    """
    n, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    lead = q_offset % BLOCK               # blocks start at absolute multiples of BLOCK, also after a KV cache
    first = q_offset - lead
    nq = -(-(lead + tq) // BLOCK)
    span = first + nq * BLOCK             # keys the last block's rows may need
    q = F.pad(q, (0, 0, lead, nq * BLOCK - lead - tq))
    k = F.pad(k, (0, 0, 0, max(0, span - tk)))
    v = F.pad(v, (0, 0, 0, max(0, span - tk)))
    out = q.new_empty(n, hq, nq * BLOCK, d)
    valid_len = k_len.view(n, 1, 1, 1)
    rows = torch.arange(BLOCK, device=q.device).view(BLOCK, 1)
    for i in range(nq):
        end = first + (i + 1) * BLOCK
        pos = first + i * BLOCK + rows
        j = torch.arange(end, device=q.device).view(1, end)
        # [N, 1, BLOCK, end]. A padding row past its window sees no key: torch's sdpa gives it zeros,
        # not NaN (a NaN there would reach real rows as 0 x NaN in the next layer; the tests would see it)
        visible = (j <= pos) & (j < valid_len)
        if window is not None:
            visible &= j > pos - window
        block = slice(i * BLOCK, (i + 1) * BLOCK)
        out[:, :, block] = F.scaled_dot_product_attention(
            q[:, :, block], k[:, :, :end], v[:, :, :end], attn_mask=visible, scale=scaling, enable_gqa=hq != hkv
        )
    return out[:, :, lead : lead + tq]


def _on_kernel(query, key, value, seqs: torch.Tensor, scaling: float, window: int | None,
               out: torch.Tensor) -> torch.Tensor:
    """The CPU kernel, writing straight into `out` [B, T, Hq, D] (the layout HF expects back)."""
    cpu_attention.attention(query, key, value, seqs, scale=scaling, window=window, out=out.transpose(1, 2))
    return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def invariant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: query [B, Hq, T, D], key/value [B, Hkv, S, D] -> [B, T, Hq, D].

    Three kinds of call: a packed stream (cu_seq_lens_q), a right-padded batch
    (2-D mask [B, S]) and a KV-cache step (S > T: the queries are the last T positions).
    """
    if softcap is not None:
        raise NotImplementedError(f"{ATTN_NAME} does not support attention logit softcapping (Gemma2-style models)")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dtype = query.dtype
    # inside a trace (torch.compile of a caller, torch.export) the grid's plain ops, not the opaque kernel
    kernel = not torch.compiler.is_compiling() and cpu_attention.supports(query, key, value)
    if cu_seq_lens_q is not None and kernel:   # every row is some sequence's
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        return _on_kernel(query, key, value, cpu_attention.packed_seqs(cu_seq_lens_q.tolist()), scaling,
                          sliding_window, out), None
    if cu_seq_lens_q is not None:
        out = _packed(query, key, value, cu_seq_lens_q.tolist(), scaling, sliding_window)
        return out.to(dtype), None
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    if attention_mask is None:
        k_len = torch.full((b,), tk, device=query.device)
    elif attention_mask.dim() == 2:
        k_len = attention_mask[:, :tk].to(torch.long).sum(1)
    else:
        raise ValueError(f"{ATTN_NAME} takes a 2-D padding mask [B, S] (its mask function passes it through), "
                         f"got shape {tuple(attention_mask.shape)}")
    if kernel:   # padding rows are not computed: they stay 0
        out = query.new_zeros(b, tq, query.shape[1], query.shape[3])
        return _on_kernel(query, key, value, cpu_attention.padded_seqs(k_len, tq, tk - tq), scaling,
                          sliding_window, out), None
    out = block_attention(query, key, value, tk - tq, k_len, scaling=scaling, window=sliding_window)
    return out.transpose(1, 2).to(dtype), None


def _packed(query, key, value, cu: list[int], scaling: float, window: int | None) -> torch.Tensor:
    """[1, H, T_total, D] stream -> per-sequence rows -> block_attention -> [1, T_total, H, D]."""
    lengths = [e - s for s, e in itertools.pairwise(cu)]
    t = max(lengths)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([_pad(x[0, :, s:e], 1, t) for s, e in itertools.pairwise(cu)])

    k_len = torch.tensor(lengths, device=query.device)
    out = block_attention(rows(query), rows(key), rows(value), 0, k_len, scaling=scaling, window=window)
    stream = torch.cat([out[i, :, :n] for i, n in enumerate(lengths)], dim=1)   # [H, T_total, D]
    return stream.transpose(0, 1)[None]


def _mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Pass the 2-D padding mask through: the attention function reads lengths from it."""
    return attention_mask


def register() -> str:
    """Register the attention and its mask function under ATTN_NAME (idempotent); returns the name."""
    return varlen.register_attention(ATTN_NAME, invariant_attention_forward, _mask)


def packs_in_place() -> bool:
    """Whether a packed stream is attended as it is (the CPU kernel), not gathered into padded rows."""
    return cpu_attention.available()


def enable(model: torch.nn.Module) -> bool:
    """Switch `model` to the invariant attention if it is a causal decoder on sdpa through AttentionInterface."""
    if not varlen.supports_packing(model):
        return False
    if any(getattr(m, "is_causal", True) is False for m in model.modules()):
        return False   # an encoder (BERT-style): its attention is bidirectional, this one is causal
    model.set_attn_implementation(register())
    return model.config._attn_implementation == ATTN_NAME
