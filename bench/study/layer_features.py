"""Study: last-token features of every layer of the default backbone, for train and dev.

Writes <out>/<split>.safetensors with `features` [L+1, N, H] (layer l's output
at the last token, final norm applied as a layer-cut backbone would), `chosen`,
`rejected`, `weight`. One forward per sequence batch; nothing is fitted here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from rmserve.service.engine.backbone import load_backbone
from rmserve.service.engine.contract import plan_batches
from rmserve.service.engine.padding import pad_token_id, right_pad
from rmserve.service.engine.tokenization import PromptEncoder
from rmserve.training.data import load_pairs
from rmserve.training.encoding import encode_pairs


@torch.inference_mode()
def all_layers(model, seqs, pad, budget=4096):
    n_layers = model.config.num_hidden_layers
    out = torch.empty(n_layers + 1, len(seqs), model.config.hidden_size)
    done, t0 = 0, time.monotonic()
    for idx in plan_batches([len(s) for s in seqs], budget, 256):
        ids, mask, lengths = right_pad([seqs[i] for i in idx], pad)
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        rows = torch.arange(len(idx))
        for layer, h in enumerate(hs):
            last = h[rows, lengths - 1]
            out[layer, idx] = last if layer == n_layers else model.norm(last)
        done += len(idx)
        print(f"  {done}/{len(seqs)} sequences, {time.monotonic() - t0:.0f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bb = load_backbone("builtin:smollm2-135m-instruct")
    enc = PromptEncoder(bb.tokenizer, a.max_tokens)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for path in a.data:
        pairs, rep = load_pairs(path)
        data = encode_pairs(pairs, enc, rep)
        lens = [len(s) for s in data.seqs]
        print(f"{path}: {len(data)} pairs, {len(data.seqs)} seqs, tokens {sum(lens)} "
              f"(mean {np.mean(lens):.0f}, max {max(lens)}), truncated {data.truncated}", flush=True)
        feats = all_layers(bb.model, data.seqs, pad_token_id(bb.tokenizer))
        save_file({"features": feats.contiguous(), "chosen": torch.as_tensor(data.chosen),
                   "rejected": torch.as_tensor(data.rejected), "weight": torch.as_tensor(data.weight)},
                  str(Path(a.out) / f"{Path(path).stem}.safetensors"))


if __name__ == "__main__":
    main()
