"""Run the frozen layers once: cache the hidden states entering the first trained layer.

Fine-tuning the last N of L layers only changes what happens after layer L-N,
so the first L-N layers give the same states in every epoch and for every
member. They are computed once (a forward pre-hook on layer L-N captures its
input and aborts the pass), and training then runs only the last N layers: the
model is called with `inputs_embeds=<cached states>` while its first L-N blocks
are swapped for pass-throughs. Measured on the 2-core CPU with SmolLM2 (30
layers), forward + backward of the last 2 layers costs ~3x their forward, so
an epoch costs about a fifth of the full forward it replaces.

That call pattern works for decoders whose forward goes embeddings -> blocks ->
final norm with nothing in between (Llama, Mistral, Qwen, SmolLM...). It is
checked on real sequences before use (`check`): where it does not reproduce the
full forward (e.g. a model that rescales inputs_embeds), training falls back to
full forwards and says so.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rmserve.service.engine.backbone import find_layers
from rmserve.service.engine.contract import plan_batches
from rmserve.service.engine.ensemble import atomic_save_tensors
from rmserve.service.engine.padding import right_pad
from rmserve.training.events import TrainingStopped
from rmserve.training.features import backbone_fingerprint, sequences_fingerprint
from rmserve.training.tuning import embed

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Passthrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@dataclass
class FrozenStates:
    states: torch.Tensor     # [total tokens, H] float32, sequences back to back
    offsets: torch.Tensor    # [N + 1]
    first_layer: int         # index of the first trained block

    def padded(self, ids: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [B, T, H] states of sequences `ids`, and their lengths."""
        lengths = torch.tensor([int(self.offsets[i + 1] - self.offsets[i]) for i in ids])
        x = torch.zeros(len(ids), int(lengths.max()), self.states.shape[1])
        for row, i in enumerate(ids):
            x[row, : lengths[row]] = self.states[self.offsets[i] : self.offsets[i + 1]]
        return x.to(device), lengths.to(device)


@contextmanager
def skipping(model: nn.Module, n: int) -> Iterator[None]:
    """The first `n` blocks of `model` replaced by pass-throughs, for the duration."""
    _, blocks = find_layers(model)
    saved = [blocks[i] for i in range(n)]
    for i in range(n):
        blocks[i] = _Passthrough()
    try:
        yield
    finally:
        for i, m in enumerate(saved):
            blocks[i] = m


def cached(
    model: nn.Module,
    seqs: list[list[int]],
    first_layer: int,
    *,
    cache_dir: Path | None,
    pad_id: int,
    token_budget: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[FrozenStates, str, bool]:
    """`compute`, read from / written to `cache_dir` (key: backbone weights, token ids, layer)."""
    key = hashlib.sha256(
        f"{backbone_fingerprint(model)}{sequences_fingerprint(seqs)}prefix{first_layer}".encode()
    ).hexdigest()[:32]
    path = cache_dir / f"prefix-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            t = load_file(path)
            if t["offsets"].shape == (len(seqs) + 1,) and t["states"].shape[0] == int(t["offsets"][-1]):
                return FrozenStates(t["states"], t["offsets"], first_layer), key, True
        except Exception as e:  # a corrupt cache file is recomputed, never trusted
            log.warning("ignoring unreadable prefix cache %s: %s", path, e)
    states = compute(model, seqs, first_layer, pad_id=pad_id, token_budget=token_budget,
                     progress=progress, should_stop=should_stop)
    if path is not None:
        atomic_save_tensors(path, {"states": states.states, "offsets": states.offsets})
    return states, key, False


@torch.no_grad()
def compute(
    model: nn.Module,
    seqs: list[list[int]],
    first_layer: int,
    *,
    pad_id: int,
    token_budget: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FrozenStates:
    """States entering block `first_layer` for every sequence; blocks from there on never run."""
    _, blocks = find_layers(model)
    lengths = [len(s) for s in seqs]
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    states = torch.empty(int(offsets[-1]), model.config.hidden_size)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        captured["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _Stop

    handle = blocks[first_layer].register_forward_pre_hook(hook, with_kwargs=True)
    done = 0
    try:
        for idx in plan_batches(lengths, token_budget, 256):
            if should_stop is not None and should_stop():
                raise TrainingStopped("stopped while caching the frozen layers")
            ids, mask, _ = right_pad([seqs[i] for i in idx], pad_id, next(model.parameters()).device)
            with suppress(_Stop):
                model(input_ids=ids, attention_mask=mask)
            h = captured.pop("h").float().cpu()
            for row, i in enumerate(idx):
                states[offsets[i] : offsets[i + 1]] = h[row, : lengths[i]]
            done += len(idx)
            if progress is not None:
                progress(done, len(seqs))
    finally:
        handle.remove()
    return FrozenStates(states, offsets, first_layer)


def embed_from(
    model: nn.Module, states: FrozenStates, ids: list[int], *, pooling: str, device: torch.device, amp: bool = False
) -> torch.Tensor:
    """Last-token embeddings [B, H] running only the blocks from `states.first_layer` on."""
    if pooling != "last":
        raise ValueError("the prefix cache supports last-token pooling (decoders) only")
    x, lengths = states.padded(ids, device)
    mask = (torch.arange(x.shape[1], device=device)[None, :] < lengths[:, None]).long()
    with skipping(model, states.first_layer), torch.autocast(device.type, dtype=torch.bfloat16,
                                                            enabled=amp and device.type == "cuda"):
        out = model(inputs_embeds=x, attention_mask=mask)
    return out.last_hidden_state[torch.arange(len(ids), device=device), lengths - 1].float()


@torch.no_grad()
def embed_all_from(model: nn.Module, states: FrozenStates, *, device: torch.device, token_budget: int = 4096) -> torch.Tensor:
    """Embeddings [N, H] of every cached sequence in fp32, batched like the engine, on CPU."""
    n = len(states.offsets) - 1
    lengths = (states.offsets[1:] - states.offsets[:-1]).tolist()
    out = torch.empty(n, model.config.hidden_size)
    for idx in plan_batches(lengths, token_budget, 256):
        out[idx] = embed_from(model, states, idx, pooling="last", device=device).cpu()
    return out


@torch.no_grad()
def check(model: nn.Module, states: FrozenStates, seqs: list[list[int]], ids: list[int], *, pad_id: int) -> str | None:
    """None if the cached path reproduces full forwards on `ids`, else why not."""
    device = next(model.parameters()).device
    try:
        full = embed(model, [seqs[i] for i in ids], pad_id=pad_id, pooling="last", device=device)
        via = embed_from(model, states, ids, pooling="last", device=device)
    except Exception as e:  # an architecture whose blocks cannot be skipped this way
        return f"{type(e).__name__}: {e}"
    err = float((full - via).abs().max())
    tol = 1e-4 * max(1.0, float(full.abs().max()))
    return None if err <= tol else f"cached path differs from the full forward by {err:.2e} (> {tol:.1e})"
