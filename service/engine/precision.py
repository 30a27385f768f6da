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

Between the matmuls, the gated MLP's silu(gate) * up runs as one fused loop
(`fuse_gated_mlps`): from the two bf16 GEMM outputs, in float32, to the bf16 input
of the down projection. The roundings are the ones the unfused path makes (bf16
GEMM out, float32 silu and product, bf16 into down), so scores do not move; four
passes over the widest activation become one. torch.compile (inductor's C++
backend) generates the loop; where it cannot (no C++ compiler,
RMSERVE_COMPILE=0), the same function runs eagerly. Measured 1.18x on PPO-like
and 1.07x on GRPO-like bf16 scoring, scores bit-identical
(bench/results/cpu-fusion-study-2026-12-06.md).

`load_model(dtype="bfloat16")` applies it on CPU (service/engine/model.py); on CUDA,
where bf16 is the native serving dtype, bf16 stays plain bf16.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


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


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bf16 GEMM outputs -> silu(gate) * up in float32 -> bf16: what the unfused path computes."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@functools.cache
def _fused_silu_mul():
    """The compiled loop, or the eager function where compiling is off or fails (once per process)."""
    if os.environ.get("RMSERVE_COMPILE", "1") == "0":
        return _silu_mul
    try:
        fn = torch.compile(_silu_mul, dynamic=True)
        x = torch.randn(3, 5, dtype=torch.bfloat16)
        if not torch.equal(fn(x, x), _silu_mul(x, x)):
            raise RuntimeError("the compiled loop does not reproduce the eager one bit for bit")
        return fn
    except Exception as e:  # no C++ compiler, an inductor bug: eager is correct, only slower
        log.warning("torch.compile of the fused MLP step failed (%s: %s); running it eagerly", type(e).__name__, e)
        return _silu_mul


class MixedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) over MixedLinear weights, the middle step fused."""

    def __init__(self, gate: MixedLinear, up: MixedLinear, down: MixedLinear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(self.gate_proj.weight.dtype)
        h = _fused_silu_mul()(F.linear(xb, self.gate_proj.weight), F.linear(xb, self.up_proj.weight))
        return F.linear(h, self.down_proj.weight).to(x.dtype)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_gated_mlps(model: nn.Module) -> int:
    """Swap every gated SiLU MLP (Llama, Mistral, Qwen: gate_proj, up_proj, down_proj without
    bias, act_fn SiLU) whose linears are MixedLinear for a MixedGatedMLP, in place; returns how many."""
    targets = []
    for name, mod in model.named_modules():
        lins = [getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        if (type(mod).__name__.endswith("MLP") and all(isinstance(m, MixedLinear) and m.bias is None for m in lins)
                and _is_silu(getattr(mod, "act_fn", None))):
            targets.append((name, lins))
    for name, lins in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, MixedGatedMLP(*lins))
    return len(targets)
