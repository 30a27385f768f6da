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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rmserve.service.engine.ensemble import atomic_save_tensors, atomic_write_bytes

STATE = "state.json"
FORMAT = "rmserve-train-checkpoint/1"


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
