"""Serving precision: what `--dtype bfloat16` does to a backbone.

Plain `.to(bfloat16)` rounds the residual stream, the norms and attention to
8 mantissa bits, and then a sample's score depends on what it is batched with
(padding changes reduction lengths, the change survives as a different
rounding, and 30 layers amplify it: ~0.08 x the score std on SmolLM2), and it
moves scores ~0.15 x std from float32. The matmuls are what bf16 speeds up,
so `mixed_bf16` keeps only them in bf16: every nn.Linear stores its weight in
bf16 and multiplies bf16 inputs with fp32 accumulation, while the residual
stream, norms, rotary embeddings, attention and softmax stay float32 (0.05 x
std from float32). A linear layer's output row depends only on its own input
row, so what batching still changes is attention's rounding, which
service/engine/invariant_attention.py makes batch-independent.

Tried and not taken: returning the GEMM's bf16 output as it comes (type
promotion restores float32 at the residual add) is 8% faster but moves scores
0.080 x std from float32 instead of 0.049, because the MLP's act(gate) * up
then rounds to bf16 twice (bench/results/bf16-invariance-2026-12-02.md).

`load_model(dtype="bfloat16")` applies it on CPU (service/engine/model.py); on CUDA,
where bf16 is the native serving dtype, bf16 stays plain bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixedLinear(nn.Module):
    """A Linear with a low-precision weight: low-precision matmul, float32 in and out."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


def mixed_bf16(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every nn.Linear of `model` (a float32 model) for a MixedLinear, in place; returns how many."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, mod in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, MixedLinear(mod, dtype))
    return len(targets)
