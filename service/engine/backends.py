"""Backends: what runs the forward behind the one scheduler, API, engine loop and heads.

Every backend turns a served model directory into a `RewardModel` (the facts model
info reports, the heads, the uncertainty and OOD statistics) and an `Engine` whose
`score(seqs) -> EngineOutput` the server's worker thread calls. The engine is the same loop
for all (engine/contract.py: planning, out-of-memory splits, heads, statistics); a backend
only implements its `Trunk`, the last-token embeddings of a planned batch per member:

- `torch` (default): `TorchTrunk` (service/engine/scoring.py), packed or padded
  batches, shared GRPO prefixes, members sharing a trunk.
- `onnx`: a directory written by `rmserve export-onnx`, run by onnxruntime
  (service/engine/onnx_runtime.py). Experimental on CUDA (never run on a GPU).
- `accelerate`: a model too big for one GPU split layer-wise over the node's GPUs by
  accelerate's `device_map` (service/engine/sharded.py); the trunk is the torch backend's.
  Experimental over several GPUs (run between the CPU and disk only).
- `vllm` (experimental, never run on a GPU): vLLM's pooling runner (tensor parallel) computes
  last-token hidden states, rmserve's heads score them (service/engine/vllm_backend.py).

`rmserve serve --backend NAME` picks one; `EXPERIMENTAL` names those never run on their target device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rmserve.service.engine.contract import Engine
from rmserve.service.engine.model import RewardModel, load_model
from rmserve.service.engine.scoring import ScoringEngine


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[..., RewardModel]        # (path, *, dtype, max_tokens, device) -> RewardModel
    engine: Callable[..., Engine]           # (model, *, token_budget) -> Engine
    description: str
    experimental: str = ""                  # why, where it has never run on its target device


def _onnx_load(path: str | Path, **kw) -> RewardModel:
    from rmserve.service.engine import onnx_runtime  # onnxruntime is an optional extra

    return onnx_runtime.load_onnx_model(path, **kw)


def _onnx_engine(model: RewardModel, **kw) -> Engine:
    from rmserve.service.engine import onnx_runtime

    return onnx_runtime.OnnxEngine(model, **kw)


def _accelerate_load(path: str | Path, **kw) -> RewardModel:
    from rmserve.service.engine import sharded  # accelerate: a dependency of the server extra

    return sharded.load_sharded_model(path, **kw)


def _accelerate_engine(model: RewardModel, **kw) -> Engine:
    from rmserve.service.engine import sharded

    return sharded.sharded_engine(model, **kw)


def _vllm_load(path: str | Path, **kw) -> RewardModel:
    from rmserve.service.engine import vllm_backend  # vllm itself is imported when a model loads

    return vllm_backend.load_vllm_model(path, **kw)


def _vllm_engine(model: RewardModel, **kw) -> Engine:
    from rmserve.service.engine import vllm_backend

    return vllm_backend.VllmEngine(model, **kw)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", load_model, ScoringEngine, "PyTorch (packed batches, shared prefixes)"),
    "onnx": Backend("onnx", _onnx_load, _onnx_engine, "onnxruntime over a directory from `rmserve export-onnx`",
                    experimental="the CUDA execution provider has never run on a GPU"),
    "accelerate": Backend("accelerate", _accelerate_load, _accelerate_engine,
                          "one model split over the node's GPUs by accelerate's device_map (pipeline)",
                          experimental="a split over several GPUs has never run (only CPU and disk)"),
    "vllm": Backend("vllm", _vllm_load, _vllm_engine, "vLLM's pooling runner (tensor parallel), rmserve's heads",
                    experimental="never run on a GPU (tested against a fake of vLLM)"),
}

# backends (or parts of them) never run on their target device: docs/backends.md, until a run is in bench/results/
EXPERIMENTAL = {name: b.experimental for name, b in BACKENDS.items() if b.experimental}


def backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "EXPERIMENTAL", "Backend", "Engine", "backend"]
