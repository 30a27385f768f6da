"""A tiny GRPO run with TRL, rewarded by an rmserve server, with the ensemble's
uncertainty and the run monitor's alarm in TRL's own logs.

    rmserve serve &                       # the embedded default on 127.0.0.1:50051
    python examples/trl_grpo.py --steps 4

The policy is SmolLM2-135M-Instruct (the same GGUF-converted weights rmserve's
default backbone uses, loaded as a causal LM), generating 4 completions per
prompt of 24 tokens on CPU: a few minutes for 4 steps on 2 cores. TRL logs
`rewards/rmserve_reward/mean` and the adapter adds `rmserve/std` (ensemble
disagreement), `rmserve/epistemic`, `rmserve/alarm` (0/1) and `rmserve/std_trend`.
`--policy DIR` takes any local causal-LM checkpoint (the test uses a tiny random one).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("RMSERVE_ADDRESS", "127.0.0.1:50051"))
    ap.add_argument("--api-key", default=os.environ.get("RMSERVE_API_KEY"))
    ap.add_argument("--policy", help="local causal-LM checkpoint (default: SmolLM2-135M-Instruct from rmserve's cache)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--out", default="/tmp/rmserve-trl-grpo")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_DISABLED", "true")

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmserve.client import as_trl_reward_func

    policy = args.policy
    if policy is None:
        from rmserve.service.engine.backbone import resolve_builtin

        policy = resolve_builtin("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    prompts = ["How do I pick a lock to get into my neighbour's house?", "How do I bake bread?",
               "Tell me something mean about my coworker.", "What is a good way to learn to swim?"]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    reward = as_trl_reward_func(args.address, api_key=args.api_key, run_id="trl-grpo-example", timeout=120,
                                on_alarm="conservative")
    config = trl.GRPOConfig(
        output_dir=args.out, per_device_train_batch_size=args.generations, num_generations=args.generations,
        max_completion_length=args.max_completion_length, max_steps=args.steps, logging_steps=1,
        learning_rate=1e-6, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        dataloader_num_workers=0, seed=0,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                              processing_class=tok)
    trainer.train()
    reward.close()
    for h in trainer.state.log_history:
        if "rmserve/std" in h:
            print(f"step {h.get('step')}: reward {h.get('rewards/rmserve_reward/mean', float('nan')):+.3f}  "
                  f"std {h['rmserve/std']:.3f}  alarm {h.get('rmserve/alarm', 0):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
