"""Score like verl's reward loop does, against a running rmserve server (CPU, seconds).

    rmserve serve &                     # or: rmserve serve --model DIR
    python examples/verl_compute_score.py --address 127.0.0.1:50051 --samples 16 --workers 2

verl's reward loop runs `reward.num_workers` workers; each awaits the custom
reward function once per sample with `asyncio.gather`, on its own event loop.
This script does the same with threads (one loop each) instead of Ray actors,
calling `rmserve.client.verl.compute_score` exactly as verl would, and prints
the dicts verl gets back plus how many batched Score calls each worker made.
The same function is what the verl config names (examples/verl.md):

    reward.custom_reward_function.path=pkg://rmserve.client.verl
    reward.custom_reward_function.name=compute_score
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time

from rmserve.client import verl as rv

QUESTIONS = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Explain recursion to a child.",
    "Write a haiku about rain.",
]
ANSWERS = [  # short: the tiny test model scores at most 64 tokens
    "Knead flour, water and yeast; bake.",
    "I don't know.",
    "A function that calls itself.",
    "",
]


def dataset_row(i: int) -> dict:
    """One row as verl's dataset preprocessing writes it, with the prompt copied into extra_info."""
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    return {
        "data_source": "rmserve",
        "prompt": messages,
        "reward_model": {"style": "model", "ground_truth": ""},
        "extra_info": {"index": i, "prompt": messages},
    }


async def reward_worker(rows: list[dict], responses: list[str]) -> tuple[list[dict], list[tuple[int, int]]]:
    """What one verl reward-loop worker does with its share of the batch."""
    outs = await asyncio.gather(*(
        rv.compute_score(
            data_source=row["data_source"],
            solution_str=resp,
            ground_truth=row["reward_model"]["ground_truth"],
            extra_info=dict(row["extra_info"]),
        )
        for row, resp in zip(rows, responses, strict=True)
    ))
    stats = [(b.calls, b.samples) for b in rv.batchers()]
    await rv.reset()
    return list(outs), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("RMSERVE_ADDRESS", "127.0.0.1:50051"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--field", default="reward", choices=("reward", "conservative", "min"))
    args = ap.parse_args()
    os.environ["RMSERVE_ADDRESS"] = args.address
    os.environ["RMSERVE_FIELD"] = args.field
    os.environ.setdefault("RMSERVE_RUN_ID", "verl-example")

    rows = [dataset_row(i) for i in range(args.samples)]
    responses = [ANSWERS[i % len(ANSWERS)] for i in range(args.samples)]
    shares = [list(range(w, args.samples, args.workers)) for w in range(args.workers)]
    results: dict[int, dict] = {}
    stats: dict[int, list] = {}

    def worker(w: int) -> None:
        mine = shares[w]
        outs, stats[w] = asyncio.run(reward_worker([rows[i] for i in mine], [responses[i] for i in mine]))
        results.update(zip(mine, outs, strict=True))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if len(results) != args.samples:
        raise SystemExit("some workers failed (is the server running at --address?)")

    for i in range(args.samples):
        q = rows[i]["extra_info"]["prompt"][0]["content"]
        print(json.dumps({"prompt": q, "response": responses[i][:40], **results[i]}))
    keys = {tuple(r) for r in results.values()}
    print(f"# {args.samples} compute_score calls in {elapsed:.2f}s; keys every time: {sorted(keys)}")
    for w, s in sorted(stats.items()):
        print(f"# worker {w}: {sum(c for c, _ in s)} batched Score call(s) for {sum(n for _, n in s)} samples")


if __name__ == "__main__":
    main()
