"""Fine-tuning part of a backbone, and getting it back out as a member `delta`.

Two modes over the last N transformer layers: full fine-tuning of their
parameters (plus the final norm), or peft LoRA on their linear layers, merged
into the weights at the end. Either way the delta is a dict of ordinary
backbone tensors (names as in the bare model's state_dict), which is what
`load_backbone(..., delta=)` applies at serving time.

The model stays in eval mode while training: no dropout, so the forward pass is
the one serving runs and training is deterministic (TRL disables dropout for
reward models for the same reason).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from rmserve.service.engine.backbone import find_layers
from rmserve.service.engine.contract import plan_batches
from rmserve.service.engine.padding import right_pad


def _final_norm_params(model: nn.Module, layers_prefix: str) -> list[str]:
    """Parameters outside the layers and the embedding block: the final norm (and BERT's pooler)."""
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    emb_block = emb_name.rpartition(".")[0]
    out = []
    for n, _ in model.named_parameters():
        if n.startswith(layers_prefix + ".") or n.startswith(emb_name + "."):
            continue
        if emb_block and n.startswith(emb_block + "."):
            continue
        out.append(n)
    return out


@dataclass
class Tuned:
    """A backbone prepared for training; `model` may be a peft wrapper around `base`."""

    model: nn.Module
    base: nn.Module
    names: list[str]                                  # trainable parameter names in `model`
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensors that may change
    lora: bool = False

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(state[n])

    def finish(self) -> dict[str, torch.Tensor]:
        """Merge (LoRA), freeze, and return the delta; `base` now holds the trained weights."""
        if self.lora:
            self.base = self.model.merge_and_unload()
            self.model = self.base
        self.base.requires_grad_(False)
        sd = self.base.state_dict()
        return {n: sd[n].detach().float().clone() for n in self.original}

    def restore(self) -> None:
        """Put the untrained weights back, so the next member starts from the same base."""
        self.base.load_state_dict(self.original, strict=False)


def make_trainable(
    model: nn.Module, *, layers: int, lora_rank: int = 0, lora_alpha: float | None = None, seed: int = 0
) -> Tuned:
    """Unfreeze the last `layers` blocks (all if layers < 0), fully or through LoRA of rank `lora_rank`."""
    prefix, blocks = find_layers(model)
    n = len(blocks) if layers < 0 else min(layers, len(blocks))
    if n == 0:
        raise ValueError("make_trainable needs at least one layer to train")
    chosen = range(len(blocks) - n, len(blocks))
    model.requires_grad_(False)
    if lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:  # pragma: no cover - peft is a dev/training extra
            raise ImportError("LoRA training needs peft: pip install peft") from e
        targets = [
            f"{prefix}.{i}.{name}" for i in chosen
            for name, mod in blocks[i].named_modules() if isinstance(mod, nn.Linear)
        ]
        original = {f"{t}.weight": model.get_submodule(t).weight.detach().clone() for t in targets}
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, target_modules=targets, lora_dropout=0.0)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)  # LoRA init draws from the global RNG: seed it here, restore it after
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
        names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        return Tuned(peft_model, model, names, original, lora=True)
    names = [n for n, _ in model.named_parameters() if any(n.startswith(f"{prefix}.{i}.") for i in chosen)]
    names += _final_norm_params(model, prefix)
    params = dict(model.named_parameters())
    for nm in names:
        params[nm].requires_grad_(True)
    original = {nm: params[nm].detach().clone() for nm in names}
    return Tuned(model, model, names, original)


def embed(
    model: nn.Module, seqs: list[list[int]], *, pad_id: int, pooling: str, device: torch.device, amp: bool = False
) -> torch.Tensor:
    """Last-token (or pooled) embeddings [B, H], right-padded exactly like the serving engine.

    `amp`: bf16 autocast, for training on GPU only (CPU trains in fp32, as it serves).
    """
    ids, mask, lengths = right_pad(seqs, pad_id, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        out = model(input_ids=ids, attention_mask=mask)
    if pooling == "cls":
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return pooled.float()
    hidden = out.last_hidden_state
    return hidden[torch.arange(len(seqs), device=device), lengths - 1].float()


@torch.no_grad()
def embed_all(
    model: nn.Module, seqs: list[list[int]], *, pad_id: int, pooling: str, device: torch.device, token_budget: int = 4096
) -> torch.Tensor:
    """Embeddings [N, H] of many sequences in fp32, batched like the engine, returned on CPU."""
    out = torch.empty(len(seqs), model.config.hidden_size)
    for idx in plan_batches([len(s) for s in seqs], token_budget, 256):
        out[idx] = embed(model, [seqs[i] for i in idx], pad_id=pad_id, pooling=pooling, device=device).cpu()
    return out
