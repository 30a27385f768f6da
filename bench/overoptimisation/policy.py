"""The policy: held-out prompts and SmolLM2-135M-Instruct samples for them, on CPU.

Prompts come from HH-harmless *dev* (never seen by the gold or the proxy): a
conversation minus its last assistant turn. Only prompts that render short are
kept, so that a 2-core CPU can sample and score thousands of responses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rmserve.training.data import load_pairs

Message = dict[str, str]


@dataclass
class Prompt:
    key: str                 # "dev:<line>": stable across runs, the gold cache's key
    messages: list[Message]  # ends with a user turn


def select_prompts(dev_path: str | Path, count: int, max_tokens: int, tokenizer, seed: int) -> list[Prompt]:
    """`count` distinct dev prompts whose chat-template rendering is at most `max_tokens` tokens,
    drawn with `seed` (short prompts keep sampling and scoring cheap; the draw keeps them varied)."""
    pairs, _ = load_pairs(dev_path)
    seen: set[str] = set()
    eligible: list[Prompt] = []
    for p in pairs:
        text = tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
        if text in seen or len(tokenizer(text, add_special_tokens=False).input_ids) > max_tokens:
            continue
        seen.add(text)
        eligible.append(Prompt(p.source.replace(str(dev_path), "dev"), [dict(m) for m in p.prompt]))
    if len(eligible) < count:
        raise ValueError(f"only {len(eligible)} dev prompts render to <= {max_tokens} tokens, {count} wanted")
    return random.Random(seed).sample(eligible, count)


class Policy:
    """SmolLM2-135M-Instruct (the backbone rmserve scores with) as a sampler."""

    def __init__(self, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rmserve.service.engine.backbone import resolve_builtin

        if threads:
            torch.set_num_threads(threads)
        path = resolve_builtin("smollm2-135m-instruct")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def sample(self, messages: Sequence[Message], n: int, *, seed: int, max_new_tokens: int = 48,
               temperature: float = 1.0, batch: int = 32) -> list[str]:
        """`n` responses at `temperature` (no top-k / top-p: the policy's own distribution,
        so that best-of-n's KL formula holds), in batches of `batch` sharing one prompt."""
        import torch

        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        out: list[str] = []
        torch.manual_seed(seed)  # generate() draws from torch's global generator
        with torch.inference_mode():
            while len(out) < n:
                b = min(batch, n - len(out))
                gen = self.model.generate(
                    ids.repeat(b, 1), attention_mask=torch.ones(b, ids.shape[1], dtype=torch.long),
                    do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                )
                texts = self.tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
                # an empty answer is a legitimate sample; a single space keeps it a valid assistant turn
                out.extend(t.strip() or " " for t in texts)
        return out
