"""Resumable training state: safetensors + JSON, written atomically.

Layout of `<out>/checkpoint/`:

```
state.json                  # position, config, data fingerprint, which tensors file is current
tensors-<n>.safetensors     # current member: heads, trainable backbone tensors, optimizer state
member<m>.safetensors       # each finished member: heads, delta, training-set embeddings
```

The tensors file gets a new name each time and state.json (written last,
atomically) points at it, so a crash at any moment leaves the previous
consistent checkpoint. Optimizer state is flattened into tensors plus JSON:
no pickle anywhere.

`prepare_out` opens the output directory for a run (a fresh start or the
checkpoint to resume); `save_position` / `restore_position` and `save_finished` /
`load_finished` are what the training loop writes and reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rmserve.service.data.train_config import TrainConfig
from rmserve.service.engine.ensemble import MANIFEST, atomic_save_tensors, atomic_write_bytes
from rmserve.training.members import Member, Trainable

STATE = "state.json"
FORMAT = "rmserve-train-checkpoint/1"
REPORT = "train_report.json"   # in the output directory: the training report
LOG = "train_log.jsonl"        # one JSON line per progress event
CHECKPOINT = "checkpoint"      # this directory, inside the output directory

Resumed = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (state.json, the current tensors file)


def prepare_out(cfg: TrainConfig) -> Resumed | None:
    """The checkpoint to resume (`cfg.resume`), or None once `cfg.out` is ready for a fresh run.

    Refuses to resume across a training-relevant config change, and to replace an
    ensemble or checkpoint without `overwrite`; an overwritten ensemble loses its
    manifest first, so the directory is never half old, half new.
    """
    out = Path(cfg.out)
    ckpt_dir = out / CHECKPOINT
    if cfg.resume:
        found = load(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        diffs = cfg.differences(found[0]["config"])
        if diffs:
            raise ValueError(f"--resume: the checkpoint was trained with different {', '.join(diffs)}")
        return found
    existing = [p for p in (out / MANIFEST, ckpt_dir) if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds {existing[0].name}; pass overwrite (--overwrite) to replace it "
            "or resume (--resume) to continue its checkpoint"
        )
    if existing:  # an ensemble we wrote: the manifest goes first, so it is never half-replaced
        (out / MANIFEST).unlink(missing_ok=True)
        for p in [*out.glob("member[0-9]*"), ckpt_dir, *out.glob("eval_*.json")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for name in (REPORT, LOG):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def state(serial: int, cfg: TrainConfig, fingerprint: str, members_done: int) -> dict[str, Any]:
    """state.json's job-wide part; `serial` numbers the writes (the tensors file's name)."""
    return {"serial": serial, "config": cfg.to_dict(), "fingerprint": fingerprint, "members_done": members_done}


def save_position(directory: Path, st: dict[str, Any], trainable: Trainable, m: int, epoch: int, step: int) -> None:
    """Member m mid-training: heads, trainable backbone tensors and optimizer state at (epoch, step)."""
    tensors, opt_meta = optimizer_to_tensors(trainable.opt)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    tensors["head.weight"], tensors["head.bias"] = trainable.weight.detach().cpu(), trainable.bias.detach().cpu()
    if trainable.tuned is not None:
        tensors.update({f"param.{n}": t.cpu() for n, t in trainable.tuned.trainable_state().items()})
    st["current"] = {"member": m, "epoch": epoch, "step": step, "optimizer": opt_meta}
    save(directory, st, tensors)


def restore_position(resumed: Resumed, trainable: Trainable, device: torch.device) -> tuple[int, int]:
    """Load what `save_position` wrote into `trainable`; returns the (epoch, step) to continue at."""
    st, tensors = resumed
    cur = st["current"]
    with torch.no_grad():
        trainable.weight.copy_(tensors["head.weight"])
        trainable.bias.copy_(tensors["head.bias"])
    if trainable.tuned is not None:
        trainable.tuned.load_trainable_state({n: tensors[f"param.{n}"].to(device) for n in trainable.tuned.names})
    optimizer_from_tensors(trainable.opt, tensors, cur["optimizer"])
    return cur["epoch"], cur["step"]


def save_finished(directory: Path, m: int, member: Member, st: dict[str, Any]) -> None:
    """A finished member's tensors, then the state that counts it done (no current position)."""
    tensors = {"weight": member.weight, "bias": member.bias, "embeddings": member.embeddings}
    if member.delta:
        tensors.update({f"delta.{n}": t for n, t in member.delta.items()})
    save_member(directory, m, tensors)
    save(directory, st, {})


def load_finished(directory: Path, m: int) -> Member:
    t = load_member(directory, m)
    delta = {n.removeprefix("delta."): v for n, v in t.items() if n.startswith("delta.")} or None
    return Member(t["weight"], t["bias"], delta, t["embeddings"])


def save(directory: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    n = int(state.get("serial", 0))
    name = f"tensors-{n:08d}.safetensors"
    atomic_save_tensors(directory / name, tensors)
    atomic_write_bytes(directory / STATE, json.dumps({**state, "format": FORMAT, "tensors": name}, indent=1).encode())
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    path = directory / STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an rmserve training checkpoint (format {state.get('format')!r})")
    return state, load_file(directory / state["tensors"])


def save_member(directory: Path, m: int, tensors: dict[str, torch.Tensor]) -> None:
    atomic_save_tensors(directory / f"member{m}.safetensors", tensors)


def load_member(directory: Path, m: int) -> dict[str, torch.Tensor]:
    return load_file(directory / f"member{m}.safetensors")


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json-able rest) of an optimizer state_dict."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "indices": [int(i) for i in sd["state"]]}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "opt."
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for idx in meta["indices"]:
        st = {k.removeprefix(f"{prefix}{idx}."): v for k, v in tensors.items() if k.startswith(f"{prefix}{idx}.")}
        st.update(meta["scalars"].get(str(idx), {}))
        state[idx] = st
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
