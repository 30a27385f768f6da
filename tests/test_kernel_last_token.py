"""The fused last-token kernel against the float64 torch reference.

CPU tests run the Triton kernel itself through the interpreter (TRITON_INTERPRET=1
is set per test, so plain `pytest` covers it); shapes are tiny because the
interpreter is slow. Outputs are poisoned with NaN before each launch and must
come back fully written. The compiled kernel is also lowered to an sm_90 cubin,
which needs no GPU. GPU tests (marked `gpu`) use larger shapes and skip without
CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import NamedTuple

import pytest
import torch

from rmserve.kernels import last_token as lt
from rmserve.kernels.last_token import (
    LastTokenScores,
    last_token_scores,
    last_token_scores_reference,
    last_token_scores_triton,
)

needs_triton = pytest.mark.skipif(lt.triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rtol, atol) per hidden dtype. The kernel and the oracle read the same rounded
# inputs, so these cover fp32 accumulation order (and tf32x3 splitting on GPU),
# not input rounding; rewards are O(1) and epistemic O(sqrt(H)) by construction.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-4, 1e-4), torch.float16: (1e-4, 1e-4)}


class Case(NamedTuple):
    batch: int
    hidden_size: int
    heads: int
    dtype: torch.dtype
    packed: bool
    layout: str = "contiguous"   # or "transposed" (stride_hh = T), "sliced" (stride_hh = 2)
    unc: bool = True
    max_len: int = 4
    param_dtype: torch.dtype = torch.float32   # dtype of weight, bias and unc_factor


def make_inputs(case: Case, seed: int, device: str = "cpu") -> tuple[tuple, dict]:
    """Fresh random inputs; sequence 0 always has length 1."""
    g = torch.Generator().manual_seed(seed)
    b, h, k = case.batch, case.hidden_size, case.heads
    lengths = torch.randint(1, case.max_len + 1, (b,), generator=g)
    lengths[0] = 1
    rows = int(lengths.sum()) if case.packed else b * case.max_len
    if case.layout == "transposed":
        hidden = torch.randn(h, rows, generator=g).to(device=device, dtype=case.dtype).T
    elif case.layout == "sliced":
        hidden = torch.randn(rows, 2 * h, generator=g).to(device=device, dtype=case.dtype)[:, ::2]
    else:
        hidden = torch.randn(rows, h, generator=g).to(device=device, dtype=case.dtype)
    if not case.packed:
        hidden = hidden.unflatten(0, (b, case.max_len))
    assert hidden.is_contiguous() == (case.layout == "contiguous")
    weight = torch.randn(k, h, generator=g) / math.sqrt(h)
    bias = torch.randn(k, generator=g)
    unc = torch.randn(h, h, generator=g) / math.sqrt(h) if case.unc else None
    p = dict(device=device, dtype=case.param_dtype)
    kwargs: dict = dict(unc_factor=None if unc is None else unc.to(**p))
    if case.packed:
        kwargs["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(
            device=device, dtype=torch.int32)
    else:
        kwargs["lengths"] = lengths.to(device)
    return (hidden, weight.to(**p), bias.to(**p)), kwargs


def poisoned(batch: int, heads: int, has_unc: bool, device: str = "cpu") -> LastTokenScores:
    def nan(*shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), device=device)

    return LastTokenScores(rewards=nan(batch, heads), mean=nan(batch), var=nan(batch), min=nan(batch),
                           epistemic=nan(batch) if has_unc else None)


def assert_matches_oracle(out: LastTokenScores, args: tuple, kwargs: dict, dtype: torch.dtype) -> None:
    ref = last_token_scores_reference(*args, **kwargs, compute_dtype=torch.float64)
    rtol, atol = TOL[dtype]
    for field in dataclasses.fields(LastTokenScores):
        got, want = getattr(out, field.name), getattr(ref, field.name)
        if want is None:
            assert got is None, field.name
            continue
        assert got.dtype == torch.float32, field.name
        assert torch.isfinite(got).all(), f"{field.name} not fully written"
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol,
                                   msg=lambda m, name=field.name: f"{name}: {m}")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernel on CPU through the interpreter for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# B=1, length-1 sequences (always sequence 0), H not a multiple of any block
# (37, 100; 200 loops twice over the heads and has 4 column tiles of e @ L),
# K in {1, 3, 8, 16}, B=20 > 16 rows per program, packed and padded, strided.
CASES = {
    "padded-B1-T1-K1-fp32": Case(1, 37, 1, torch.float32, packed=False, max_len=1),
    "padded-K3-bf16-transposed": Case(3, 100, 3, torch.bfloat16, packed=False, layout="transposed"),
    "padded-B20-H200-K8-fp16-nounc": Case(20, 200, 8, torch.float16, packed=False, unc=False),
    "padded-B20-H200-K8-bf16-bf16params": Case(20, 200, 8, torch.bfloat16, packed=False,
                                               param_dtype=torch.bfloat16),
    "padded-K16-fp32-sliced": Case(4, 37, 16, torch.float32, packed=False, layout="sliced"),
    "packed-B1-K16-fp32": Case(1, 37, 16, torch.float32, packed=True, max_len=1),
    "packed-K3-bf16-transposed-nounc": Case(5, 100, 3, torch.bfloat16, packed=True, layout="transposed",
                                            unc=False),
    "packed-B17-K16-fp16-sliced": Case(17, 100, 16, torch.float16, packed=True, layout="sliced"),
    "packed-K1-bf16": Case(6, 100, 1, torch.bfloat16, packed=True),
}


@needs_triton
@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_float64_reference(name: str, interpret: None) -> None:
    case = CASES[name]
    for seed in (0, 1):
        args, kwargs = make_inputs(case, seed=zlib.crc32(name.encode()) + seed)
        out = last_token_scores_triton(*args, **kwargs, out=poisoned(case.batch, case.heads, case.unc))
        assert_matches_oracle(out, args, kwargs, case.dtype)


@needs_triton
def test_public_function_runs_the_kernel_under_the_interpreter(interpret: None, monkeypatch) -> None:
    case = CASES["packed-B17-K16-fp16-sliced"]
    args, kwargs = make_inputs(case, seed=7)

    def refuse(*a, **k):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(lt, "last_token_scores_reference", refuse)
    assert_matches_oracle(last_token_scores(*args, **kwargs), args, kwargs, case.dtype)


def test_cpu_without_interpreter_uses_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def refuse(*a, **k):
        raise AssertionError("the kernel ran on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(lt, "last_token_scores_triton", refuse)
    case = CASES["padded-K3-bf16-transposed"]
    args, kwargs = make_inputs(case, seed=3)
    assert_matches_oracle(last_token_scores(*args, **kwargs), args, kwargs, case.dtype)


def test_without_triton_the_reference_serves(monkeypatch: pytest.MonkeyPatch, interpret: None) -> None:
    monkeypatch.setattr(lt, "triton", None)
    case = CASES["packed-K1-bf16"]
    args, kwargs = make_inputs(case, seed=4)
    assert_matches_oracle(last_token_scores(*args, **kwargs), args, kwargs, case.dtype)


def test_no_conservative_in_the_kernel() -> None:
    """lam is per request and a launch spans requests: the server applies it (service/server/requests.py)."""
    assert "conservative" not in {f.name for f in dataclasses.fields(LastTokenScores)}
    case = CASES["padded-B1-T1-K1-fp32"]
    args, kwargs = make_inputs(case, seed=6)
    for fn in (last_token_scores, last_token_scores_reference, last_token_scores_triton):
        with pytest.raises(TypeError, match="lam"):
            fn(*args, **kwargs, lam=0.5)


@needs_triton
def test_out_buffers_are_checked(interpret: None) -> None:
    case = CASES["padded-B1-T1-K1-fp32"]
    args, kwargs = make_inputs(case, seed=5)
    wrong_shape = dataclasses.replace(poisoned(1, 1, True), mean=torch.empty(2))
    with pytest.raises(ValueError, match=r"out\.mean"):
        last_token_scores_triton(*args, **kwargs, out=wrong_shape)
    with pytest.raises(ValueError, match=r"out\.epistemic"):
        last_token_scores_triton(*args, **kwargs, out=poisoned(1, 1, False))


@needs_triton
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(("hidden_dtype", "param_dtype", "has_unc", "block_b"), [
    ("bf16", "fp32", False, 16), ("fp32", "fp32", True, 32), ("bf16", "bf16", True, 16),
])
def test_compiled_kernel_lowers_to_sm90(hidden_dtype: str, param_dtype: str, has_unc: bool, block_b: int) -> None:
    """Compile the non-interpreted kernel to an sm_90 cubin, which needs no GPU.

    The interpreter never runs the GPU-only branches (native 16-bit e @ L,
    tf32x3); this checks they lower to tensor-core MMAs, that the ticket is one
    GPU-scope acq_rel atomic, and that the partial sums are read at L2.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    kernel = lt._kernel(interpret=False)
    constexprs: dict = dict(
        HAS_UNC=has_unc, UNC_NATIVE_DOT=has_unc and param_dtype == hidden_dtype != "fp32",
        FP32_PRECISION="tf32x3", BLOCK_B=block_b, BLOCK_H=lt._BLOCK_H, BLOCK_HU=lt._BLOCK_HU,
        BLOCK_N=lt._BLOCK_N, K_PAD=lt._K_PAD,
    )
    if not has_unc:
        constexprs.update(unc_ptr=None, epi_ptr=None, partial_ptr=None, ticket_ptr=None)
    pointers = dict(hidden_ptr=hidden_dtype, ends_ptr="i64", weight_ptr=param_dtype, bias_ptr=param_dtype,
                    unc_ptr=param_dtype, partial_ptr="fp32", ticket_ptr="i32",
                    **{n: "fp32" for n in ("rewards_ptr", "mean_ptr", "var_ptr", "min_ptr", "epi_ptr")})
    names = [p.name for p in kernel.params]
    signature = {
        n: "constexpr" if n in constexprs else f"*{pointers[n]}" if n in pointers
        else "i32"
        for n in names
    }
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "mma" in ptx
    if has_unc:
        assert ptx.count("atom.global.gpu.acq_rel.add.u32") == 1
        assert "ld.global.cg" in ptx


def _bad_arguments() -> dict[str, tuple[str, dict]]:
    """name -> (error message fragment, overrides of a valid padded call)."""
    b, t, h, k = 3, 4, 8, 2
    return {
        "both-indices": ("exactly one", dict(cu_seqlens=torch.tensor([0, 1, 2, 3]))),
        "no-index": ("exactly one", dict(lengths=None)),
        "packed-hidden-with-lengths": ("padded", dict(hidden=torch.randn(b * t, h))),
        "padded-hidden-with-cu": ("packed", dict(lengths=None, cu_seqlens=torch.tensor([0, 1, 2, 3]))),
        "lengths-shape": ("lengths must have shape", dict(lengths=torch.tensor([1, 2]))),
        "lengths-float": ("int32 or int64", dict(lengths=torch.tensor([1.0, 2.0, 3.0]))),
        "length-0": ("in \\[1, T", dict(lengths=torch.tensor([1, 0, 2]))),
        "length-over-T": ("in \\[1, T", dict(lengths=torch.tensor([1, 5, 2]))),
        "K-17": ("1 to 16 heads", dict(weight=torch.randn(17, h), bias=torch.randn(17))),
        "K-0": ("1 to 16 heads", dict(weight=torch.randn(0, h), bias=torch.randn(0))),
        "weight-H": ("weight must be", dict(weight=torch.randn(k, h + 1))),
        "bias-shape": ("bias must be", dict(bias=torch.randn(k + 1))),
        "unc-shape": ("unc_factor must be", dict(unc_factor=torch.randn(h, h + 1))),
        "hidden-int": ("hidden must be float32", dict(hidden=torch.ones(b, t, h, dtype=torch.int32))),
        "weight-float64": ("weight must be float32", dict(weight=torch.randn(k, h, dtype=torch.float64))),
        "device-mismatch": ("is on meta", dict(weight=torch.randn(k, h, device="meta"))),
    }


def _bad_packed() -> dict[str, tuple[str, dict]]:
    return {
        "cu-empty-sequence": ("cu_seqlens must start", torch.tensor([0, 2, 2, 4])),
        "cu-past-end": ("cu_seqlens must start", torch.tensor([0, 2, 3, 7])),
        "cu-negative-start": ("cu_seqlens must start", torch.tensor([-1, 2, 3, 4])),
        "cu-too-short": ("B\\+1", torch.tensor([0])),
    }


@pytest.mark.parametrize("name", _bad_arguments())
def test_argument_errors(name: str, interpret: None) -> None:
    fragment, overrides = _bad_arguments()[name]
    call = dict(hidden=torch.randn(3, 4, 8), weight=torch.randn(2, 8), bias=torch.randn(2),
                lengths=torch.tensor([1, 4, 2]), unc_factor=torch.randn(8, 8))
    call.update(overrides)
    with pytest.raises(ValueError, match=fragment):
        last_token_scores(**call)


@pytest.mark.parametrize("name", _bad_packed())
def test_packed_argument_errors(name: str, interpret: None) -> None:
    fragment, cu_seqlens = _bad_packed()[name]
    with pytest.raises(ValueError, match=fragment):
        last_token_scores(torch.randn(6, 8), torch.randn(2, 8), torch.randn(2), cu_seqlens=cu_seqlens)


# --------------------------------------------------------------------------- #
# GPU: compiled kernel, larger shapes (both row-block sizes, native bf16 e @ L)
# --------------------------------------------------------------------------- #

GPU_CASES = {
    "padded-B1000-H2048-K8-bf16": Case(1000, 2048, 8, torch.bfloat16, packed=False, max_len=64),
    "packed-B5000-H1024-K16-bf16-bf16params": Case(5000, 1024, 16, torch.bfloat16, packed=True, max_len=32,
                                                   param_dtype=torch.bfloat16),
    "padded-B64-H576-K1-fp16-transposed": Case(64, 576, 1, torch.float16, packed=False, max_len=128,
                                               layout="transposed"),
    "packed-B4096-H4096-K8-fp32-nounc": Case(4096, 4096, 8, torch.float32, packed=True, max_len=16,
                                             unc=False),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_kernel_matches_float64_reference(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = GPU_CASES[name]
    args, kwargs = make_inputs(case, seed=11, device="cuda")
    out = last_token_scores_triton(*args, **kwargs, out=poisoned(case.batch, case.heads, case.unc, "cuda"))
    assert_matches_oracle(out, args, kwargs, case.dtype)
    again = last_token_scores_triton(*args, **kwargs)
    for field in dataclasses.fields(LastTokenScores):   # deterministic, epistemic included
        first, second = getattr(out, field.name), getattr(again, field.name)
        assert first is None or torch.equal(first, second), field.name


@pytest.mark.gpu
@needs_cuda
def test_gpu_dispatch_runs_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def refuse(*a, **k):
        raise AssertionError("the reference ran on CUDA")

    monkeypatch.setattr(lt, "last_token_scores_reference", refuse)
    case = GPU_CASES["padded-B1000-H2048-K8-bf16"]
    args, kwargs = make_inputs(case, seed=12, device="cuda")
    assert_matches_oracle(last_token_scores(*args, **kwargs), args, kwargs, case.dtype)
