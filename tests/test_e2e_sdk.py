"""The real server on localhost, scored through the SDK by concurrent sync and async
clients; results must equal the ensemble computed directly from the checkpoint."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from rmserve.client import AsyncRewardClient, InvalidRequestError, RewardClient
from rmserve.service.engine.ensemble import read_manifest

PROMPTS = ["How do I bake bread?", "hello there", "Numbers 0123 and punctuation!", "Can you help me?"]
RESPONSES = ["Mix flour, water and yeast.", "hi, how can I help you today?", "I cannot help with that.", "Sure."]


def samples(offset: int) -> list[dict]:
    out = []
    for i in range(6):
        p, r = PROMPTS[(i + offset) % 4], RESPONSES[(i * 3 + offset) % 4]
        out.append({"prompt": p, "response": r} if i % 2 else
                   {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]})
    return out


class Direct:
    """The ensemble computed from the files with plain transformers, in float64."""

    def __init__(self, directory):
        man = read_manifest(directory)
        heads = load_file(directory / "member0" / "heads.safetensors")
        self.w, self.b = heads["weight"].double(), heads["bias"].double()
        self.shift, self.scale = torch.tensor(man.shift).double(), torch.tensor(man.scale).double()
        self.factor = load_file(directory / "member0" / "uncertainty.safetensors")["factor"].double()
        self.lam = man.uncertainty_penalty
        self.tok = AutoTokenizer.from_pretrained(directory / "backbone")
        self.model = AutoModel.from_pretrained(directory / "backbone").eval()

    def __call__(self, sample: dict, lam: float | None = None) -> dict:
        msgs = sample.get("messages") or [
            {"role": "user", "content": sample["prompt"]}, {"role": "assistant", "content": sample["response"]}
        ]
        ids = self.tok(self.tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            e = self.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
        r = (e @ self.w.T + self.b - self.shift) / self.scale
        lam = self.lam if lam is None else lam
        var = r.var(unbiased=False).item()
        return {"reward": r.mean().item(), "std": math.sqrt(var), "min": r.min().item(),
                "conservative": r.mean().item() - lam * var, "epistemic": (e @ self.factor).norm().item(),
                "members": r.numpy(), "num_tokens": len(ids)}


@pytest.fixture(scope="module")
def direct(tiny_ensemble):
    return Direct(tiny_ensemble)


def check(results, batch, direct, lam=None, members=False):
    assert len(results) == len(batch)
    for res, s in zip(results, batch, strict=True):
        want = direct(s, lam)
        for f in ("reward", "std", "min", "conservative", "epistemic"):
            assert getattr(res, f) == pytest.approx(want[f], rel=1e-4, abs=1e-4), f
        assert res.num_tokens == want["num_tokens"] and res.truncated is False
        if members:
            np.testing.assert_allclose(res.members, want["members"], rtol=1e-4, atol=1e-4)
        else:
            assert res.members is None


def test_concurrent_sync_and_async_clients_get_the_direct_ensemble(tiny_server, direct):
    def sync_worker(k: int):
        with RewardClient(tiny_server.address, timeout=60) as c:
            batch = samples(k)
            return batch, c.score(batch, uncertainty_penalty=0.25, return_members=True, run_id=f"run{k}", step=k)

    async def async_workers():
        async with AsyncRewardClient(tiny_server.address, timeout=60) as c:
            batches = [samples(k) for k in range(4, 8)]
            res = await asyncio.gather(*(c.score(b, run_id="a", step=1) for b in batches))
            return list(zip(batches, res, strict=True))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sync_futs = [pool.submit(sync_worker, k) for k in range(4)]
        async_out = asyncio.run(async_workers())
        sync_out = [f.result() for f in sync_futs]
    for batch, res in sync_out:
        check(res, batch, direct, lam=0.25, members=True)
    for batch, res in async_out:
        check(res, batch, direct)


def test_compare_model_info_and_health(tiny_server, direct):
    with RewardClient(tiny_server.address, timeout=60) as c:
        assert c.health() is True
        info = c.model_info()
        assert (info.name, info.version, info.num_heads, info.max_tokens) == ("tiny-test", "v1", 4, 64)
        assert info.backbone_layers == 2  # the tiny backbone's every layer: no cut
        res = c.compare("How do I bake bread?", "Mix flour.", "Sure.")
        a = direct({"prompt": "How do I bake bread?", "response": "Mix flour."})
        b = direct({"prompt": "How do I bake bread?", "response": "Sure."})
        assert res.prob == pytest.approx(1 / (1 + math.exp(-(a["reward"] - b["reward"]))), abs=1e-4)
        want = 1 / (1 + np.exp(-(a["members"] - b["members"])))
        np.testing.assert_allclose(res.member_probs, want, atol=1e-4)


def test_score_groups_equals_scoring_each_completion(tiny_server, direct):
    with RewardClient(tiny_server.address, timeout=60) as c:
        res = c.score_groups("How do I bake bread?", RESPONSES)
    for r, resp in zip(res, RESPONSES, strict=True):
        assert r.reward == pytest.approx(direct({"prompt": "How do I bake bread?", "response": resp})["reward"], abs=1e-4)


def test_sdk_errors_carry_the_grpc_status(tiny_server):
    import grpc

    with RewardClient(tiny_server.address, timeout=60) as c:
        with pytest.raises(InvalidRequestError) as err:
            c.score([{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert len(c.score([{"prompt": "a", "response": "b"}])) == 1


def test_served_scores_through_the_triton_kernel_equal_the_direct_ensemble(tiny_server, direct, monkeypatch):
    """Under TRITON_INTERPRET=1 the engine runs the Triton kernel itself (read per call)."""
    import rmserve.kernels.last_token as lt

    calls = []
    real = lt.last_token_scores_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(lt, "last_token_scores_triton", spy)
    batch = samples(1)
    with RewardClient(tiny_server.address, timeout=120) as c:
        res = c.score(batch, uncertainty_penalty=0.3, return_members=True)
    assert calls, "the engine did not go through the Triton kernel"
    check(res, batch, direct, lam=0.3, members=True)


def test_trl_reward_func_against_the_real_server(tiny_server, direct):
    """Groups, plain samples and empty completions (a policy may stop at once)."""
    from rmserve.client import as_trl_reward_func

    metrics: dict[str, float] = {}
    extra: dict[str, list] = {}
    f = as_trl_reward_func(tiny_server.address, field="conservative", uncertainty_penalty=0.5, run_id="e2e")

    class State:
        global_step = 3

    prompts = ["hello there", "hello there", "hello there", "Can you help me?"]
    completions = ["Sure.", "", "hi, how can I help you today?", "I cannot help with that."]
    got = f(prompts, completions, trainer_state=State(), log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
    f.close()
    for i in range(4):  # the empty completion is scored too: a policy that stops at once is judged
        want = direct({"prompt": prompts[i], "response": completions[i]}, lam=0.5)["conservative"]
        assert got[i] == pytest.approx(want, abs=1e-4)
    stds = [direct({"prompt": prompts[i], "response": completions[i]})["std"] for i in range(4)]
    assert metrics["rmserve/std"] == pytest.approx(sum(stds) / 4, abs=1e-4)
    assert extra["rmserve_std"] == pytest.approx(stds, abs=1e-4)
    assert "rmserve/epistemic" in metrics

    # opt-in override: empty completions get a fixed reward and are not sent
    f = as_trl_reward_func(tiny_server.address, empty_reward=-5.0, run_id="e2e")
    got = f(prompts, completions, trainer_state=State())
    f.close()
    assert got[1] == -5.0
    assert got[0] == pytest.approx(direct({"prompt": prompts[0], "response": completions[0]})["reward"], abs=1e-4)


@pytest.mark.parametrize("sample", [
    {"prompt": "hello there", "response": ""},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hello there"},
                  {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]},
])
def test_empty_content_is_scored_like_its_rendered_token_ids(tiny_server, direct, sample):
    """An empty response (or system/user turn) is rendered by the chat template and scored;
    its reward equals scoring the rendered token ids directly, and the plain-HF computation."""
    msgs = sample.get("messages") or [{"role": "user", "content": sample["prompt"]},
                                      {"role": "assistant", "content": sample["response"]}]
    ids = direct.tok(direct.tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    with RewardClient(tiny_server.address, timeout=60) as c:
        res, via_ids = c.score([sample, {"token_ids": ids}])
    assert math.isfinite(res.reward) and res.num_tokens == len(ids)
    assert res.reward == pytest.approx(via_ids.reward, abs=1e-5)
    check([res], [sample], direct)
