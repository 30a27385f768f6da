"""`--backend accelerate`: a model too big for one GPU, split layer-wise over the GPUs of one node.

Experimental over several GPUs: the split has run between the CPU and disk only (tests, through
the gRPC server); a GPU split awaits a run recorded in bench/results/ (docs/backends.md).

Hugging Face's big-model inference does the splitting: `from_pretrained(device_map=...)`
places each module (embeddings, each transformer block, the final norm) on a device, and
accelerate's dispatch hooks move the activations from one device to the next, so one forward
runs the blocks in turn on their GPUs (pipeline parallelism without micro-batches: one GPU
computes at a time). rmserve adds nothing to that: this module only threads a `Placement`
through the ordinary loader (service/engine/model.py, backbone.py) and hands the result to
the torch backend's ScoringEngine (its TorchTrunk over a dispatched model), so scheduling, batching, packing, GRPO prefix sharing, the
last-token kernel, the heads, epistemic and OOD terms are the torch backend's.

- The engine builds its inputs on the model's input device (the dispatch hook's execution
  device, the first GPU); the top-level hook returns the last hidden states there, so the heads
  live there too.
- A layer cut is made in the config before loading: the layers past the cut are never read
  and the split counts only the layers served.
- Members sharing a trunk (engine/trunk.py): the trunk is split; each member's own layers
  (copies of the base's, with its trained weights) go on the device where they begin.
- `device_map` values may name "cpu" and "disk": those modules are kept there and brought to
  the GPU for their turn (slow; for models that do not fit the node's GPUs at all). A member's
  trained tensors cannot live on an offloaded module (they would not be applied): an error
  says so.

On a machine without GPUs a device map still splits the model between "cpu" and "disk"
(tests/test_backend_accelerate.py does that, through the gRPC server); the GPU split itself
awaits a machine with several GPUs (docs/big-models.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import torch

from rmserve.service.engine.backbone import Placement, find_layers
from rmserve.service.engine.ensemble import MANIFEST, EnsembleFormatError
from rmserve.service.engine.model import RewardModel, input_device, load_ensemble, load_seqcls
from rmserve.service.engine.scoring import ScoringEngine
from rmserve.service.engine.trunk import Top, build_top

log = logging.getLogger(__name__)

# accelerate's strategies (`from_pretrained(device_map=...)`): over every visible GPU, then CPU, then disk
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | dict | None) -> str | dict[str, int | str]:
    """A strategy name, a JSON object {module: device}, or a JSON file holding one."""
    if spec is None or spec == "":
        return "auto"
    if isinstance(spec, dict):
        return spec
    if spec in STRATEGIES:
        return spec
    text = Path(spec).read_text() if not spec.lstrip().startswith("{") and Path(spec).is_file() else spec
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"device map must be one of {', '.join(STRATEGIES)}, a JSON object "
                         f'{{"module": device}} or a file holding one; got {spec!r}')
    return value


def parse_max_memory(spec: str | dict | None) -> dict[int | str, int | str] | None:
    """`0=70GiB,1=70GiB,cpu=200GiB` (or a JSON object): the most each device may hold."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        items = spec.items()
    elif spec.lstrip().startswith("{"):
        items = json.loads(spec).items()
    else:
        try:
            items = [tuple(part.split("=", 1)) for part in spec.split(",") if part.strip()]
            if any(len(kv) != 2 for kv in items):
                raise ValueError
        except ValueError:
            raise ValueError(f"max memory must read like 0=70GiB,1=70GiB,cpu=200GiB; got {spec!r}") from None
    out: dict[int | str, int | str] = {}
    for k, v in items:
        k = str(k).strip()
        out[int(k) if k.isdigit() else k] = int(v) if isinstance(v, int) or str(v).strip().isdigit() else str(v).strip()
    return out


def _uses_gpus(device_map: str | dict) -> bool:
    if isinstance(device_map, str):  # a strategy spreads over the visible GPUs, if any
        return torch.cuda.is_available()
    return any(d not in ("cpu", "disk") for d in device_map.values())


def _offload_folder() -> str:
    """Where "disk" modules go unless the operator names a folder: a temporary one per load,
    removed with the model it holds (load_sharded_model)."""
    return tempfile.mkdtemp(prefix="rmserve-offload-")


def load_sharded_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = "auto",
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
) -> RewardModel:
    """Load `path` (an ensemble directory or a one-label seq-cls checkpoint) split over devices.

    `device_map`: a strategy (auto, balanced, balanced_low_0, sequential) or {module: device};
    `max_memory`: caps per device ("0=70GiB,1=70GiB" or a dict); `device` is not used (the
    device map places the model; the heads go where its inputs go) and is accepted for the
    backend seam's signature. On the CPU (no GPU named or visible) the model serves float32:
    the CPU bf16 mode (engine/precision.py) is the torch backend's.
    """
    del device
    path = Path(path)
    dm = parse_device_map(device_map)
    folder = offload_folder or _offload_folder()
    try:
        model = _load_placed(path, dtype, max_tokens, dm, Placement(dm, parse_max_memory(max_memory), folder))
    except BaseException:
        if offload_folder is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if offload_folder is None:
        # its "disk" weights go with the model: a server swapping versions all day keeps one copy
        # per loaded version, not one per load until exit (finalize also runs at exit)
        weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def _load_placed(path: Path, dtype: str, max_tokens: int | None, dm, placement: Placement) -> RewardModel:
    target = torch.device("cuda") if _uses_gpus(dm) else torch.device("cpu")
    if target.type == "cpu":
        if dtype not in ("auto", "float32"):
            raise ValueError(f"--backend accelerate without GPUs serves float32 only (asked: {dtype}); "
                             "bf16 on the CPU is --backend torch's")
        dtype = "float32"
    if (path / MANIFEST).is_file():
        model = load_ensemble(path, dtype, max_tokens, target, placement)
    elif (path / "config.json").is_file():
        model = load_seqcls(path, dtype, max_tokens, target, placement)
    else:
        raise EnsembleFormatError(f"{path} is neither an rmserve ensemble (no {MANIFEST}) nor a Hugging Face "
                                  "checkpoint (no config.json)")
    model.heads_to(input_device(model.members[0].backbone.model))
    for bb in {id(m.backbone): m.backbone for m in model.members}.values():
        where = Counter(str(d) for d in (getattr(bb.model, "hf_device_map", None) or {"": "?"}).values())
        log.info("%s placed by accelerate: %s (inputs on %s)", bb.name, dict(where), input_device(bb.model))
    return model


def sharded_engine(model: RewardModel, **kw) -> ScoringEngine:
    """The torch backend's engine, running on the sharded model's input device."""
    return ScoringEngine(model, device=input_device(model.members[0].backbone.model), **kw)


def _execution_device(module: torch.nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def build_tops(model: torch.nn.Module, deltas: list[dict | None], spans: list[tuple[int, int]]) -> list[Top]:
    """trunk.build_top for a base accelerate dispatched: each member's copies of layers
    [start, cut) and the norm, without the dispatch hooks they were copied with, on the device
    where layer `start` runs (trunk.run_shared moves the captured activations there)."""
    from accelerate.hooks import remove_hook_from_module

    _, blocks = find_layers(model)
    tops = []
    for delta, (start, cut) in zip(deltas, spans, strict=True):
        own = [*list(blocks)[start:cut], model.norm]
        if any(p.device.type == "meta" for mod in own for p in mod.parameters()):
            raise ValueError(f"a member's own layers [{start}, {cut}) would be offloaded to the CPU or disk by the "
                             "device map; members sharing a trunk need them on a GPU (raise --max-memory) "
                             "or --backend torch")
        top = build_top(model, delta, start, cut)
        remove_hook_from_module(top.module, recurse=True)
        top.module.to(_execution_device(blocks[start] if start < len(blocks) else model.norm))
        tops.append(top)
    return tops


__all__ = ["STRATEGIES", "build_tops", "load_sharded_model", "parse_device_map", "parse_max_memory", "sharded_engine"]
