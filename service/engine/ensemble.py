"""The ensemble directory: what a served reward model is on disk.

```
my-rm/
  manifest.json                 # EnsembleManifest below
  member0/heads.safetensors     # weight [K, H], bias [K] (float32)
  member0/delta.safetensors     # optional: backbone tensors that override the base
  member0/uncertainty.safetensors  # optional: factor [H, H], L with M^-1 = L L^T
  member0/ood.safetensors       # optional: mean [H], factor [H, H] (engine/ood.py)
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
from rmserve.service.engine.ood import OodCalibration, OodStats

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
    ood: str | None = None              # OOD statistics of this member's embeddings (engine/ood.py)
    adapter: str | None = None          # how `delta` was trained, for the record: "full" or "lora-r<rank>" (merged)
    trained_layers: list[int] | None = None  # backbone layers `delta` changes (its last N), for the record


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
    ood: dict[str, Any] | None = None      # OodCalibration: threshold, quantile, calibrated_on
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
        if m.ood is not None:
            try:
                OodCalibration.from_dict(m.ood)
            except (KeyError, TypeError, ValueError) as e:
                raise EnsembleFormatError(f"manifest ood must give threshold and quantile: {e}") from e
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _umask_mode() -> int:
    """What open() would give a new file (mkstemp's temp files are 0600, unreadable to the other
    users a shared registry or a container's non-root server may run as)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()  # once, at import: os.umask is process-wide, so never while threads write
# a directory made by mkdtemp (0700) and published by rename gets what mkdir would have given it
DIR_MODE = _FILE_MODE | (_FILE_MODE & 0o444) >> 2


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
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
        os.chmod(tmp, _FILE_MODE)
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
    ood: OodStats | None = None


def member_file(directory: str | Path, spec: MemberSpec, name: str, what: str) -> Path:
    """`<directory>/<member>/<name>`, refused if it resolves (symlinks, `..`, an absolute
    name) outside the ensemble directory: a manifest, which may come from an untrusted
    upload or registry, must not make the server read or write any other file."""
    root = Path(directory).resolve()
    path = (root / spec.name / name).resolve()
    if not path.is_relative_to(root):
        raise EnsembleFormatError(
            f"member {spec.name!r}: {what} file {name!r} resolves to {path}, outside the ensemble directory {root}"
        )
    return path


def save_member(directory: str | Path, spec: MemberSpec, tensors: MemberTensors) -> None:
    heads = member_file(directory, spec, spec.heads, "heads")
    atomic_save_tensors(heads, {"weight": tensors.weight.float(), "bias": tensors.bias.float()})
    if tensors.delta is not None:
        spec.delta = spec.delta or "delta.safetensors"
        atomic_save_tensors(member_file(directory, spec, spec.delta, "delta"), tensors.delta)
    if tensors.unc_factor is not None:
        spec.uncertainty = spec.uncertainty or "uncertainty.safetensors"
        atomic_save_tensors(member_file(directory, spec, spec.uncertainty, "uncertainty"),
                            {"factor": tensors.unc_factor.float()})
    if tensors.ood is not None:
        spec.ood = spec.ood or "ood.safetensors"
        save_ood(directory, spec, tensors.ood)


def save_ood(directory: str | Path, spec: MemberSpec, stats: OodStats) -> None:
    atomic_save_tensors(member_file(directory, spec, spec.ood or "ood.safetensors", "ood"),
                        {"mean": stats.mean.float(), "factor": stats.factor.float()})


def load_member(directory: str | Path, spec: MemberSpec) -> MemberTensors:
    heads_path = member_file(directory, spec, spec.heads, "heads")
    delta_path = member_file(directory, spec, spec.delta, "delta") if spec.delta else None
    unc_path = member_file(directory, spec, spec.uncertainty, "uncertainty") if spec.uncertainty else None
    try:
        heads = load_file(heads_path)
        weight, bias = heads["weight"].float(), heads["bias"].float()
    except (FileNotFoundError, KeyError) as e:
        raise EnsembleFormatError(f"member {spec.name}: cannot read heads {heads_path}: {e}") from e
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise EnsembleFormatError(
            f"member {spec.name}: heads must be weight [K, H] and bias [K], got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    delta = load_file(delta_path) if delta_path else None
    unc = load_file(unc_path)["factor"].float() if unc_path else None
    if unc is not None and unc.shape != (weight.shape[1], weight.shape[1]):
        raise EnsembleFormatError(f"member {spec.name}: uncertainty factor must be [H, H], got {tuple(unc.shape)}")
    ood = None
    if spec.ood:
        t = load_file(member_file(directory, spec, spec.ood, "ood"))
        try:
            ood = OodStats(t["mean"].float(), t["factor"].float())
        except (KeyError, ValueError) as e:
            raise EnsembleFormatError(f"member {spec.name}: bad OOD statistics {spec.ood}: {e}") from e
        if ood.mean.shape[0] != weight.shape[1]:
            raise EnsembleFormatError(f"member {spec.name}: OOD statistics have H={ood.mean.shape[0]}, heads {weight.shape[1]}")
    return MemberTensors(weight=weight, bias=bias, delta=delta, unc_factor=unc, ood=ood)


def resolve_backbone_path(directory: str | Path, backbone: str) -> str:
    """A relative backbone path is relative to the ensemble directory."""
    if backbone.startswith("builtin:") or os.path.isabs(backbone):
        return backbone
    return str((Path(directory) / backbone).resolve())
