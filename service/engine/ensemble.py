"""The ensemble directory: what a served reward model is on disk.

```
my-rm/
  manifest.json                 # EnsembleManifest below
  member0/heads.safetensors     # weight [K, H], bias [K] (float32)
  member0/delta.safetensors     # optional: backbone tensors that override the base
  member0/uncertainty.safetensors  # optional: factor [H, H], L with M^-1 = L L^T
```

A member is a backbone plus K linear heads read at the last real token. The
backbone is a path (relative to the ensemble directory, or absolute), or
`builtin:<name>` for a backbone rmserve knows how to fetch (see backbone.py).
`delta` holds the tensors a member fine-tuned (last layers, merged LoRA), so a
members-ensemble over one base checkpoint stores only what differs.

Normalisation is per head, r = (w.e + b - shift) / scale, and is folded into
the heads at load time so the kernel sees plain weights.

Everything is written atomically (temp file + rename) and as safetensors only:
untrusted checkpoints never go through pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rmserve.service.engine.errors import EnsembleFormatError

FORMAT = "rmserve-ensemble/1"
MANIFEST = "manifest.json"


@dataclass
class MemberSpec:
    name: str
    backbone: str                       # path or builtin:<name>
    heads: str = "heads.safetensors"   # relative to the member directory
    delta: str | None = None
    uncertainty: str | None = None
    pooling: str = "last"               # last (decoders) | cls (encoders: pooled first token)
    num_layers: int | None = None       # layer cut: only the backbone's first N blocks run; None = all


@dataclass
class EnsembleManifest:
    name: str
    version: str
    kind: str                              # heads | members
    members: list[MemberSpec]
    shift: list[float] | None = None       # per head over all members; None = 0
    scale: list[float] | None = None       # per head; None = 1
    uncertainty_penalty: float = 1.0       # default lambda for `conservative`
    max_tokens: int = 1024
    dtype: str = "float32"                 # serving dtype when --dtype auto
    chat_template: bool = True             # render conversations with the tokenizer's template
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnsembleManifest:
        if d.get("format") != FORMAT:
            raise EnsembleFormatError(f"manifest format is {d.get('format')!r}, expected {FORMAT!r}")
        d = dict(d)
        try:
            d["members"] = [MemberSpec(**m) for m in d["members"]]
            m = cls(**d)
        except (KeyError, TypeError) as e:
            raise EnsembleFormatError(f"bad manifest: {e}") from e
        if m.kind not in ("heads", "members"):
            raise EnsembleFormatError(f"manifest kind must be 'heads' or 'members', got {m.kind!r}")
        if not m.members:
            raise EnsembleFormatError("manifest lists no members")
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory: str | Path) -> EnsembleManifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EnsembleFormatError(f"{directory} has no {MANIFEST}")
    try:
        return EnsembleManifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise EnsembleFormatError(f"{path} is not valid JSON: {e}") from e


def write_manifest(directory: str | Path, manifest: EnsembleManifest) -> None:
    """Written last, so a directory with a manifest is always complete."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(Path(directory) / MANIFEST, text.encode())


@dataclass
class MemberTensors:
    weight: torch.Tensor                   # [K, H] float32
    bias: torch.Tensor                     # [K]
    delta: dict[str, torch.Tensor] | None = None
    unc_factor: torch.Tensor | None = None  # [H, H]


def save_member(directory: str | Path, spec: MemberSpec, tensors: MemberTensors) -> None:
    root = Path(directory) / spec.name
    atomic_save_tensors(root / spec.heads, {"weight": tensors.weight.float(), "bias": tensors.bias.float()})
    if tensors.delta is not None:
        spec.delta = spec.delta or "delta.safetensors"
        atomic_save_tensors(root / spec.delta, tensors.delta)
    if tensors.unc_factor is not None:
        spec.uncertainty = spec.uncertainty or "uncertainty.safetensors"
        atomic_save_tensors(root / spec.uncertainty, {"factor": tensors.unc_factor.float()})


def load_member(directory: str | Path, spec: MemberSpec) -> MemberTensors:
    root = Path(directory) / spec.name
    try:
        heads = load_file(root / spec.heads)
        weight, bias = heads["weight"].float(), heads["bias"].float()
    except (FileNotFoundError, KeyError) as e:
        raise EnsembleFormatError(f"member {spec.name}: cannot read heads {root / spec.heads}: {e}") from e
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise EnsembleFormatError(
            f"member {spec.name}: heads must be weight [K, H] and bias [K], got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    delta = load_file(root / spec.delta) if spec.delta else None
    unc = load_file(root / spec.uncertainty)["factor"].float() if spec.uncertainty else None
    if unc is not None and unc.shape != (weight.shape[1], weight.shape[1]):
        raise EnsembleFormatError(f"member {spec.name}: uncertainty factor must be [H, H], got {tuple(unc.shape)}")
    return MemberTensors(weight=weight, bias=bias, delta=delta, unc_factor=unc)


def resolve_backbone_path(directory: str | Path, backbone: str) -> str:
    """A relative backbone path is relative to the ensemble directory."""
    if backbone.startswith("builtin:") or os.path.isabs(backbone):
        return backbone
    return str((Path(directory) / backbone).resolve())
