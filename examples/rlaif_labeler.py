"""An RLAIF labeler that runs here: SmolLM2-135M-Instruct judges the comparisons an
rmserve server suggests, and the labels go back with their provenance.

    rmserve serve &                                         # the embedded default
    python examples/rlaif_labeler.py --address 127.0.0.1:50051 \
        --data ../shared/data/hh-rlhf-harmless/dev.jsonl --prompts 16 --k 8

The judge (documented in docs/labelers.md): the conversation and two replies in a
fixed instruction; P(A) is the softmax of the next-token logits of "A" and "B".
Each comparison is judged in both orders and the two averaged, P = (P_AB(A) +
1 - P_BA(A)) / 2, which cancels the judge's position bias (small models prefer
the first option). A real deployment swaps `SmolJudge` for a call to a bigger
judge behind an OpenAI-compatible endpoint (a function of (prompt, a, b) that
returns P(a better)); everything else stays.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmserve.client import RewardClient
from rmserve.client.rlaif import label_round
from rmserve.service.engine.backbone import resolve_builtin
from rmserve.training.data import load_pairs

GUIDELINE = "hh-harmless-v1"
INSTRUCTION = (
    "You judge two assistant replies to the same conversation. Prefer the reply that is more helpful "
    "while staying honest and harmless: refusing to help with something dangerous is better than helping.\n\n"
    "Conversation:\n{conversation}\n\nReply A:\n{a}\n\nReply B:\n{b}\n\n"
    "Which reply is better? Answer with the single letter A or B."
)


class SmolJudge:
    """P(reply a is better) from SmolLM2-135M-Instruct's next-token logits, order-debiased."""

    name = "SmolLM2-135M-Instruct"

    def __init__(self, threads: int = 2):
        torch.set_num_threads(threads)
        path = resolve_builtin("smollm2-135m-instruct")
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.letters = [self.tok.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]

    def _p_first(self, conversation: str, a: str, b: str) -> float:
        text = INSTRUCTION.format(conversation=conversation, a=a, b=b)
        ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # transformers 5 returns an encoding
            ids = ids["input_ids"]
        with torch.inference_mode():
            logits = self.model(input_ids=ids[:, -2048:]).logits[0, -1, self.letters]
        return float(torch.softmax(logits.float(), dim=0)[0])

    def __call__(self, prompt, a: str, b: str) -> float:
        conversation = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return 0.5 * (self._p_first(conversation, a, b) + 1.0 - self._p_first(conversation, b, a))


def candidates_from(path: str, n: int) -> list[dict]:
    pairs, _ = load_pairs(path)
    return [{"id": p.source, "prompt": p.prompt, "responses": [p.chosen[-1]["content"], p.rejected[-1]["content"]]}
            for p in pairs[:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--api-key", default=os.environ.get("RMSERVE_API_KEY"), help="a key with the `label` scope")
    ap.add_argument("--data", required=True, help="HH-style JSONL: each pair's two responses become one candidate")
    ap.add_argument("--prompts", type=int, default=16, help="candidates read from --data")
    ap.add_argument("--k", type=int, default=8, help="comparisons to label this round")
    ap.add_argument("--tag", default="rlaif-example")
    args = ap.parse_args(argv)
    judge = SmolJudge()
    t0 = time.monotonic()
    with RewardClient(args.address, api_key=args.api_key, timeout=600) as client:
        result = label_round(client, candidates_from(args.data, args.prompts), judge, labeler="rlaif-smollm2",
                             judge_name=judge.name, guideline=GUIDELINE, tag=args.tag, k=args.k, batch=4)
    print(f"stored {result.accepted} new labels ({result.duplicates} already there; store holds {result.total}) "
          f"in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
