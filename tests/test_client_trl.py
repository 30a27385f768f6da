"""as_trl_reward_func against the fake server, and inside TRL's real GRPOTrainer on CPU."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import pytest

from rmserve.client import RewardClient, as_trl_reward_func
from tests import client_fake_server as fake
from tests.helpers import byte_bpe_tokenizer


class Recorder:
    """Stands in for TRL's log_metric / log_extra hooks."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name, value):
        self.metrics.setdefault(name, []).append(value)

    def log_extra(self, column, values):
        self.extra.setdefault(column, []).extend(values)


def call(func, prompts, completions, step=0, rec=None):
    rec = rec or Recorder()
    out = func(
        prompts=prompts,
        completions=completions,
        completion_ids=[[0]] * len(prompts),
        trainer_state=SimpleNamespace(global_step=step),
        log_metric=rec.log_metric,
        log_extra=rec.log_extra,
        some_dataset_column=["x"] * len(prompts),
    )
    return out, rec


def test_plain_groups(fs):
    func = as_trl_reward_func(fs.address, run_id="run-A")
    assert func.__name__ == "rmserve_reward"
    prompts = ["Why?", "Why?", "How", "How"]
    completions = ["a", "bbbb", "cc", "ddddddd"]
    rewards, rec = call(func, prompts, completions, step=5)
    assert rewards == pytest.approx([0.1, 0.4, 0.2, 0.7])
    (req,) = [c.request for c in fs.calls("ScoreGroups")]
    assert [(g.prompt_text, list(g.completions)) for g in req.groups] == [
        ("Why?", ["a", "bbbb"]),
        ("How", ["cc", "ddddddd"]),
    ]
    assert (req.options.step, req.options.run_id) == (5, "run-A")
    assert fs.calls("Score") == []
    std = fake.expected("", "a")["std"]
    assert rec.metrics["rmserve/std"] == pytest.approx([std])
    assert rec.extra["rmserve_std"] == pytest.approx([std] * 4)
    # Prompts "Why?" carry an epistemic value in the fake, "How" does not.
    assert rec.metrics["rmserve/epistemic"] == pytest.approx([4.0])
    assert rec.extra["rmserve_epistemic"] == [pytest.approx(4.0), pytest.approx(4.0), None, None]
    # OOD fields where the model serves them: "bbbb" is not past 4 characters, so 0 of 2 flagged
    assert rec.metrics["rmserve/ood_frac"] == pytest.approx([0.0])
    assert rec.extra["rmserve_ood_score"] == [pytest.approx(0.25), pytest.approx(1.0), None, None]
    func.close()


def test_conversational_groups_and_fields(fs):
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    completions = [[{"role": "assistant", "content": "xx"}], [{"role": "assistant", "content": "yyyyy"}]]
    with RewardClient(fs.address) as client:
        cons = as_trl_reward_func(client, field="conservative", uncertainty_penalty=2.0)
        worst = as_trl_reward_func(client, field="min", name="rm_min")
        assert (cons.__name__, worst.__name__) == ("rmserve_conservative", "rm_min")
        got_cons, rec = call(cons, [prompt, prompt], completions, step=1)
        got_min, _ = call(worst, [prompt, prompt], completions, step=1)
    assert got_cons == pytest.approx([fake.expected("sys q", c, 2.0)["conservative"] for c in ("xx", "yyyyy")])
    assert got_min == pytest.approx([0.2 - 0.5, 0.5 - 0.5], abs=1e-6)
    group = fs.calls("ScoreGroups")[0].request.groups[0]
    assert [m.role for m in group.prompt_messages.messages] == ["system", "user"]
    assert list(group.completions) == ["xx", "yyyyy"]
    assert "rmserve/epistemic" not in rec.metrics  # no "?" in the prompt: not served, not logged
    assert "rmserve/ood_frac" not in rec.metrics and "rmserve_ood_score" not in rec.extra


def test_falls_back_to_score_for_distinct_prompts_tool_turns_and_use_groups_false(fs):
    func = as_trl_reward_func(fs.address)
    rewards, _ = call(func, ["p1", "p2"], ["aaa", "b"])  # no shared prompt: plain Score
    assert rewards == pytest.approx([0.3, 0.1])
    sample = fs.calls("Score")[0].request.samples[0]
    assert (sample.text.prompt, sample.text.response) == ("p1", "aaa")

    prompt = [{"role": "user", "content": "q"}]
    tool_turn = [
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": [{"type": "text", "text": "it is 42"}]},
    ]
    rewards, _ = call(func, [prompt, prompt], [tool_turn, [{"role": "assistant", "content": "x"}]])
    assert rewards == pytest.approx([0.8, 0.1])
    msgs = fs.calls("Score")[1].request.samples[0].conversation.messages
    assert [(m.role, m.content) for m in msgs] == [("user", "q"), ("assistant", ""), ("tool", "42"), ("assistant", "it is 42")]

    no_groups = as_trl_reward_func(fs.address, use_groups=False)
    call(no_groups, ["p", "p"], ["a", "b"])
    assert len(fs.calls("Score")) == 3 and fs.calls("ScoreGroups") == []
    func.close()
    no_groups.close()


def test_validation_and_pickling(fs):
    with pytest.raises(ValueError, match="field"):
        as_trl_reward_func(fs.address, field="mean")
    with pytest.raises(TypeError):
        as_trl_reward_func(42)
    func = as_trl_reward_func(fs.address, run_id="r")
    call(func, ["p"], ["abc"])
    clone = pickle.loads(pickle.dumps(func))  # the owned client is rebuilt, not pickled
    assert clone.__name__ == "rmserve_reward" and clone.run_id == "r"
    assert call(clone, ["p"], ["abcd"])[0] == pytest.approx([0.4])
    func.close()
    clone.close()


def test_default_run_id_comes_from_env(fs, monkeypatch):
    monkeypatch.setenv("RMSERVE_RUN_ID", "shared-run")
    assert as_trl_reward_func(fs.address).run_id == "shared-run"
    monkeypatch.delenv("RMSERVE_RUN_ID")
    a, b = as_trl_reward_func(fs.address), as_trl_reward_func(fs.address)
    assert a.run_id.startswith("trl-") and a.run_id != b.run_id


# -- TRL's real GRPOTrainer ---------------------------------------------------------


def tiny_tokenizer():
    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    return byte_bpe_tokenizer(["the quick brown fox", "how do I bake bread?", "hello there"], specials)


@pytest.mark.parametrize("conversational", [False, True])
def test_grpo_trainer_two_steps(fs, tmp_path, monkeypatch, conversational):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    texts = ["how do I bake bread?", "the quick brown fox"]
    if conversational:
        data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    else:
        data = Dataset.from_dict({"prompt": texts})

    reward = as_trl_reward_func(fs.address, run_id="grpo-test")
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok
    )
    trainer.train()
    reward.close()

    calls = fs.calls("ScoreGroups") + fs.calls("Score")
    assert sorted(c.request.options.step for c in calls) == [0, 1]
    assert {c.request.options.run_id for c in calls} == {"grpo-test"}
    assert len(fs.calls("ScoreGroups")) == 2  # num_generations=2 completions per prompt: one group each
    logged = [h for h in trainer.state.log_history if "rmserve/std" in h]
    assert len(logged) == 2
    std = fake.expected("", "")["std"]  # the fake's std does not depend on the text
    assert all(h["rmserve/std"] == pytest.approx(std) for h in logged)
    assert any("rewards/rmserve_reward/mean" in h for h in trainer.state.log_history)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
