"""Members that share a backbone's lower layers: one trunk forward, each member's own top layers.

A members ensemble fine-tunes the last N layers of one base checkpoint per
member (training/tuning.py), and members may cut the base at different depths.
Running K full backbones would cost K times what one costs although the first
layers are identical. Here the members of one base form a family: the base
runs once, up to the deepest layer any member still shares, and forward
pre-hooks capture the hidden states (and the layer kwargs: masks, rotary
embeddings, packing offsets, cache) entering every layer where some member's
own layers begin. Each member then runs its own copies of the remaining layers
with the trained weights applied, and its own final norm.

Each member's layers are copies of the base's with `layer_idx` renumbered from 0,
so a member keeps its KV (GRPO prefix sharing) in a cache of its own; the
trunk's cache holds the shared layers only. The copies share the base's config
object, so switching the attention implementation (packing, the batch-invariant
attention) switches them too. Scores equal each member run alone: the same
modules, the same inputs, the same kernels (tests/test_trunk.py).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rmserve.service.engine.backbone import find_layers

CACHE_KWARGS = ("cache", "past_key_values")  # transformers renamed past_key_values to cache (5.2x)


@dataclass
class Top:
    """A member's own part of a shared backbone: layers [start, cut) and the final norm."""

    start: int          # first base layer the member replaces; == its cut when it only has its own norm
    module: nn.Module   # ModuleDict(layers=ModuleList, norm=...)

    @property
    def layers(self) -> nn.ModuleList:
        return self.module["layers"]

    @property
    def norm(self) -> nn.Module:
        return self.module["norm"]


class _Captured(Exception):
    """Raised by the last capture hook: nothing above it is shared, so the trunk stops there."""


def shareable(model: nn.Module) -> bool:
    """A decoder whose blocks are one ModuleList followed by a final `norm` (Llama, Qwen, Mistral...)."""
    try:
        find_layers(model)
    except ValueError:
        return False
    return isinstance(getattr(model, "norm", None), nn.Module) and not getattr(model.config, "is_encoder_decoder", False)


def delta_start(model: nn.Module, delta: dict[str, torch.Tensor] | None, cut: int) -> int | None:
    """The first layer a member's trained tensors touch (its cut if only the norm or nothing),
    or None when they touch anything else (embeddings...): that member cannot share a trunk."""
    prefix, _ = find_layers(model)
    start = cut
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    for name in delta or {}:
        if m := pattern.match(name):
            start = min(start, int(m.group(1)))
        elif not name.startswith("norm."):
            return None
    return start


def build_top(model: nn.Module, delta: dict[str, torch.Tensor] | None, start: int, cut: int) -> Top:
    """Copies of the base's layers [start, cut) and norm with `delta` (base state-dict names) applied."""
    prefix, blocks = find_layers(model)
    if not 0 <= start <= cut <= len(blocks):
        raise ValueError(f"a member's own layers [{start}, {cut}) must lie within the base's {len(blocks)}")
    memo = {id(model.config): model.config}  # share the config: attention switches apply to the copies
    layers = nn.ModuleList(copy.deepcopy(blocks[i], memo) for i in range(start, cut))
    for j, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j  # the member's own cache numbers its layers from 0
    module = nn.ModuleDict({"layers": layers, "norm": copy.deepcopy(model.norm, memo)})
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    local: dict[str, torch.Tensor] = {}
    for name, t in (delta or {}).items():
        if m := pattern.match(name):
            i = int(m.group(1))
            if not start <= i < cut:
                raise ValueError(f"trained tensor {name} lies outside the member's own layers [{start}, {cut})")
            local[f"layers.{i - start}.{m.group(2)}"] = t
        else:
            local[name] = t
    missing = set(local) - set(module.state_dict())
    if missing:
        raise ValueError(f"trained tensors the base lacks: {sorted(missing)[:5]}")
    module.load_state_dict(local, strict=False)
    module.eval().requires_grad_(False)
    return Top(start, module)


def _to(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists, dicts) moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def cache_key(kwargs: dict[str, Any]) -> str | None:
    return next((k for k in CACHE_KWARGS if k in kwargs), None)


def run_shared(model: nn.Module, blocks: nn.ModuleList, tops: list[Top], kwargs: dict[str, Any],
               caches: list[Any] | None = None) -> list[torch.Tensor]:
    """One forward of the shared trunk, then every member's own layers and norm.

    `blocks`: the base's transformer blocks (find_layers, looked up once by the caller).
    `kwargs` are the base model's forward kwargs (with an explicit cache when caching).
    `caches`: one cache per member for its own layers (prefix sharing), or None.
    Returns each member's last hidden states, shaped as the base model's would be.
    """
    n = int(model.config.num_hidden_layers)
    starts = sorted({t.start for t in tops})
    stop = starts[-1]
    captured: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def hook_at(i: int):
        def hook(module, args, kw):
            h = args[0] if args else kw["hidden_states"]
            captured[i] = (h, {k: v for k, v in kw.items() if k != "hidden_states"})
            if i == stop and i < n:
                raise _Captured
        return hook

    handles = [(blocks[i] if i < n else model.norm).register_forward_pre_hook(hook_at(i), with_kwargs=True)
               for i in starts]
    try:
        model(**kwargs)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    out = []
    for j, top in enumerate(tops):
        h, kw = captured[top.start]  # a member with layers starts below n: the kwargs its first layer gets
        # where the member's layers run: a trunk split over devices (engine/sharded.py) leaves the
        # captured activations and kwargs on other devices; on one device these moves are no-ops
        dev = next(top.module.parameters(), h).device
        h, kw = h.to(dev), {k: _to(v, dev) for k, v in kw.items()}
        if (key := cache_key(kw)) is not None:
            kw[key] = caches[j] if caches is not None else None
        for layer in top.layers:
            h = layer(h, **kw)
            h = h[0] if isinstance(h, tuple) else h
        out.append(top.norm(h))
    return out
