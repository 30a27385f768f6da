"""The scoring engine: token ids in, per-sample rewards and uncertainty out.

Two ways to batch (docs/engine.md has the measurements):

- packed (the default wherever it measured fastest: CUDA, and CPU in float32):
  sequences concatenated into one token stream `[1, T_total]`, positions
  restarting at 0 per sequence, and varlen attention (service/engine/varlen.py) that
  never crosses a sequence boundary. No padding at all, and the budget counts
  real tokens.
- padded (CPU bf16, encoders, models not on sdpa): sequences sorted by length
  and cut into right-padded batches under a token budget (padded tokens
  counted), so little compute goes to padding. CPU bf16 runs the batch-invariant
  attention, which works on rows, so packing there only adds a gather.

Either way, one backbone forward per batch and then one `last_token_scores`
launch that gathers the last real token (from lengths or cu_seqlens, never from
the pad token) and computes the heads and their statistics. Sequences sharing a
long prefix (a GRPO group's prompt) have it encoded once (`_score_shared_prefix`).

A batch that runs out of memory is split in half and retried, down to a single
sequence. On CUDA the token budget is sized from a measured probe forward
(`budget_from_memory`); on CPU the configured budget stands.

The engine knows nothing of gRPC or of the queue: it is called from one worker
thread with a list of sequences and returns numpy arrays on the host.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache

from rmserve.kernels import LastTokenScores, last_token_scores
from rmserve.service.engine import invariant_attention, trunk, varlen
from rmserve.service.engine.backbone import Backbone, find_layers
from rmserve.service.engine.errors import EngineOutOfMemory
from rmserve.service.engine.model import Member, RewardModel, input_device
from rmserve.service.engine.padding import pad_token_id, right_pad
from rmserve.service.engine.prefix import PrefixGroup, find_prefix_groups

log = logging.getLogger(__name__)

Packing = Literal["auto", "on", "off"]

# Fault injection, for tests of fault isolation (off unless set): a `score()` call whose
# sequences hold the token id FAULT_TOKEN raises (FAULT_MODE "raise": the whole batch's
# forward fails) or gives NaN scores for those sequences ("nan"). Set here, or in a server
# subprocess by RMSERVE_FAULT_TOKEN=ID[:nan]. Off, it costs one global lookup per batch.
_fault = os.environ.get("RMSERVE_FAULT_TOKEN", "").partition(":")
FAULT_TOKEN: int | None = int(_fault[0]) if _fault[0] else None
FAULT_MODE: Literal["raise", "nan"] = "nan" if _fault[2] == "nan" else "raise"


def _fault_hook(score: Callable[..., EngineOutput]) -> Callable[..., EngineOutput]:
    """Applies FAULT_TOKEN / FAULT_MODE around ScoringEngine.score (see above)."""

    @functools.wraps(score)
    def wrapped(self: ScoringEngine, seqs: list[list[int]]) -> EngineOutput:
        if FAULT_TOKEN is None:
            return score(self, seqs)
        hit = [i for i, s in enumerate(seqs) if FAULT_TOKEN in s]
        if hit and FAULT_MODE == "raise":
            raise RuntimeError(f"injected fault: token {FAULT_TOKEN} in {len(hit)} of {len(seqs)} sequences")
        out = score(self, seqs)
        for name in ("rewards", "mean", "var", "min"):
            getattr(out, name)[hit] = np.nan
        return out

    return wrapped


@dataclass
class BatchStats:
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0    # real + padding actually computed
    forward_s: float = 0.0
    oom_splits: int = 0       # batches split in half after running out of memory


@dataclass
class EngineOutput:
    rewards: np.ndarray              # [N, K] float32, K = all heads of all members
    mean: np.ndarray                 # [N]
    var: np.ndarray                  # [N]
    min: np.ndarray                  # [N]
    epistemic: np.ndarray | None     # [N]
    stats: BatchStats = field(default_factory=BatchStats)
    ood_score: np.ndarray | None = None  # [N]; None unless every member has OOD statistics


def is_oom(err: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; other backends a RuntimeError that says so
    (the CPU allocator's words are "can't allocate memory")."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def plan_batches(lengths: list[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into length-sorted batches whose padded size fits the budget.

    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # sorted ascending, so the newest sequence is the batch's longest
        if cur and ((len(cur) + 1) * lengths[i] > token_budget or len(cur) == max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def plan_packed(lengths: list[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into packed batches whose real-token total fits the budget.

    Packing wastes nothing on padding, so order does not matter for cost; the
    length sort only makes the plan deterministic and keeps each batch's longest
    sequence (max_length, which sizes the attention kernel's grid) close to the rest.
    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        if cur and (total + lengths[i] > token_budget or len(cur) == max_batch):
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    if cur:
        batches.append(cur)
    return batches


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


def stats_tokens(batch: list[list[int]], packed: bool) -> int:
    """Tokens a batch computes: its real tokens packed, batch x longest padded."""
    return sum(map(len, batch)) if packed else len(batch) * max(map(len, batch))


def last_rows(hidden: torch.Tensor, where: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's last real row [B, H] of a forward's hidden states: from cu_seqlens of a
    packed stream [T, H], or from lengths of a padded batch [B, T, H]."""
    if "cu_seqlens" in where:
        return hidden[where["cu_seqlens"][1:].long() - 1]
    lengths = where["lengths"]
    return hidden[torch.arange(lengths.shape[0], device=hidden.device), lengths - 1]


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


def combine_member_stats(
    counts: Sequence[int],
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    minima: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ensemble's mean, population variance and min over all K = sum(K_m) heads,
    from each member's own over its K_m heads (what the kernel computes per launch).

        mean = sum_m K_m mean_m / K
        var  = sum_m K_m (var_m + (mean_m - mean)^2) / K     (law of total variance)
        min  = min over members of min_m

    Exact, and stable: every term is non-negative, unlike E[x^2] - mean^2, which
    cancels when |mean| >> std. One member's statistics are returned as they are.
    Tensors [N], computed in their own dtype.
    """
    if len(means) == 1:
        return means[0], variances[0], minima[0]
    k = sum(counts)
    mean = sum(c * m for c, m in zip(counts, means, strict=True)) / k
    var = sum(c * (v + (m - mean) ** 2) for c, m, v in zip(counts, means, variances, strict=True)) / k
    return mean, var, torch.stack(list(minima)).amin(0)


def member_scores(m: Member, hidden: torch.Tensor, where: dict[str, torch.Tensor]
                  ) -> tuple[LastTokenScores, torch.Tensor | None]:
    """One member's heads on a forward's hidden states (one `last_token_scores` launch: rewards,
    mean/var/min over its heads, epistemic term) and its OOD score (None without statistics).
    `where` finds each sequence's last token: {"lengths": [B]} for [B, T, H] (lengths of 1 for
    rows that already are last tokens, [B, 1, H]) or {"cu_seqlens": [B+1]} for a packed [T, H]."""
    dev = hidden.device
    unc = m.unc_factor.to(dev) if m.unc_factor is not None else None
    out = last_token_scores(hidden, m.weight.to(dev), m.bias.to(dev), unc_factor=unc, **where)
    ood = m.ood.score(last_rows(hidden, where)) if m.ood is not None else None  # [B, H] x [H, H]
    return out, ood


def engine_output(scored: Sequence[tuple[LastTokenScores, torch.Tensor | None]], stats: BatchStats) -> EngineOutput:
    """Every member's scores (in member order) as the ensemble's EngineOutput on the host: all
    heads' rewards side by side, the kernel's per-member statistics combined over all heads, the
    epistemic term averaged over the members that have one, the OOD score over all members (None
    unless every member has one). Every backend reports through this one function."""
    per_member = [s for s, _ in scored]
    oods = [o for _, o in scored]
    ood = torch.stack([o.cpu() for o in oods]).mean(0).numpy() if all(o is not None for o in oods) else None
    rewards = torch.cat([s.rewards.cpu() for s in per_member], dim=1)
    # The kernel's per-member statistics (one source of truth), combined on the host in
    # float64: N values, so it costs nothing.
    host = [[getattr(s, name).cpu().double() for s in per_member] for name in ("mean", "var", "min")]
    mean, var, low = combine_member_stats([s.rewards.shape[1] for s in per_member], *host)
    eps = [s.epistemic.cpu() for s in per_member if s.epistemic is not None]
    epistemic = torch.stack(eps).mean(0) if eps else None
    return EngineOutput(
        rewards=rewards.float().numpy(),
        mean=mean.float().numpy(),
        var=var.float().numpy(),
        min=low.float().numpy(),
        epistemic=None if epistemic is None else epistemic.float().numpy(),
        stats=stats,
        ood_score=ood,
    )


class ScoringEngine:
    """Scores token-id sequences with a RewardModel.

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
        self.model = model
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.min_shared_prefix = min_shared_prefix
        self.device = torch.device(device) if device is not None else model_device(model)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        if model_device(model) != self.device:
            if placed_devices(model):
                raise ValueError(f"the model is placed over {sorted(map(str, placed_devices(model)))} by accelerate "
                                 f"and takes its inputs on {model_device(model)}; it cannot move to {self.device}")
            model.to(self.device)
        self.packing = packing
        self.memory_fraction = memory_fraction
        self._budget_sized = self.device.type != "cuda" or memory_fraction is None
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
        self._families = families(model)

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

    # ------------------------------------------------------------------ API

    @_fault_hook
    @torch.inference_mode()
    def score(self, seqs: list[list[int]]) -> EngineOutput:
        if not seqs:
            raise ValueError("score() needs at least one sequence")
        self._ensure_budget()
        stats = BatchStats()
        by_member = {}
        for fam in self._families:
            for m, out in zip(fam.members, self._score_family(fam, seqs, stats), strict=True):
                by_member[id(m)] = out
        return engine_output([by_member[id(m)] for m in self.model.members], stats)

    @torch.inference_mode()
    def features(self, seqs: list[list[int]], member: int = 0) -> torch.Tensor:
        """Last-token (or pooled) embeddings [N, H] in float32 on the host: what the heads read."""
        self._ensure_budget()
        m = self.model.members[member]
        fam = next(f for f in self._families if any(x is m for x in f.members))
        which = next(i for i, x in enumerate(fam.members) if x is m)
        out = torch.empty(len(seqs), m.backbone.hidden_size, device=self.device)

        def run(idx: list[int]) -> None:
            hiddens, where = self._run(fam, [seqs[i] for i in idx])
            out[idx] = last_rows(hiddens[which], where).float()

        for idx in self._plan(m, [len(s) for s in seqs]):
            self._split_on_oom(idx, run, BatchStats())
        return out.cpu()

    # ------------------------------------------------------------- batching

    def _plan(self, m: Member, lengths: list[int]) -> list[list[int]]:
        planner = plan_packed if self.packs(m) else plan_batches
        return planner(lengths, self.token_budget, self.max_batch)

    def _split_on_oom(self, idx: list[int], run: Callable[[list[int]], None], stats: BatchStats) -> None:
        """run(idx); on out-of-memory, run each half (recursively) instead of failing the batch."""
        try:
            run(idx)
            return
        except RuntimeError as err:
            if not is_oom(err):
                raise
            if len(idx) == 1:
                raise EngineOutOfMemory(
                    f"one sequence does not fit in memory on {self.device} even alone; "
                    "lower the per-sample token limit (--max-tokens) or serve a smaller dtype"
                ) from err
        # outside the except block: the exception's traceback pins the failed batch's activations
        self._free_cache()
        stats.oom_splits += 1
        log.warning("out of memory on a batch of %d sequences; splitting it in half", len(idx))
        half = len(idx) // 2
        self._split_on_oom(idx[:half], run, stats)
        self._split_on_oom(idx[half:], run, stats)

    def _free_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ensure_budget(self) -> None:
        """On CUDA, size the token budget once from a probe forward (see budget_from_memory)."""
        if self._budget_sized:
            return
        self._budget_sized = True
        budgets = []
        # a model sharded over several GPUs (engine/sharded.py) holds activations on each: the
        # tightest device sets the budget
        devices = sorted({self.device} | {d for d in placed_devices(self.model) if d.type == "cuda"}, key=str)
        for fam in self._families:
            n = min(512, fam.backbone.max_positions)
            probe = [[1 + (i * 7 + j) % 100 for j in range(n)] for i in range(4)]
            base = {}
            for d in devices:
                torch.cuda.synchronize(d)
                torch.cuda.empty_cache()
                base[d] = torch.cuda.memory_allocated(d)
                torch.cuda.reset_peak_memory_stats(d)
            with torch.inference_mode():
                hiddens, _ = self._run(fam, probe)
                del hiddens
            for d in devices:
                torch.cuda.synchronize(d)
                peak = torch.cuda.max_memory_allocated(d) - base[d]
                if peak <= 0:  # a device holding no activations (a shard's last norm alone)
                    continue
                free, _ = torch.cuda.mem_get_info(d)
                free += torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
                budgets.append(budget_from_memory(free, 4 * n, peak, fraction=self.memory_fraction or 0.9))
        if not budgets:
            return
        self.token_budget = min(budgets)
        log.info("token budget sized from measured memory: %d tokens per forward", self.token_budget)

    # --------------------------------------------------------------- forward

    def _score_family(self, fam: Family, seqs: list[list[int]], stats: BatchStats
                      ) -> list[tuple[LastTokenScores, torch.Tensor | None]]:
        """For each member of the family: every sequence's rewards, their mean/var/min over the
        member's heads and its epistemic term (None without an uncertainty factor), and its OOD
        score (None without statistics), on the engine's device. One forward per batch serves
        every member of the family."""
        n = len(seqs)
        outs = []
        puts = []
        for m in fam.members:
            scores = LastTokenScores(
                rewards=torch.empty(n, m.weight.shape[0], device=self.device),
                mean=torch.empty(n, device=self.device),
                var=torch.empty(n, device=self.device),
                min=torch.empty(n, device=self.device),
                epistemic=torch.empty(n, device=self.device) if m.unc_factor is not None else None,
            )
            ood = torch.empty(n, device=self.device) if m.ood is not None else None
            outs.append((scores, ood))
            puts.append(self._putter(m, scores, ood))

        def put(idx: list[int], hiddens: list[torch.Tensor], where: dict[str, torch.Tensor]) -> None:
            for fn, hidden in zip(puts, hiddens, strict=True):
                fn(idx, hidden, where)

        groups, alone = [], list(range(len(seqs)))
        if self.min_shared_prefix > 0 and fam.backbone.pooling == "last":  # causal: a prefix's KV is its own
            groups, alone = find_prefix_groups(seqs, self.min_shared_prefix)
        t0 = time.perf_counter()
        for g in groups:
            self._score_shared_prefix(fam, seqs, g, put, stats)

        def run(idx: list[int]) -> None:
            batch = [seqs[i] for i in idx]
            hiddens, where = self._run(fam, batch)
            put(idx, hiddens, where)
            stats.batches += 1
            stats.real_tokens += sum(len(s) for s in batch)
            packed = "cu_seqlens" in where
            stats.padded_tokens += stats_tokens(batch, packed)

        for sub in self._plan(fam.members[0], [len(seqs[i]) for i in alone]):
            self._split_on_oom([alone[i] for i in sub], run, stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.forward_s += time.perf_counter() - t0
        return outs

    def _putter(self, m: Member, scores: LastTokenScores, ood: torch.Tensor | None):
        """put(idx, hidden, where): the member's heads (one kernel launch) into its buffers."""

        def put(idx: list[int], hidden: torch.Tensor, where: dict[str, torch.Tensor]) -> None:
            # a sharded trunk's member layers may end on another device (engine/sharded.py)
            out, member_ood = member_scores(m, hidden.to(self.device), where)
            for name in ("rewards", "mean", "var", "min", "epistemic"):
                buf = getattr(scores, name)
                if buf is not None:
                    buf[idx] = getattr(out, name)
            if ood is not None:
                ood[idx] = member_ood

        return put

    def _run(self, fam: Family, batch: list[list[int]]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """One forward; returns each member's hidden states and how to find each last token
        (lengths or cu_seqlens)."""
        if self.packs(fam.members[0]):
            hiddens, cu = self._forward_packed(fam, batch)
            return hiddens, {"cu_seqlens": cu}
        hiddens, lengths = self._forward(fam, batch)
        return hiddens, {"lengths": lengths}

    def _score_shared_prefix(self, fam: Family, seqs: list[list[int]], g: PrefixGroup, put,
                             stats: BatchStats) -> None:
        """Encode the group's prefix once, then its suffixes against the expanded KV caches
        (the trunk's, and each member's own for its own layers)."""
        p = g.prefix_len
        dev = self.device
        model = fam.backbone.model
        key = _cache_kwarg(model)
        prefix = torch.tensor([seqs[g.members[0]][:p]], device=dev)
        cache = DynamicCache(config=model.config)
        own = fam.new_caches()
        fam.forward({"input_ids": prefix, "use_cache": True, key: cache}, own)
        suffixes = [seqs[i][p:] for i in g.members]
        stats.real_tokens += p
        stats.padded_tokens += p
        pad = pad_token_id(fam.backbone.tokenizer)

        def run(sub: list[int]) -> None:
            batch = [suffixes[i] for i in sub]
            ids, suffix_mask, lengths = right_pad(batch, pad)
            t = ids.shape[1]
            mask = torch.cat([torch.ones(len(batch), p, dtype=torch.long), suffix_mask], dim=1)
            hiddens = fam.forward({
                "input_ids": ids.to(dev), "attention_mask": mask.to(dev), key: broadcast_cache(cache, len(batch)),
                "position_ids": (p + torch.arange(t, device=dev))[None, :].expand(len(batch), t), "use_cache": True,
            }, None if own is None else [broadcast_cache(c, len(batch)) for c in own])
            put([g.members[i] for i in sub], hiddens, {"lengths": lengths.to(dev)})
            stats.batches += 1
            stats.real_tokens += int(lengths.sum())
            stats.padded_tokens += len(batch) * t

        for sub in plan_batches([len(s) for s in suffixes], self.token_budget, self.max_batch):
            self._split_on_oom(sub, run, stats)

    def _forward(self, fam: Family, batch: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Right-padded forward. Returns (each member's hidden [B, T, H], lengths [B]) on the engine's device."""
        ids, mask, lengths = right_pad(batch, pad_token_id(fam.backbone.tokenizer))
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if fam.backbone.pooling == "cls":  # an encoder: never shares a trunk
            out = fam.backbone.model(**kwargs)
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
            return [pooled[:, None, :]], torch.ones(len(batch), dtype=torch.long, device=self.device)
        return fam.forward(kwargs), lengths.to(self.device)

    def _forward_packed(self, fam: Family, batch: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Padding-free forward of one packed stream. Returns (each member's hidden [T_total, H], cu_seqlens [B+1])."""
        kwargs = varlen.pack(batch, self.device)
        return [h[0] for h in fam.forward(kwargs)], kwargs["cu_seq_lens_q"]


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
