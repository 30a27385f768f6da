"""Batch-invariant attention: a sequence's output bits do not depend on what it is batched with.

Why: in bf16 every rounding is a fork in the road. sdpa's kernels block the
key axis by the padded length, so a sequence padded in a batch, packed in a
stream, scored alone or as a GRPO suffix over a cached prompt reduces in a
different order; the 1e-7 differences flip bf16 roundings in the next layer and
30 layers amplify them to ~0.08 x the score std (bench/results/). The linear
layers are already invariant (oneDNN's bf16 GEMM gives a row the same bits
for any row count), so attention is the one place to fix.

How: every query row is computed from the same fixed-shape pieces whatever
the call. Queries go in blocks of BLOCK rows, keys in chunks of BLOCK at
absolute positions 0, BLOCK, 2·BLOCK, ...; each (block, chunk) is one
[BLOCK, d] x [d, BLOCK] matmul, and an online softmax folds the chunks in
increasing order. A chunk a row cannot see is an exact no-op (its scores are
-inf, its weight exp(-inf) = 0, the rescale exp(0) = 1), so a row's bits depend
only on its own sequence: the same whether the row sits in a padded batch, a
packed stream, alone, or after a KV cache. Float32 throughout; causal, with
optional sliding window. Costs about twice sdpa's attention FLOPs (whole
blocks), a few percent of a forward.

Registered in transformers' AttentionInterface under ATTN_NAME, with a mask
function that hands the 2-D padding mask through untouched (right padding:
valid keys are a prefix), so any decoder written against the interface runs on it.
"""

from __future__ import annotations

import itertools

import torch

from rmserve.service import varlen

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
    """Causal attention of N rows of queries over their own keys, in fixed blocks.

    q [N, Hq, Tq, d] at absolute positions q_offset .. q_offset + Tq - 1 (the
    same in every row); k, v [N, Hkv, Tk, d] at positions 0..Tk-1, of which the
    first k_len [N] are valid. -> [N, Hq, Tq, d] float32.
    """
    n, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nq, nk = -(-tq // BLOCK), -(-tk // BLOCK)
    q = _pad(q.float(), 2, nq * BLOCK).view(n, hq, nq, BLOCK, d) * scaling
    # padded query rows (past Tq) only ever see keys their block already sees; they are cut off at the end
    pos = (q_offset + torch.arange(nq * BLOCK, device=q.device)).view(1, 1, nq, BLOCK, 1)
    last = q_offset + BLOCK * torch.arange(nq) + BLOCK - 1          # each query block's last position
    k = _pad(k.float(), 2, nk * BLOCK).repeat_interleave(hq // hkv, dim=1)
    v = _pad(v.float(), 2, nk * BLOCK).repeat_interleave(hq // hkv, dim=1)
    m = torch.full((n, hq, nq, BLOCK, 1), float("-inf"), device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros((n, hq, nq, BLOCK, d), device=q.device)
    offsets = torch.arange(BLOCK, device=q.device)
    valid_len = k_len.view(n, 1, 1, 1, 1)
    for c in range(nk):
        # query blocks that can see chunk c: skipping the others is exact (for them it is a no-op)
        b0 = int(torch.searchsorted(last, c * BLOCK))
        if b0 == nq:
            break
        kc = k[:, :, None, c * BLOCK : (c + 1) * BLOCK]               # [N, Hq, 1, B, d]
        vc = v[:, :, None, c * BLOCK : (c + 1) * BLOCK]
        s = q[:, :, b0:] @ kc.transpose(-1, -2)                         # [N, Hq, nq - b0, B, B]
        j = (c * BLOCK + offsets).view(1, 1, 1, 1, BLOCK)
        p_ = pos[:, :, b0:]
        visible = (j <= p_) & (j < valid_len)
        if window is not None:
            visible &= j > p_ - window
        s.masked_fill_(~visible, float("-inf"))
        m_old = m[:, :, b0:]
        m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
        # a row that has seen no key yet (a window's early chunks) keeps m = -inf: subtract 0 there, not -inf
        m_sub = m_new.masked_fill(m_new == float("-inf"), 0.0)
        s.sub_(m_sub).exp_()
        alpha = (m_old - m_sub).exp_()
        denom[:, :, b0:] = denom[:, :, b0:] * alpha + s.sum(-1, keepdim=True)
        acc[:, :, b0:] = acc[:, :, b0:] * alpha + s @ vc
        m[:, :, b0:] = m_new
    return (acc / denom).view(n, hq, nq * BLOCK, d)[:, :, :tq]


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


def enable(model: torch.nn.Module) -> bool:
    """Switch `model` to the invariant attention if it is a decoder on sdpa through AttentionInterface."""
    if not varlen.supports_packing(model):
        return False
    model.set_attn_implementation(register())
    return model.config._attn_implementation == ATTN_NAME
