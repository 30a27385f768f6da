"""The torch backend: a RewardModel's Hugging Face backbones as trunks of the one engine loop.

`ScoringEngine` is the engine (engine/contract.py: planning, out-of-memory splits, heads,
statistics) over `TorchTrunk`s, one per backbone object (members sharing a trunk,
engine/trunk.py, are served by one forward). This module holds only what is torch's:

- packed batches (the default wherever it measured fastest: CUDA, and CPU in float32):
  sequences concatenated into one token stream `[1, T_total]`, positions restarting at 0 per
  sequence, and varlen attention (engine/varlen.py) that never crosses a sequence boundary.
  No padding at all, and the budget counts real tokens;
- padded batches (CPU bf16 on the sdpa grid, encoders, models not on sdpa): right-padded
  rows, the budget counting padded tokens. CPU bf16 runs the batch-invariant attention,
  which works on rows, so packing there only adds a gather unless its kernel is built;
- shared prefixes (a GRPO group's prompt): the prefix's KV cache, broadcast to the
  group's suffixes (`broadcast_cache`);
- on CUDA, the token budget sized from a measured probe forward (`budget_from_memory`);
  on CPU the configured budget stands.

The last-token gather and the heads are the kernel's (engine/heads.py), the same on every
backend. docs/engine.md has the measurements behind the choices.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache

from rmserve.service.engine import invariant_attention, trunk, varlen
from rmserve.service.engine.backbone import Backbone, find_layers
from rmserve.service.engine.contract import Embeddings, Engine, Trunk
from rmserve.service.engine.heads import LastTokenIndex
from rmserve.service.engine.model import Member, RewardModel, input_device
from rmserve.service.engine.padding import pad_token_id, right_pad

log = logging.getLogger(__name__)

Packing = Literal["auto", "on", "off"]


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def budget_from_memory(
    free_bytes: int,
    probe_tokens: int,
    probe_peak_bytes: int,
    *,
    fraction: float = 0.9,
    granularity: int = 256,
    floor: int = 256,
    ceiling: int = 1 << 20,
) -> int:
    """Tokens per forward that fit `fraction` of the free memory.

    A bare backbone's forward (no cache, no logits) holds activations linear in
    the tokens it computes (FlashAttention keeps attention linear too), so the
    probe's peak above the resident weights, divided by its tokens, is the cost
    of a token. Any fixed overhead in the probe (workspaces) only makes the
    estimate conservative. Rounded down to `granularity`, clamped to [floor, ceiling].
    """
    if probe_tokens <= 0 or probe_peak_bytes <= 0:
        raise ValueError("the probe must have computed tokens and used memory")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    per_token = probe_peak_bytes / probe_tokens
    tokens = int(fraction * free_bytes / per_token) // granularity * granularity
    return max(floor, min(ceiling, tokens))



def broadcast_cache(cache, n: int):
    """A prompt's KV cache (batch 1) for `n` suffix rows, leaving `cache` as it is.

    Each layer's keys and values become stride-0 views (`expand`) of the prompt's: no copy.
    The forward's first `update` concatenates them with the suffix's states (torch.cat
    writes the [n, heads, P + T, d] result either way), so the attention sees exactly the
    tensors that `deepcopy` + `batch_repeat_interleave(n)` gave, without the deep copy of
    the prompt's cache and the n-fold copy before the concatenation (two of the three
    passes over n x the prompt's KV per sub-batch). A cache of another shape (a layer
    holding other tensors) takes that copying path."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in layers]  # the copies' updates leave `cache` alone
        ok = True
        for layer in out.layers:
            for name, v in vars(layer).items():
                if not isinstance(v, torch.Tensor) or (name in ("keys", "values") and not v.numel()):
                    continue  # not a tensor, or a layer that holds no states yet
                if name not in ("keys", "values") or v.dim() != 4 or v.shape[0] != 1:
                    ok = False
                else:
                    setattr(layer, name, v.expand(n, *v.shape[1:]))
        if ok:
            return out
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


def model_device(model: RewardModel) -> torch.device:
    """Where the model takes its inputs: its parameters' device, or for a backbone accelerate
    placed over several devices (engine/sharded.py) the device its dispatch hook runs inputs on."""
    return input_device(model.members[0].backbone.model)


def placed_devices(model: RewardModel) -> set[torch.device]:
    """Every device accelerate placed a backbone's modules on (engine/sharded.py); empty for a
    model on one device, which the engine may move. "disk" and offloaded "cpu" entries count
    as the CPU."""
    out: set[torch.device] = set()
    for m in model.members:
        for d in (getattr(m.backbone.model, "hf_device_map", None) or {}).values():
            out.add(torch.device("cpu") if d == "disk" else torch.device(d))
    return out


@dataclass
class Family:
    """The members one backbone forward serves: a member on a backbone of its own, or members
    sharing a trunk and differing in their top layers (engine/trunk.py)."""

    backbone: Backbone
    members: list[Member]

    @property
    def shared(self) -> bool:
        return self.members[0].top is not None

    @functools.cached_property
    def _blocks(self) -> torch.nn.ModuleList:
        return find_layers(self.backbone.model)[1]  # walks every module: once, not per forward

    def new_caches(self) -> list | None:
        """A fresh cache per member for its own layers (prefix sharing); None for a plain backbone."""
        return [DynamicCache() for _ in self.members] if self.shared else None

    def forward(self, kwargs: dict, caches: list | None = None) -> list[torch.Tensor]:
        if not self.shared:
            return [self.backbone.model(**kwargs).last_hidden_state]
        return trunk.run_shared(self.backbone.model, self._blocks, [m.top for m in self.members], kwargs, caches)


def families(model: RewardModel) -> list[Family]:
    """Members grouped by the backbone object they run on, in member order."""
    out: dict[int, Family] = {}
    for m in model.members:
        out.setdefault(id(m.backbone), Family(m.backbone, [])).members.append(m)
    return list(out.values())


@dataclass
class _Prefix:
    """A shared prefix, run once: its length, the trunk's KV cache and each member's own."""

    length: int
    cache: object
    own: list | None
    key: str            # the forward's name for the cache (_cache_kwarg)


class TorchTrunk(Trunk):
    """A family's backbone forward on `device`, packed or right-padded (see the module's docstring)."""

    def __init__(self, family: Family, device: torch.device, packed: bool, cuda_devices: list[torch.device]):
        self.family = family
        self.members = family.members
        self.device = device
        # an encoder pools its first token: causal only shares a prefix's KV
        self.shares_prefixes = family.backbone.pooling == "last"
        self.packed = packed
        self.pad = pad_token_id(family.backbone.tokenizer)
        self.cuda_devices = cuda_devices  # where its activations live (several: sharded), for measure_budget

    def forward(self, batch: list[list[int]], prefix: _Prefix | None = None) -> Embeddings:
        if prefix is not None:
            return self._forward_suffixes(batch, prefix)
        fam, dev = self.family, self.device
        if self.packed:
            kwargs = varlen.pack(batch, dev)
            return Embeddings([h[0] for h in fam.forward(kwargs)], LastTokenIndex(cu_seqlens=kwargs["cu_seq_lens_q"]))
        ids, mask, lengths = right_pad(batch, self.pad)
        kwargs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        if fam.backbone.pooling == "cls":  # an encoder: never shares a trunk
            out = fam.backbone.model(**kwargs)
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
            return Embeddings([pooled], LastTokenIndex.rows(len(batch), dev))
        return Embeddings(fam.forward(kwargs), LastTokenIndex(lengths=lengths.to(dev)))

    def encode_prefix(self, prefix: list[int]) -> _Prefix:
        fam = self.family
        model = fam.backbone.model
        cache = DynamicCache(config=model.config)
        own = fam.new_caches()
        key = _cache_kwarg(model)
        fam.forward({"input_ids": torch.tensor([prefix], device=self.device), "use_cache": True, key: cache}, own)
        return _Prefix(len(prefix), cache, own, key)

    def _forward_suffixes(self, batch: list[list[int]], prefix: _Prefix) -> Embeddings:
        """Right-padded suffixes against the prefix's KV caches, expanded to the batch (the
        trunk's, and each member's own for its own layers)."""
        p, dev, n = prefix.length, self.device, len(batch)
        ids, suffix_mask, lengths = right_pad(batch, self.pad)
        t = ids.shape[1]
        mask = torch.cat([torch.ones(n, p, dtype=torch.long), suffix_mask], dim=1)
        hiddens = self.family.forward({
            "input_ids": ids.to(dev), "attention_mask": mask.to(dev),
            prefix.key: broadcast_cache(prefix.cache, n),
            "position_ids": (p + torch.arange(t, device=dev))[None, :].expand(n, t), "use_cache": True,
        }, None if prefix.own is None else [broadcast_cache(c, n) for c in prefix.own])
        return Embeddings(hiddens, LastTokenIndex(lengths=lengths.to(dev)))

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure_budget(self, fraction: float) -> int | None:
        """On CUDA: a probe forward's peak memory per token, against what is free (see
        budget_from_memory); the tightest device of a sharded trunk sets it."""
        if not self.cuda_devices:
            return None
        n = min(512, self.family.backbone.max_positions)
        probe = [[1 + (i * 7 + j) % 100 for j in range(n)] for i in range(4)]
        base = {}
        for d in self.cuda_devices:
            torch.cuda.synchronize(d)
            torch.cuda.empty_cache()
            base[d] = torch.cuda.memory_allocated(d)
            torch.cuda.reset_peak_memory_stats(d)
        with torch.inference_mode():
            emb = self.forward(probe)
            del emb
        budgets = []
        for d in self.cuda_devices:
            torch.cuda.synchronize(d)
            peak = torch.cuda.max_memory_allocated(d) - base[d]
            if peak <= 0:  # a device holding no activations (a shard's last norm alone)
                continue
            free, _ = torch.cuda.mem_get_info(d)
            free += torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
            budgets.append(budget_from_memory(free, 4 * n, peak, fraction=fraction))
        return min(budgets) if budgets else None


class ScoringEngine(Engine):
    """The torch backend's engine: the one engine loop over the model's TorchTrunks.

    `token_budget`: tokens per forward (padded tokens on the padded path, real
    ones on the packed path); on CUDA replaced by a measured budget unless
    `memory_fraction` is None. `min_shared_prefix`: sequences sharing at least
    this many leading tokens (a GRPO group's prompt) have that prefix encoded
    once; 0 turns sharing off. `device`: where to run (default: the model's
    device; the model is moved there if it lives elsewhere). `packing`: "auto"
    packs wherever it measured fastest (CUDA; CPU unless bf16, see _auto_packs), "on"/"off" force it.
    """

    def __init__(
        self,
        model: RewardModel,
        *,
        token_budget: int = 4096,
        max_batch: int = 256,
        min_shared_prefix: int = 16,
        device: str | torch.device | None = None,
        packing: Packing = "auto",
        memory_fraction: float | None = 0.9,
    ):
        if packing not in ("auto", "on", "off"):
            raise ValueError(f"packing must be auto, on or off, got {packing!r}")
        self.device = torch.device(device) if device is not None else model_device(model)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        if model_device(model) != self.device:
            if placed_devices(model):
                raise ValueError(f"the model is placed over {sorted(map(str, placed_devices(model)))} by accelerate "
                                 f"and takes its inputs on {model_device(model)}; it cannot move to {self.device}")
            model.to(self.device)
        self.packing = packing
        self._packed: dict[int, bool] = {}
        for m in model.members:
            want = packing == "on" or (packing == "auto" and self._auto_packs(m))
            ok = want and m.backbone.pooling == "last" and varlen.enable_packing(m.backbone.model)
            if packing == "on" and not ok:
                raise ValueError(
                    f"member {m.name}: packing needs a decoder on sdpa attention through transformers' "
                    f"AttentionInterface (pooling={m.backbone.pooling}, "
                    f"attn={getattr(m.backbone.model.config, '_attn_implementation', None)})"
                )
            self._packed[id(m)] = ok
        cuda = []
        if self.device.type == "cuda":
            # a model sharded over several GPUs (engine/sharded.py) holds activations on each
            cuda = sorted({self.device} | {d for d in placed_devices(model) if d.type == "cuda"}, key=str)
        trunks = [TorchTrunk(fam, self.device, self.packs(fam.members[0]), cuda) for fam in families(model)]
        super().__init__(model, trunks, token_budget=token_budget, max_batch=max_batch,
                         min_shared_prefix=min_shared_prefix,
                         memory_fraction=(memory_fraction or 0.9) if self.device.type == "cuda" and memory_fraction is not None else None)

    def _auto_packs(self, m: Member) -> bool:
        """What packing="auto" picks: packed on CUDA, and on CPU unless the member runs the
        batch-invariant attention on its sdpa grid (no C++ compiler for the CPU kernel), which
        gathers a packed stream back into padded rows. Measured on CPU, packed / padded
        throughput: 1.10 in fp32, 0.88 in bf16 on the grid (bench/results/cpu-2026-12-02-r2.md),
        1.17-1.20 in bf16 on the kernel (bench/results/cpu-attention-kernel-2026-12-06.md)."""
        attn = getattr(m.backbone.model.config, "_attn_implementation", None)
        return self.device.type == "cuda" or attn != varlen.INVARIANT_NAME or invariant_attention.packs_in_place()

    def packs(self, member: Member) -> bool:
        """Whether `member` runs packed (padding-free) batches."""
        return self._packed[id(member)]
