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

float32 on CPU (`fuse_float32`): the same silu(gate) * up as one compiled loop
(inductor's silu may differ from eager's in the last bit; measured scores within
1e-5 x std of the checkpoint's modules). 1.06x on PPO-like float32 scoring
(bench/results/cpu-layer-fusion-study-2026-12-06.md). Not kept: the RMSNorm as one
compiled loop (another 2%, but its reduction sums in another order and moved GRPO
scores 1.5e-5 x std, over the 1e-5 the float32 path is held to), and in bf16 a norm
that emits the projections' bf16 input (no faster).

Under torch.compile or export (ONNX: service/engine/onnx_export.py) the fused
modules run their eager functions, so a traced graph holds plain ops.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from rmserve.service.engine.settings import settings

log = logging.getLogger(__name__)


def _prepack_ok() -> bool:
    """RMSERVE_PREPACK=1 asks for prepacked bf16 weights; granted where the probe passes."""
    return settings().prepack and _prepack_probe()


@functools.cache
def _prepack_probe() -> bool:
    """Whether oneDNN's prepacked bf16 linear is here and gives F.linear's bits for any row count
    (checked once per process on odd shapes: the rows' bits are the batch-invariance contract)."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(40, 72, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PREPACK_ROWS)
        for rows in (1, 7, 64, 301):
            x = torch.randn(rows, 72, generator=g).bfloat16()
            if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), F.linear(x, w)):
                raise RuntimeError(f"its output differs from F.linear's on {rows} rows")
        return True
    except Exception as e:  # a torch without oneDNN or these ops: F.linear is correct, only slower
        log.warning("prepacked bf16 weights unavailable (%s: %s); F.linear serves", type(e).__name__, e)
        return False


PREPACK_ROWS = 1024   # the row count oneDNN's weight layout is chosen for (any count runs on it)


class MixedLinear(nn.Module):
    """A Linear with a low-precision weight: low-precision matmul, float32 in and out.

    With RMSERVE_PREPACK=1 the bf16 weight is also packed once, at load, into oneDNN's blocked
    layout, which F.linear otherwise prepares per call: the same bits and 1.02-1.5x per GEMM on
    the default's shapes (most on few rows), but only 1.02-1.14x PPO-like and 0.93-1.06x
    GRPO-like end to end on this CPU, for one more bf16 copy of the weights in memory; so it
    is opt-in (bench/results/cpu-prepacked-gemm-2026-12-06.md). AMX CPUs, whose tiles need
    their own layout, may gain more: untested. The packed copy is made once: a served model's
    weights never change after load, and a packed MixedLinear cannot be deep-copied or saved
    (oneDNN's opaque tensor), which serving never does (trunk copies are made before packing)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.packed = (torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PREPACK_ROWS)
                       if dtype == torch.bfloat16 and self.weight.device.type == "cpu" and _prepack_ok() else None)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T in the weight's dtype (x already in it); traced callers get F.linear."""
        if self.packed is None or torch.compiler.is_compiling() or x.device.type != "cpu":
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mm(x.to(self.weight.dtype)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


def mixed_bf16(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every nn.Linear of `model` (a float32 model) for a MixedLinear, in place; returns how many."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, mod in targets:
        _swap(model, name, MixedLinear(mod, dtype))
    return len(targets)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bf16 GEMM outputs -> silu(gate) * up in float32 -> bf16: what the unfused path computes."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process, or `fn` itself where compiling is off or fails; the
    compiled loop must reproduce `fn` on a probe: bit for bit for the bf16 MLP step (its
    roundings are the contract), to float32 rounding for the float32 one (inductor's
    vectorised exp differs from eager's in the last bit)."""
    if not settings().compile:
        return fn
    try:
        compiled = torch.compile(fn, dynamic=True)
        g = torch.Generator().manual_seed(0)
        if fn is _silu_mul:
            x = (3 * torch.randn(3, 37, generator=g)).to(torch.bfloat16)
            ok = torch.equal(compiled(x, x), fn(x, x))
        else:
            x = 3 * torch.randn(3, 37, generator=g)
            ok = torch.allclose(compiled(x, x), fn(x, x), rtol=1e-5, atol=1e-6)
        if not ok:
            raise RuntimeError("the compiled loop does not reproduce the eager one")
        return compiled
    except Exception as e:  # no C++ compiler, an inductor bug: eager is correct, only slower
        log.warning("torch.compile of %s failed (%s: %s); running it eagerly", fn.__name__, type(e).__name__, e)
        return fn


def _fused(fn):
    """What a fused module calls: the compiled loop, except inside a trace (torch.compile of a
    caller, torch.export for ONNX), which gets the plain ops."""
    return fn if torch.compiler.is_compiling() else _compiled(fn)


def _fused_silu_mul():
    return _fused(_silu_mul)


def _silu_mul_fp32(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FusedGatedMLP(nn.Module):
    """float32 down(silu(gate(x)) * up(x)), the middle step one compiled loop."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _fused(_silu_mul_fp32)(F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight))
        return F.linear(h, self.down_proj.weight)


class MixedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) over MixedLinear weights, the middle step fused."""

    def __init__(self, gate: MixedLinear, up: MixedLinear, down: MixedLinear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(self.gate_proj.weight.dtype)
        h = _fused_silu_mul()(self.gate_proj.mm(xb), self.up_proj.mm(xb))
        return self.down_proj.mm(h).to(x.dtype)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _gated_mlps(model: nn.Module, linear: type[nn.Module]) -> list[tuple[str, list[nn.Module]]]:
    """Gated SiLU MLPs (Llama, Mistral, Qwen: gate_proj, up_proj, down_proj without bias, act_fn
    SiLU) whose three projections are exactly `linear`."""
    found = []
    for name, mod in model.named_modules():
        lins = [getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        if (type(mod).__name__.endswith("MLP") and all(type(m) is linear and m.bias is None for m in lins)
                and _is_silu(getattr(mod, "act_fn", None))):
            found.append((name, lins))
    return found


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Swap every gated SiLU MLP whose linears are MixedLinear for a MixedGatedMLP, in place;
    returns how many."""
    targets = _gated_mlps(model, MixedLinear)
    for name, lins in targets:
        _swap(model, name, MixedGatedMLP(*lins))
    return len(targets)


def fuse_float32(model: nn.Module) -> int:
    """float32 on CPU: swap every gated SiLU MLP of plain Linears for a FusedGatedMLP, in place;
    returns how many."""
    targets = _gated_mlps(model, nn.Linear)
    for name, lins in targets:
        _swap(model, name, FusedGatedMLP(*lins))
    return len(targets)
