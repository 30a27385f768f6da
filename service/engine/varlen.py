"""Padding-free (varlen) attention for any Hugging Face decoder, plugged in through its registries.

The engine packs a batch into one token stream `[1, T_total]` with position ids
restarting at 0 per sequence and passes `cu_seq_lens_q/k` [B+1] and
`max_length_q/k`. transformers forwards those kwargs from the model's forward to
every attention function (`TransformersKwargs`), so an attention function
registered under `ATTN_NAME` sees where each sequence starts and attends within
it only; Llama, Qwen2, Mistral, Gemma and the other decoders written against
`AttentionInterface` run unchanged.

One implementation serves both kinds of call, so a model switched to it once
stays correct for every path of the engine:

- packed (the kwargs are there): `torch.nn.attention.varlen.varlen_attn`
  (FlashAttention varlen) on CUDA; on CPU, where no varlen kernel pays, sdpa
  per sequence slice: exact, and what the tests compare against;
- anything else (padded batches with a 2-D mask, a KV cache): HF's own sdpa.

The mask function registered beside it builds sdpa's mask when the caller gives
a 2-D padding mask and nothing otherwise: for a packed stream HF would build a
[T_total, T_total] block-diagonal mask, which the varlen path never reads.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

ATTN_NAME = "rmserve_varlen"

# Attention implementations a model may be switched from: ours computes exactly
# what sdpa computes, so a model on eager (chosen for softcapping, say) stays there.
# The batch-invariant attention (invariant_attention.py) packs too, so it is kept as is.
INVARIANT_NAME = "rmserve_invariant"
SWITCHABLE = ("sdpa", ATTN_NAME, INVARIANT_NAME)


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _window_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal sliding-window mask [q_len, k_len] (queries are the last q_len keys)."""
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _packed_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: list[int],
                scaling: float | None, window: int | None) -> torch.Tensor:
    """Reference varlen attention: sdpa on each sequence's slice. [1, H, T, D] -> [1, T, H, D]."""
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(query)
    for s, e in itertools.pairwise(cu):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if window is not None and e - s > window:
            mask = _window_mask(e - s, e - s, window, query.device)
            out[:, :, s:e] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        else:
            out[:, :, s:e] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def _packed_cuda(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                 cu_k: torch.Tensor, max_q: int, max_k: int, scaling: float | None,
                 window: int | None) -> torch.Tensor:
    """FlashAttention varlen over the packed stream. [1, H, T, D] -> [1, T, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    # varlen_attn wants [T, H, D]; the copies are O(T*H*D), a rounding error of the projections.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    # (-1, 0) is causal; (W-1, 0) a causal window of W keys, HF's sliding_window convention.
    left = -1 if window is None else window - 1
    out = varlen_attn(
        q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
        scale=scaling, window_size=(left, 0), enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.unsqueeze(0)


def _use_flash(query: torch.Tensor) -> bool:
    """FlashAttention varlen runs on CUDA only (tests swap this to drive that branch on CPU)."""
    return query.is_cuda


def varlen_attention_forward(
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
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` function: query [B, Hq, T, D], key/value [B, Hkv, S, D] -> [B, T, Hq, D]."""
    if cu_seq_lens_q is None:
        if attention_mask is None and sliding_window is not None and key.shape[2] > sliding_window:
            # no mask was built (see _mask below), so the window must come from here
            attention_mask = _window_mask(query.shape[2], key.shape[2], sliding_window, query.device)
        return _sdpa_forward()(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )
    if softcap is not None:
        raise NotImplementedError(f"{ATTN_NAME} does not support attention logit softcapping (Gemma2-style models)")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one stream [1, T_total], got batch {query.shape[0]}")
    # identity first: comparing values would cost a host sync per layer on CUDA
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("packed self-attention needs cu_seq_lens_k == cu_seq_lens_q")
    if _use_flash(query):
        max_q = max_length_q if max_length_q is not None else int(cu_seq_lens_q.diff().max())
        return _packed_cuda(query, key, value, cu_seq_lens_q, cu_seq_lens_q, max_q, max_q, scaling, sliding_window), None
    return _packed_cpu(query, key, value, cu_seq_lens_q.tolist(), scaling, sliding_window), None


def _mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for an unmasked call without a cache (a packed stream, or one sequence: the
    attention function handles both); sdpa's own mask for everything else (padding, a KV cache)."""
    if attention_mask is None and kwargs.get("kv_length") == kwargs.get("q_length"):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


_registered: set[str] = set()


def register_attention(name: str, attention, mask) -> str:
    """Register an attention function and its mask function with transformers (idempotent)."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
        _registered.add(name)
    return name


def register() -> str:
    """Register the varlen attention and its mask function under ATTN_NAME; returns the name."""
    return register_attention(ATTN_NAME, varlen_attention_forward, _mask)


def supports_packing(model: torch.nn.Module) -> bool:
    """A decoder whose attention goes through AttentionInterface and that runs on sdpa (or ours)."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(model, "_supports_attention_backend", False)
        and getattr(config, "_attn_implementation", None) in SWITCHABLE
        and not getattr(config, "attn_logit_softcapping", None)
    )


def enable_packing(model: torch.nn.Module) -> bool:
    """Switch `model` to ATTN_NAME if it supports packing; False (model untouched) if not."""
    if not supports_packing(model):
        return False
    if model.config._attn_implementation == INVARIANT_NAME:
        return True
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(register())
    return model.config._attn_implementation == ATTN_NAME


def pack(seqs: list[list[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor | int]:
    """Model kwargs for a packed forward: input_ids / position_ids [1, T_total], cu_seq_lens, max_length."""
    lengths = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = cu.to(device, non_blocking=True)
    return dict(
        input_ids=ids[None].to(device, non_blocking=True),
        position_ids=pos[None].to(device, non_blocking=True),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=max(lengths), max_length_k=max(lengths),
    )
