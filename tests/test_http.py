"""The HTTP front door: OpenRLHF's /get_reward and slime's /score with requests shaped as the
frameworks send them, against the same scores the gRPC API gives."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from transformers import AutoTokenizer

from rmserve.client import RewardClient
from tests.helpers import registry_sample

MSGS = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour and water."}]


@pytest.fixture
def http_server(tiny_ensemble, server_factory):
    return server_factory(tiny_ensemble, http_port=0, max_samples_per_request=512, runs_file="")


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


async def _request(method: str, address: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    data = body if body is None or isinstance(body, (str, bytes)) else json.dumps(body)
    async with aiohttp.ClientSession() as s, s.request(method, address, data=data, headers=headers or {}) as r:
        return r.status, await r.json()


def post(address: str, body, headers: dict | None = None) -> tuple[int, dict]:
    return asyncio.run(_request("POST", address, body, headers))


def rendered(tokenizer, msgs) -> str:
    """What OpenRLHF sends: the policy's decoded prompt + response, chat template applied."""
    return tokenizer.apply_chat_template(msgs, tokenize=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_ensemble):
    return AutoTokenizer.from_pretrained(tiny_ensemble / "backbone")


def test_get_reward_scores_templated_queries_as_they_are(http_server, tokenizer):
    other = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": ""}]  # an empty reply too
    status, out = post(url(http_server, "/get_reward"),
                       {"query": [rendered(tokenizer, MSGS), rendered(tokenizer, other)], "prompts": ["p", "q"],
                        "labels": [None, None]})
    assert status == 200, out
    with RewardClient(http_server.address, timeout=60) as c:
        want = c.score([{"messages": MSGS}, {"messages": other}])
    assert out["rewards"] == pytest.approx([r.reward for r in want], abs=1e-6)
    assert out["scores"] == out["rewards"]
    logs = out["extra_logs"]
    assert logs["rm_std"] == pytest.approx([r.std for r in want], abs=1e-6)
    assert logs["rm_min"] == pytest.approx([r.min for r in want], abs=1e-6)
    assert logs["rm_conservative"] == pytest.approx([r.conservative for r in want], abs=1e-6)
    assert logs["rm_epistemic"] == pytest.approx([r.epistemic for r in want], abs=1e-5)
    # the query is not templated twice: the same text as pre-tokenised ids gives the same reward
    ids = tokenizer(rendered(tokenizer, MSGS), add_special_tokens=False)["input_ids"]
    with RewardClient(http_server.address, timeout=60) as c:
        assert c.score([{"token_ids": ids}])[0].reward == pytest.approx(out["rewards"][0], abs=1e-6)


def test_get_reward_edge_cases(http_server, tokenizer):
    assert post(url(http_server, "/get_reward"), {"query": [], "prompts": [], "labels": []}) == (
        200, {"rewards": [], "scores": [], "extra_logs": {}})
    for body, fragment in [
        ("{not json", "not valid JSON"),
        ({"prompts": ["x"]}, '"query"'),
        ({"query": [1, 2]}, "list of strings"),
        ({"query": [""]}, "query 0: the text is empty"),
    ]:
        status, out = post(url(http_server, "/get_reward"), body)
        assert status == 400 and out["error"]["code"] == "INVALID_ARGUMENT", (body, out)
        assert fragment in out["error"]["message"]
    status, out = post(url(http_server, "/get_reward"), {"query": [rendered(tokenizer, MSGS)]})
    assert status == 200 and len(out["rewards"]) == 1  # the server keeps serving


def test_slime_score_answers_flat_scalars(http_server):
    status, out = post(url(http_server, "/score"), {"prompt": "How do I bake bread?", "response": "Mix flour.",
                                                     "label": "anything"})
    assert status == 200, out
    with RewardClient(http_server.address, timeout=60) as c:
        (want,) = c.score([{"prompt": "How do I bake bread?", "response": "Mix flour."}])
    for k in ("reward", "conservative", "min", "std", "epistemic"):
        assert out[k] == pytest.approx(getattr(want, k), abs=1e-6), k
    status, out = post(url(http_server, "/score"), {"prompt": MSGS[:1], "response": MSGS[1]["content"]})
    with RewardClient(http_server.address, timeout=60) as c:
        assert out["reward"] == pytest.approx(c.score([{"messages": MSGS}])[0].reward, abs=1e-6)
    status, out = post(url(http_server, "/score"), {"prompt": 3, "response": "x"})
    assert status == 400 and "prompt" in out["error"]["message"]


def test_slime_rendered_prompt_is_not_templated_twice(http_server, tokenizer):
    """slime with --apply-chat-template sends the prompt rendered (generation prompt included) and
    the sampler's text without the end-of-turn token: the same conversation as over gRPC."""
    prompt = tokenizer.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True)
    status, out = post(url(http_server, "/score"), {"prompt": prompt, "response": MSGS[1]["content"]})
    assert status == 200, out
    with RewardClient(http_server.address, timeout=60) as c:
        (want,) = c.score([{"messages": MSGS}])
        (twice,) = c.score([{"prompt": prompt, "response": MSGS[1]["content"]}])  # what templating twice gives
    assert out["reward"] == pytest.approx(want.reward, abs=1e-6) and out["num_tokens"] == want.num_tokens
    assert twice.num_tokens > want.num_tokens


def test_slime_content_parts_are_joined_and_other_parts_refused(http_server):
    parts = [{"type": "text", "text": "How do I "}, {"type": "text", "text": "bake bread?"}]
    status, out = post(url(http_server, "/score"), {"prompt": [{"role": "user", "content": parts}],
                                                     "response": MSGS[1]["content"]})
    assert status == 200, out
    with RewardClient(http_server.address, timeout=60) as c:
        assert out["reward"] == pytest.approx(c.score([{"messages": MSGS}])[0].reward, abs=1e-6)
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    status, out = post(url(http_server, "/score"), {"prompt": [{"role": "user", "content": image}], "response": "x"})
    assert status == 400 and "image_url" in out["error"]["message"] and "prompt[0]" in out["error"]["message"]
    status, out = post(url(http_server, "/score"), {"prompt": [{"role": "user", "content": 7}], "response": "x"})
    assert status == 400 and "content" in out["error"]["message"]


def test_health_and_model_info(http_server):
    status, out = asyncio.run(_request("GET", url(http_server, "/health")))
    assert (status, out) == (200, {"status": "SERVING"})
    status, info = asyncio.run(_request("GET", url(http_server, "/v1/model")))
    assert status == 200 and info["name"] == "tiny-test" and info["num_heads"] == 4 and info["reward_field"] == "reward"


def test_the_reward_field_is_a_server_option_and_runs_are_tagged(tiny_ensemble, server_factory, tokenizer):
    s = server_factory(tiny_ensemble, http_port=0, http_reward_field="conservative", runs_file="")
    status, out = post(url(s, "/get_reward"), {"query": [rendered(tokenizer, MSGS)]},
                       headers={"X-RMServe-Run-Id": "openrlhf-1", "X-RMServe-Step": "3"})
    assert status == 200
    with RewardClient(s.address, timeout=60) as c:
        (want,) = c.score([{"messages": MSGS}])
        assert out["rewards"] == pytest.approx([want.conservative], abs=1e-6) != pytest.approx([want.reward])
        status_ = c.run_status("openrlhf-1")
    assert status_.steps == 1 and status_.series[0].last_step == 3 and status_.series[0].count == 1


def test_http_needs_the_score_scope(tiny_ensemble, server_factory, tmp_path, tokenizer):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-score": ["score"], "k-label": ["label"]}))
    s = server_factory(tiny_ensemble, http_port=0, api_keys=str(keys), runs_file="")
    body = {"query": [rendered(tokenizer, MSGS)]}
    status, out = post(url(s, "/get_reward"), body)
    assert status == 401 and out["error"]["code"] == "UNAUTHENTICATED"
    status, out = post(url(s, "/get_reward"), body, headers={"Authorization": "Bearer k-label"})
    assert status == 403 and "score" in out["error"]["message"]
    status, out = post(url(s, "/get_reward"), body, headers={"Authorization": "Bearer k-score"})
    assert status == 200 and len(out["rewards"]) == 1
    assert asyncio.run(_request("GET", url(s, "/health")))[0] == 200  # probes stay open


def test_concurrent_single_sample_requests_coalesce_into_few_engine_batches(http_server, tokenizer):
    """OpenRLHF sends one sample per request: 300 at once must not mean 300 forwards."""
    metrics = http_server.server.state.metrics
    calls_before = registry_sample(metrics.registry, "rmserve_forward_seconds_count")  # engine batches so far
    queries = [rendered(tokenizer, [{"role": "user", "content": f"question {i}"},
                                    {"role": "assistant", "content": f"answer number {i}"}]) for i in range(300)]

    async def fire():
        async with aiohttp.ClientSession() as s:
            async def one(q):
                async with s.post(url(http_server, "/get_reward"), json={"query": [q]}) as r:
                    assert r.status == 200
                    return (await r.json())["rewards"][0]
            return await asyncio.gather(*(one(q) for q in queries))

    got = asyncio.run(fire())
    engine_calls = registry_sample(metrics.registry, "rmserve_forward_seconds_count") - calls_before
    with RewardClient(http_server.address, timeout=120, max_samples_per_request=512) as c:
        want = [r.reward for r in c.score([{"token_ids": tokenizer(q, add_special_tokens=False)["input_ids"]}
                                           for q in queries])]
    assert got == pytest.approx(want, abs=1e-5)  # every answer is its own sample's
    assert engine_calls <= 60, f"{engine_calls} engine batches for 300 requests: no coalescing"
