"""Load a served reward model: an ensemble directory or a plain HF seq-cls checkpoint.

The result, `RewardModel`, is everything the engine needs and nothing of gRPC:
members (backbone + heads with normalisation folded in + optional epistemic
factor), the prompt encoder, and the facts `GetModelInfo` reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rmserve.kernels import cpu_attention
from rmserve.service.engine import invariant_attention, trunk
from rmserve.service.engine.backbone import (
    Backbone,
    BackboneInfo,
    Placement,
    load_backbone,
    quiet_transformers,
    wrap_backbone,
)
from rmserve.service.engine.ensemble import (
    MANIFEST,
    EnsembleFormatError,
    EnsembleManifest,
    MemberSpec,
    load_member,
    read_manifest,
    resolve_backbone_path,
)
from rmserve.service.engine.heads import fold_normalisation
from rmserve.service.engine.ood import OodCalibration, OodStats
from rmserve.service.engine.precision import fuse_float32, fuse_gated_mlps, mixed_bf16
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.service.engine.trunk import Top

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Member:
    """One member: its backbone (a torch `Backbone` on the torch and accelerate backends; what
    another backend loaded, engine/onnx_runtime.py, vllm_backend.py) and its heads (engine/heads.py)."""

    name: str
    backbone: BackboneInfo
    weight: torch.Tensor             # [K, H] float32, normalisation folded in
    bias: torch.Tensor               # [K]
    unc_factor: torch.Tensor | None  # [H, H]
    ood: OodStats | None = None      # mean and whitening of its training embeddings
    top: Top | None = None           # its own top layers over a backbone it shares (engine/trunk.py)


@dataclass
class RewardModel:
    name: str
    version: str
    kind: str
    members: list[Member]
    encoder: PromptEncoder
    dtype: torch.dtype
    max_tokens: int
    uncertainty_penalty: float
    shift: list[float]
    scale: list[float]
    source: str
    training: dict = field(default_factory=dict)
    ood: OodCalibration | None = None   # the flag's threshold; needs every member's OodStats


    @property
    def num_heads(self) -> int:
        return sum(m.weight.shape[0] for m in self.members)

    @property
    def has_epistemic(self) -> bool:
        return any(m.unc_factor is not None for m in self.members)

    @property
    def has_ood_score(self) -> bool:
        """Every member has OOD statistics (a score averaged over some members would change meaning)."""
        return all(m.ood is not None for m in self.members)

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def backbone_name(self) -> str:
        return self.members[0].backbone.name

    @property
    def backbone_layers(self) -> int:
        """Transformer blocks the (first) backbone runs (after its layer cut)."""
        return self.members[0].backbone.layers

    def to(self, device: str | torch.device) -> RewardModel:
        """Move every torch backbone and head to `device`, in place (heads stay float32)."""
        for m in self.members:
            if isinstance(m.backbone, Backbone):
                m.backbone.model.to(device)
            if m.top is not None:
                m.top.module.to(device)
        return self.heads_to(device)

    def heads_to(self, device: str | torch.device) -> RewardModel:
        """Move the heads, uncertainty factors and OOD statistics to `device`, in place: where
        the hidden states arrive when something else places the backbones (a sharded model,
        a remote engine)."""
        for m in self.members:
            m.weight, m.bias = m.weight.to(device), m.bias.to(device)
            if m.unc_factor is not None:
                m.unc_factor = m.unc_factor.to(device)
            if m.ood is not None:
                m.ood = m.ood.to(device)
        return self


def input_device(module: torch.nn.Module) -> torch.device:
    """Where a backbone takes its inputs: its parameters' device, or for one accelerate placed
    over several devices (engine/sharded.py) the device its dispatch hook runs inputs on."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) under which it still has bf16 dot products.
_BF16_ISAS = frozenset({"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                        "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                        "AVX10_2_512", "AVX10_2_512_AMX_2"})


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates
    bf16 matmuls, slower than float32 ones. An operator's ONEDNN_MAX_CPU_ISA cap below the bf16
    instructions counts as "not native": oneDNN then emulates bf16 (measured: 1 GFLOP/s under AVX2)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and cap not in _BF16_ISAS:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(dtype: str, default: str, device: torch.device) -> torch.dtype:
    """`auto` serves the model's own dtype, except a bf16 model on a CPU without native bf16:
    float32 there (same scores within bf16's error, and faster)."""
    name = default if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    if dtype == "auto" and name == "bfloat16" and device.type == "cpu" and not native_bf16_cpu():
        log.info("the model serves bfloat16, but this CPU has no native bf16 matmul: serving float32")
        return torch.float32
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """auto = CUDA when there is one, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str | Path, *, dtype: str = "auto", max_tokens: int | None = None, device: str | torch.device = "cpu",
    fused: bool = True,
) -> RewardModel:
    """Load `path`: a directory with manifest.json, or a one-label HF seq-cls checkpoint.

    `device`: cpu, cuda[:n] or auto (CUDA when there is one); backbones and heads move there.
    `fused`: float32 on CPU runs each gated MLP's silu(gate) * up as one compiled loop
    (precision.fuse_float32; scores within 1e-5 x std) and, where the fixed-order CPU attention
    kernel builds, attention through it (invariant_attention); False keeps the checkpoint's own
    modules and attention.
    """
    path = Path(path)
    dev = resolve_device(device)
    if (path / MANIFEST).is_file():
        model = load_ensemble(path, dtype, max_tokens, dev).to(dev)
    elif (path / "config.json").is_file():
        model = load_seqcls(path, dtype, max_tokens, dev).to(dev)
    else:
        raise EnsembleFormatError(f"{path} is neither an rmserve ensemble (no {MANIFEST}) nor a Hugging Face checkpoint (no config.json)")
    if fused and model.dtype == torch.float32 and dev.type == "cpu":
        kernel = cpu_attention.available()   # builds it on first use (install time builds it too)
        for member in model.members:  # a shared trunk is met once per member: fusing is idempotent
            fuse_float32(member.backbone.model)
            if member.top is not None:
                fuse_float32(member.top.module)
            if kernel:
                invariant_attention.enable(member.backbone.model)
    return model


def _load_dtype(torch_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype weights load in: float32 for bf16 on CPU, which serves it mixed (service/engine/precision.py)."""
    return torch.float32 if mixed_on(torch_dtype, device) else torch_dtype


def mixed_on(torch_dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on CPU runs bf16 matmuls over a float32 residual stream; on CUDA it is plain bf16."""
    return torch_dtype == torch.bfloat16 and device.type == "cpu"


def _finish_backbone(bb: Backbone, torch_dtype: torch.dtype, device: torch.device) -> Backbone:
    """bf16 on CPU: bf16 matmuls, and attention that keeps scores independent of the batch."""
    if mixed_on(torch_dtype, device):
        mixed_bf16(bb.model)
        fuse_gated_mlps(bb.model)
        invariant_attention.enable(bb.model)  # a decoder on sdpa; others keep their attention
    return bb


def load_ensemble(path: Path, dtype: str, max_tokens: int | None, device: torch.device,
                   placement: Placement | None = None) -> RewardModel:
    """`placement`: shard every backbone over devices with accelerate (engine/sharded.py); the
    caller then places the heads (RewardModel.heads_to) instead of moving the model."""
    man: EnsembleManifest = read_manifest(path)
    torch_dtype = resolve_dtype(dtype, man.dtype, device)
    tensors = [load_member(path, spec) for spec in man.members]
    by_source: dict[str, list[int]] = {}
    for i, spec in enumerate(man.members):
        by_source.setdefault(resolve_backbone_path(path, spec.backbone), []).append(i)
    slots: list[Member | None] = [None] * len(man.members)
    for source, idx in by_source.items():
        family = None
        if len(idx) > 1:
            family = _load_family(source, [man.members[i] for i in idx], [tensors[i] for i in idx], torch_dtype, device,
                                  placement)
        for i, member in zip(idx, family or [None] * len(idx), strict=True):
            spec, t = man.members[i], tensors[i]
            if member is None:  # a backbone of its own
                bb = load_backbone(source, dtype=_load_dtype(torch_dtype, device), delta=t.delta,
                                   num_layers=spec.num_layers, placement=placement)
                member = Member(spec.name, _finish_backbone(bb, torch_dtype, device), t.weight, t.bias,
                                t.unc_factor, t.ood)
            if t.weight.shape[1] != member.backbone.hidden_size:
                raise EnsembleFormatError(f"member {spec.name}: heads expect hidden size {t.weight.shape[1]}, "
                                          f"backbone has {member.backbone.hidden_size}")
            slots[i] = member
    return assemble_ensemble(path, man, [m for m in slots if m is not None], torch_dtype, max_tokens)


def assemble_ensemble(path: Path, man: EnsembleManifest, members: list[Member], torch_dtype: torch.dtype,
                      max_tokens: int | None) -> RewardModel:
    """The RewardModel of a manifest whose members are built: normalisation folded into the
    heads, the token limit, the prompt encoder, the OOD calibration. Shared by every backend
    that reads an ensemble directory (engine/vllm_backend.py builds members without a torch
    backbone)."""
    k = sum(m.weight.shape[0] for m in members)
    shift = list(man.shift) if man.shift is not None else [0.0] * k
    scale = list(man.scale) if man.scale is not None else [1.0] * k
    if len(shift) != k or len(scale) != k:
        raise EnsembleFormatError(f"normalisation lists {len(shift)} shifts and {len(scale)} scales for {k} heads")
    start = 0
    for m in members:
        n = m.weight.shape[0]
        m.weight, m.bias = fold_normalisation(m.weight, m.bias, shift[start : start + n], scale[start : start + n])
        start += n
    limit = min(max_tokens or man.max_tokens, members[0].backbone.max_positions)
    tok = members[0].backbone.tokenizer
    return RewardModel(
        name=man.name, version=man.version, kind=man.kind, members=members,
        encoder=PromptEncoder(tok, limit, use_chat_template=man.chat_template),
        dtype=torch_dtype, max_tokens=limit, uncertainty_penalty=man.uncertainty_penalty,
        shift=shift, scale=scale, source=str(path), training=man.training,
        ood=OodCalibration.from_dict(man.ood) if man.ood is not None and all(m.ood for m in members) else None,
    )


def _load_family(source: str, specs: list[MemberSpec], tensors: list, torch_dtype: torch.dtype,
                 device: torch.device, placement: Placement | None = None) -> list[Member] | None:
    """Members on one base that differ only in their top layers share its trunk (engine/trunk.py):
    the base is loaded once, each member keeps copies of the layers it trained. None when they
    cannot share (an encoder, trained embeddings...): each then loads a backbone of its own."""
    cuts = [spec.num_layers for spec in specs]
    base = load_backbone(source, dtype=_load_dtype(torch_dtype, device),
                         num_layers=None if None in cuts else max(cuts), placement=placement)
    if base.pooling != "last" or not trunk.shareable(base.model):
        return None
    n = int(base.model.config.num_hidden_layers)
    spans = []
    for spec, t in zip(specs, tensors, strict=True):
        cut = spec.num_layers or n
        start = trunk.delta_start(base.model, t.delta, cut)
        if start is None:
            return None
        spans.append((start, cut))
    try:
        if placement is None:
            tops = [trunk.build_top(base.model, t.delta, start, cut) for t, (start, cut) in zip(tensors, spans, strict=True)]
        else:  # a sharded trunk: each member's own layers go where its copies begin
            from rmserve.service.engine import sharded

            tops = sharded.build_tops(base.model, [t.delta for t in tensors], spans)
    except ValueError as e:
        raise EnsembleFormatError(f"{source}: {e}") from e
    base = _finish_backbone(base, torch_dtype, device)
    if mixed_on(torch_dtype, device):
        for top in tops:
            mixed_bf16(top.module)
            fuse_gated_mlps(top.module)
    log.info("%d members share %s's trunk (own layers from %s)", len(specs), source, [s for s, _ in spans])
    return [Member(spec.name, base, t.weight, t.bias, t.unc_factor, t.ood, top)
            for spec, t, top in zip(specs, tensors, tops, strict=True)]


def load_seqcls(path: Path, dtype: str, max_tokens: int | None, device: torch.device,
                 placement: Placement | None = None) -> RewardModel:
    """A `*ForSequenceClassification` checkpoint with one label is a one-head ensemble.
    `placement`: shard it over devices with accelerate (engine/sharded.py)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise EnsembleFormatError(
            f"{path}: a plain checkpoint must be a *ForSequenceClassification with one label "
            f"(got architectures={archs}, num_labels={config.num_labels})"
        )
    default = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    torch_dtype = resolve_dtype(dtype, default if default in DTYPES else "float32", device)
    full = AutoModelForSequenceClassification.from_pretrained(path, dtype=_load_dtype(torch_dtype, device),
                                                              **(placement.kwargs() if placement else {}))
    head = next(
        (mod for n, mod in full.named_children() if n in ("score", "classifier") and isinstance(mod, torch.nn.Linear)),
        None,
    )
    if head is None:
        raise EnsembleFormatError(f"{path}: its classification head is not a single linear layer; rmserve cannot read it")
    if head.weight.device.type == "meta":
        raise EnsembleFormatError(f"{path}: the device map offloads the classification head; keep it on a GPU")
    weight = head.weight.detach().float().reshape(1, -1).cpu()
    bias = head.bias.detach().float().reshape(1).cpu() if head.bias is not None else torch.zeros(1)
    bb = _finish_backbone(wrap_backbone(full.base_model, AutoTokenizer.from_pretrained(path), str(path)),
                          torch_dtype, device)
    limit = min(max_tokens or 2048, bb.max_positions)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return RewardModel(
        name=path.name, version=f"hf-{digest}", kind="heads",
        members=[Member("member0", bb, weight, bias, None)],
        encoder=PromptEncoder(bb.tokenizer, limit), dtype=torch_dtype, max_tokens=limit,
        uncertainty_penalty=0.0, shift=[0.0], scale=[1.0], source=str(path),
    )


__all__ = ["DTYPES", "Member", "MemberSpec", "RewardModel", "load_model"]
