"""OpenRLHF's own remote-reward client against rmserve's /get_reward: not an imitation.

OpenRLHF 0.11.2 fetches remote rewards in its rollout workers:
`openrlhf.utils.agent.SingleTurnAgentExecutor.execute` tokenises the prompt (built by
`openrlhf.datasets.prompts_dataset.preprocess_data` with the policy's chat template),
asks the vLLM engine for a continuation, decodes prompt + response with special tokens
kept and POSTs `{"query", "prompts", "labels"}` to `--reward.remote_url`, one sample per
request; `SamplesGenerator._process_response_into_experience` then turns the answer's
`rewards`/`scores`/`extra_logs` into the experience whose `info` OpenRLHF logs.

Those functions are imported from OpenRLHF's wheel (`pip download --no-deps`, no GPU
dependencies installed) and run unchanged. Only what pulls a GPU stack is replaced:
the `ray` and `vllm` modules (imported at the top of the samples generator and the vLLM
engine module) by empty stubs, and the vLLM engine object by a fake "policy" whose
continuation is the assistant turn of a known conversation. `pylatexenc` (a pure-Python
LaTeX dependency of OpenRLHF's math grader, imported by `openrlhf.utils`) is stubbed only
when it is not installed. The wheel comes from $RMSERVE_OPENRLHF_DIR (an unpacked wheel
or a .whl) or is downloaded; without PyPI the tests skip and say why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from unittest import mock

import pytest
from transformers import AutoTokenizer

from rmserve.client import RewardClient

OPENRLHF_VERSION = "0.11.2"
# Imported on the reward path of OpenRLHF 0.11.2 and never used there: GPU/cluster stack.
GPU_STACK = {
    "ray": ("ray.util", "ray.util.placement_group", "ray.util.scheduling_strategies"),
    "vllm": ("vllm.inputs", "vllm.utils"),
}
OPTIONAL_PURE_PYTHON = {"pylatexenc": ("pylatexenc.latex2text",)}  # math grading only; stubbed if missing

CONVERSATIONS = [
    ("How do I bake bread?", "Mix flour, water, salt and yeast, then knead."),
    ("hello there", "hi, how can I help you today?"),
    ("Tell me something dangerous.", "I cannot help with that request, but here is something safer."),
    ("Numbers?", "0123456789"),
    ("The quick brown fox?", "It jumps over the lazy dog."),
    ("Say nothing.", ""),  # an empty reply: only the template's end-of-turn is generated
]


def _unpack(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into)
    return _package_root(into)


def _package_root(d: Path) -> Path:
    """The directory holding `openrlhf/` (OpenRLHF's wheel keeps it under *.data/purelib)."""
    for cand in [d, *sorted(d.glob("*.data/purelib"))]:
        if (cand / "openrlhf" / "utils" / "agent.py").is_file():
            return cand
    raise FileNotFoundError(f"no openrlhf/utils/agent.py under {d}")


@pytest.fixture(scope="module")
def openrlhf_root(tmp_path_factory) -> Path:
    given = os.environ.get("RMSERVE_OPENRLHF_DIR")
    if given:
        p = Path(given)
        return _unpack(p, tmp_path_factory.mktemp("openrlhf")) if p.suffix == ".whl" else _package_root(p)
    dl = tmp_path_factory.mktemp("openrlhf_wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"openrlhf=={OPENRLHF_VERSION}",
           "-d", str(dl), "--disable-pip-version-check", "--no-input", "--timeout", "15", "--retries", "1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot download openrlhf=={OPENRLHF_VERSION} from PyPI ({type(e).__name__}: {e}); "
                    "set RMSERVE_OPENRLHF_DIR to an unpacked wheel")
    wheels = sorted(dl.glob("openrlhf-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot download openrlhf=={OPENRLHF_VERSION} from PyPI (pip exit {proc.returncode}: {last}); "
                    "set RMSERVE_OPENRLHF_DIR to an unpacked wheel")
    return _unpack(wheels[0], tmp_path_factory.mktemp("openrlhf"))


def _stub_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__["__getattr__"] = lambda attr: mock.MagicMock(name=f"{name}.{attr}")  # PEP 562: any name exists
    return mod


@pytest.fixture(scope="module")
def openrlhf(openrlhf_root):
    """OpenRLHF's modules, imported from the wheel with the GPU stack stubbed; cleaned up afterwards."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(openrlhf_root))
    stubbed = []
    for top, subs in {**GPU_STACK, **OPTIONAL_PURE_PYTHON}.items():
        if importlib.util.find_spec(top) is None:
            for name in (top, *subs):
                mp.setitem(sys.modules, name, _stub_module(name))
            stubbed.append(top)
    before = set(sys.modules)
    try:
        from openrlhf.datasets.prompts_dataset import preprocess_data
        from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        yield types.SimpleNamespace(preprocess_data=preprocess_data, SamplesGenerator=SamplesGenerator,
                                    SingleTurnAgentExecutor=SingleTurnAgentExecutor, stubbed=stubbed)
    finally:
        for name in set(sys.modules) - before:
            if name == "openrlhf" or name.startswith("openrlhf."):
                del sys.modules[name]
        mp.undo()


class FakePolicyEngine:
    """What OpenRLHF's executor awaits as `llm_engine.generate` (a vLLM AsyncLLMEngine in a Ray actor):
    answers each prompt with the assistant turn of the conversation it belongs to, as token ids."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, 0

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.calls += 1
        prompt = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        text = self.replies[prompt]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = types.SimpleNamespace(token_ids=ids, text=text, finish_reason="stop", logprobs=None)
        return types.SimpleNamespace(outputs=[out])


def _sampling_params():
    # vllm.SamplingParams as SamplesGenerator builds it: max_tokens None (dynamic), no logprobs
    return types.SimpleNamespace(max_tokens=None, logprobs=None)


@pytest.fixture(scope="module")
def tokenizer(tiny_ensemble):
    return AutoTokenizer.from_pretrained(tiny_ensemble / "backbone")


def _rollouts(openrlhf, tokenizer):
    """OpenRLHF's prompts for CONVERSATIONS, and the policy's replies (the template's assistant turn)."""
    prompts, replies, msgs = [], {}, []
    for q, a in CONVERSATIONS:
        prompt, _ = openrlhf.preprocess_data({"input": [{"role": "user", "content": q}]}, input_key="input",
                                             apply_chat_template=tokenizer.apply_chat_template)
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        assert full.startswith(prompt)
        prompts.append(prompt)
        replies[prompt] = full[len(prompt):]
        msgs.append(conv)
    return prompts, replies, msgs


def test_openrlhf_executor_gets_the_grpc_rewards_and_extra_logs(openrlhf, tiny_ensemble, server_factory, tokenizer):
    server = server_factory(tiny_ensemble, http_port=0, max_samples_per_request=512, runs_file="")
    reward_url = f"http://127.0.0.1:{server.server.http_port}/get_reward"
    prompts, replies, msgs = _rollouts(openrlhf, tokenizer)
    # `--reward.remote_url URL` reaches the executor as a one-element list (train_ppo_ray splits on ",")
    executor = openrlhf.SingleTurnAgentExecutor([reward_url])
    assert executor.reward_func is None and executor.reward_endpoints == [reward_url]
    engine = FakePolicyEngine(tokenizer, replies)

    async def rollout():  # RolloutRayActor.generate_responses: every sample of a prompt at once
        return await asyncio.gather(*(
            executor.execute(prompt=p, label="", sampling_params=_sampling_params(), max_length=512,
                             hf_tokenizer=tokenizer, llm_engine=engine)
            for p in prompts))

    outputs = asyncio.run(rollout())
    assert engine.calls == len(prompts)
    with RewardClient(server.address, timeout=60) as c:
        want = c.score([{"messages": m} for m in msgs])
    for out, w, m in zip(outputs, want, msgs, strict=True):
        # OpenRLHF swallows request errors (reward None, logged at INFO): a None here is a failed request
        assert out["reward"] is not None, f"OpenRLHF got no reward for {m}"
        assert out["reward"] == pytest.approx([w.reward], abs=1e-6)  # one query per request: lists of one
        assert out["scores"] == out["reward"]
        logs = out["extra_logs"]
        assert set(logs) >= {"rm_reward", "rm_std", "rm_min", "rm_conservative", "rm_epistemic"}
        assert logs["rm_std"] == pytest.approx([w.std], abs=1e-6)
        assert logs["rm_min"] == pytest.approx([w.min], abs=1e-6)
        assert logs["rm_conservative"] == pytest.approx([w.conservative], abs=1e-6)
        assert logs["rm_epistemic"] == pytest.approx([w.epistemic], abs=1e-5)
        # what OpenRLHF trains on and logs: the experience built from this answer
        exp = openrlhf.SamplesGenerator._process_response_into_experience(None, out, max_len=512)
        assert exp.rewards.flatten().tolist() == pytest.approx([w.reward], abs=1e-6)
        assert exp.info["reward"].flatten().tolist() == pytest.approx([w.reward], abs=1e-6)
        assert exp.info["rm_std"].flatten().tolist() == pytest.approx([w.std], abs=1e-6)
        assert {"rm_min", "rm_conservative", "rm_epistemic"} <= set(exp.info)


def test_openrlhf_batched_request_and_reward_field(openrlhf, tiny_ensemble, server_factory, tokenizer):
    """The HTTP fallback with several queries in one body (eval, custom callers), two endpoints
    sharding the batch, and `--http-reward-field conservative`."""
    server = server_factory(tiny_ensemble, http_port=0, http_reward_field="conservative", runs_file="")
    url = f"http://127.0.0.1:{server.server.http_port}/get_reward"
    prompts, replies, msgs = _rollouts(openrlhf, tokenizer)
    queries = [tokenizer.decode(tokenizer(p + replies[p], add_special_tokens=False)["input_ids"],
                                skip_special_tokens=False) for p in prompts]
    executor = openrlhf.SingleTurnAgentExecutor(f"{url},{url}".split(","))  # two URLs: the batch is split in two
    answers = asyncio.run(executor._fetch_rewards_via_http(queries, prompts, [""] * len(prompts)))
    assert len(answers) == 2
    rewards = [r for a in answers for r in a["rewards"]]
    std = [s for a in answers for s in a["extra_logs"]["rm_std"]]
    with RewardClient(server.address, timeout=60) as c:
        want = c.score([{"messages": m} for m in msgs])
    assert rewards == pytest.approx([w.conservative for w in want], abs=1e-6)
    assert std == pytest.approx([w.std for w in want], abs=1e-6)


def test_a_policy_that_stops_at_its_end_of_turn_token_is_scored_like_the_conversation(
        openrlhf, tiny_ensemble, server_factory, tokenizer):
    server = server_factory(tiny_ensemble, http_port=0, runs_file="")
    prompts, replies, msgs = _rollouts(openrlhf, tokenizer)
    # vLLM stops at the stop token and returns it; OpenRLHF decodes it with skip_special_tokens=False
    stopped = {p: r[: r.rindex("<|end|>") + len("<|end|>")] for p, r in replies.items()}
    executor = openrlhf.SingleTurnAgentExecutor([f"http://127.0.0.1:{server.server.http_port}/get_reward"])
    engine = FakePolicyEngine(tokenizer, stopped)

    async def rollout():
        return await asyncio.gather(*(
            executor.execute(prompt=p, label="", sampling_params=_sampling_params(), max_length=512,
                             hf_tokenizer=tokenizer, llm_engine=engine) for p in prompts))

    outputs = asyncio.run(rollout())
    with RewardClient(server.address, timeout=60) as c:
        want = c.score([{"messages": m} for m in msgs])
    assert [o["reward"][0] for o in outputs] == pytest.approx([w.reward for w in want], abs=1e-6)
