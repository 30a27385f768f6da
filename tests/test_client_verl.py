"""rmserve.client.verl: verl's custom reward function, micro-batched over a real server.

The last tests drive it through verl's own reward-loop code. verl is not a
dependency (its wheel pins ray, tensordict, hydra, an older transformers...), so
they run only when RMSERVE_VERL_PATH names directories holding an unpacked verl
wheel and the few pure-Python packages its imports need (examples/verl.md,
"Testing against verl's own code"); ray is stubbed when it is not installed,
since only its `remote`/`get` plumbing is touched and that is replaced here.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import inspect
import json
import math
import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import grpc
import pytest

from rmserve.client import AuthenticationError, RewardClient, RewardServiceError
from rmserve.client import verl as rv
from rmserve.client.verl import EXTRA_KEYS, compute_score, compute_score_batch, compute_score_sync
from tests.helpers import make_tiny_ensemble, scraped_sample

PROMPT = "How do I bake bread?"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
ENV = ("RMSERVE_ADDRESS", "RMSERVE_API_KEY", "RMSERVE_FIELD", "RMSERVE_RUN_ID", "RMSERVE_STEP_GAP_S",
       "RMSERVE_MAX_WAIT_MS", "RMSERVE_MAX_BATCH", "RMSERVE_TIMEOUT", "RMSERVE_MAX_RETRIES",
       "RMSERVE_UNCERTAINTY_PENALTY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(tiny_ensemble, server_factory, monkeypatch):
    """A fresh server (so its request counters are ours) with RMSERVE_ADDRESS pointing at it."""
    s = server_factory(tiny_ensemble)
    monkeypatch.setenv("RMSERVE_ADDRESS", s.address)
    return s


def score_rpcs(server) -> float:
    return scraped_sample(server.metrics_url, "rmserve_requests_total", code="OK", method="Score")


def run(coro):
    """Run on a fresh loop (as a verl worker would); `coro` may be a callable, for asyncio.gather."""

    async def main():
        try:
            return await (coro() if callable(coro) else coro)
        finally:
            await rv.reset()

    return asyncio.run(main())


def check_dict(out):
    assert tuple(out) == EXTRA_KEYS
    assert all(isinstance(v, float) for v in out.values())
    assert all(math.isfinite(out[k]) for k in ("score", "rm_reward", "rm_std"))


# ---------------------------------------------------------------------------
# The function


def test_is_a_coroutine_function_with_verls_signature():
    # verl awaits the function only when inspect.iscoroutinefunction says so (through its partial)
    assert inspect.iscoroutinefunction(compute_score)
    params = list(inspect.signature(compute_score).parameters)
    assert params[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]


def test_results_equal_client_score(server):
    calls = [
        ("an answer", {"prompt": PROMPT}),
        ("a chat answer", {"prompt": CHAT}),
        ("a raw-prompt answer", {"raw_prompt": CHAT, "index": 3}),
        ("no prompt at all", {}),
        ("no extra_info", None),
    ]
    outs = run(lambda: asyncio.gather(*(compute_score("src", r, "gt", e) for r, e in calls)))
    samples = [
        {"prompt": PROMPT, "response": "an answer"},
        {"prompt": CHAT, "response": "a chat answer"},
        {"prompt": CHAT, "response": "a raw-prompt answer"},
        {"prompt": "", "response": "no prompt at all"},
        {"prompt": "", "response": "no extra_info"},
    ]
    with RewardClient(server.address, timeout=30) as c:
        want = c.score(samples)
    for out, w in zip(outs, want, strict=True):
        check_dict(out)
        assert out["score"] == pytest.approx(w.reward, abs=1e-4)
        assert out["rm_reward"] == pytest.approx(w.reward, abs=1e-4)
        assert out["rm_std"] == pytest.approx(w.std, abs=1e-4)
        assert out["rm_epistemic"] == pytest.approx(w.epistemic, abs=1e-4)  # the tiny ensemble has statistics
        ood = getattr(w, "ood", None)
        assert math.isnan(out["rm_ood"]) if ood is None else out["rm_ood"] == pytest.approx(ood, abs=1e-4)


def test_field_from_env_kwargs_and_extra_info(server, monkeypatch):
    with RewardClient(server.address, timeout=30) as c:
        (w,) = c.score([{"prompt": PROMPT, "response": "x"}])
    monkeypatch.setenv("RMSERVE_FIELD", "conservative")
    out = run(compute_score("s", "x", None, {"prompt": PROMPT}))
    assert out["score"] == pytest.approx(w.conservative, abs=1e-4) and out["rm_reward"] == pytest.approx(w.reward, abs=1e-4)
    out = run(compute_score("s", "x", None, {"prompt": PROMPT}, field="min"))  # verl's reward_kwargs
    assert out["score"] == pytest.approx(w.min, abs=1e-4)
    out = run(compute_score("s", "x", None, {"prompt": PROMPT, "rmserve_field": "reward"}, field="min"))
    assert out["score"] == pytest.approx(w.reward, abs=1e-4)
    with pytest.raises(ValueError, match="field"):
        run(compute_score("s", "x", None, {"prompt": PROMPT}, field="max"))


def test_concurrent_calls_are_coalesced_into_few_score_rpcs(server):
    before = score_rpcs(server)

    async def many():
        outs = await asyncio.gather(*(compute_score("s", f"answer {i}", None, {"prompt": PROMPT}) for i in range(64)))
        return outs, [(b.calls, b.samples) for b in rv.batchers()]

    outs, stats = run(many())
    rpcs = score_rpcs(server) - before
    assert len(outs) == 64 and {tuple(o) for o in outs} == {EXTRA_KEYS}
    assert stats == [(1, 64)]
    assert 1 <= rpcs <= 2, rpcs  # 64 calls, one batched Score (the server counts it)
    with RewardClient(server.address, timeout=30) as c:
        want = c.score([{"prompt": PROMPT, "response": f"answer {i}"} for i in range(64)])
    assert [o["score"] for o in outs] == pytest.approx([w.reward for w in want], abs=1e-4)


def test_max_batch_splits_and_late_calls_start_a_new_batch(server, monkeypatch):
    monkeypatch.setenv("RMSERVE_MAX_BATCH", "10")

    async def go():
        first = await asyncio.gather(*(compute_score("s", f"r{i}", None, {"prompt": PROMPT}) for i in range(25)))
        second = await compute_score("s", "later", None, {"prompt": PROMPT})
        return first, second, [(b.calls, b.samples) for b in rv.batchers()]

    first, second, stats = run(go())
    assert len(first) == 25 and tuple(second) == EXTRA_KEYS
    assert stats == [(4, 26)]  # 10 + 10 + 5, then 1


def test_same_keys_for_every_sample_nan_where_not_served(tiny_ensemble, tmp_path, server_factory, monkeypatch):
    bare = make_tiny_ensemble(tmp_path / "bare", with_epistemic=False)
    s = server_factory(bare)
    monkeypatch.setenv("RMSERVE_ADDRESS", s.address)
    outs = run(lambda: asyncio.gather(*(compute_score("s", f"r{i}", None, {"prompt": PROMPT}) for i in range(5))))
    for out in outs:
        assert tuple(out) == EXTRA_KEYS
        assert math.isnan(out["rm_epistemic"]) and math.isfinite(out["score"])


# ---------------------------------------------------------------------------
# Errors


def test_unreachable_server_fails_every_caller_of_the_batch_with_a_typed_error(monkeypatch):
    monkeypatch.setenv("RMSERVE_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RMSERVE_MAX_RETRIES", "0")
    outs = run(lambda: asyncio.gather(*(compute_score("s", f"r{i}", None, {"prompt": PROMPT}) for i in range(8)),
                              return_exceptions=True))
    assert all(isinstance(e, RewardServiceError) for e in outs)
    assert {e.code for e in outs} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_an_error_fails_only_the_callers_of_its_batch(server):
    async def mixed():
        good = [compute_score("s", f"r{i}", None, {"prompt": PROMPT}) for i in range(4)]
        bad = [compute_score("s", f"r{i}", None, {"prompt": PROMPT, "rmserve_address": "127.0.0.1:1",
                                                  "rmserve_max_retries": 0}) for i in range(4)]
        malformed = [compute_score("s", "r", None, {"raw_prompt": 5})]
        return await asyncio.gather(*good, *bad, *malformed, return_exceptions=True)

    outs = run(mixed())
    assert all(tuple(o) == EXTRA_KEYS for o in outs[:4])
    assert all(isinstance(e, RewardServiceError) and e.code == grpc.StatusCode.UNAVAILABLE for e in outs[4:8])
    assert isinstance(outs[8], ValueError) and "raw_prompt" in str(outs[8])


def test_a_sample_the_server_rejects_fails_only_its_caller(server):
    # the tiny model scores at most 64 tokens: this response alone is too long (INVALID_ARGUMENT)
    async def mixed():
        calls = [compute_score("s", f"r{i}", None, {"prompt": PROMPT}) for i in range(6)]
        calls.insert(3, compute_score("s", "far too long " * 40, None, {"prompt": PROMPT}))
        return await asyncio.gather(*calls, return_exceptions=True), [(b.calls, b.samples) for b in rv.batchers()]

    outs, stats = run(mixed())
    assert isinstance(outs[3], RewardServiceError) and outs[3].code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(tuple(o) == EXTRA_KEYS for i, o in enumerate(outs) if i != 3)
    assert stats == [(8, 14)]  # the batch of 7, then each of the 7 on its own


def test_the_example_runs(server):
    import subprocess

    example = Path(__file__).parents[1] / "examples" / "verl_compute_score.py"
    proc = subprocess.run([sys.executable, str(example), "--address", server.address, "--samples", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 8 and all({"score", "rm_std", "rm_ood"} <= set(x) for x in lines)
    assert "# worker 0: 1 batched Score call(s) for 4 samples" in proc.stdout


def test_api_key_from_env_or_extra_info(tiny_ensemble, server_factory, tmp_path, monkeypatch):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-score": ["score"]}))
    s = server_factory(tiny_ensemble, api_keys=str(keys))
    monkeypatch.setenv("RMSERVE_ADDRESS", s.address)
    with pytest.raises(AuthenticationError) as err:
        run(compute_score("s", "r", None, {"prompt": PROMPT}))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert tuple(run(compute_score("s", "r", None, {"prompt": PROMPT, "rmserve_api_key": "k-score"}))) == EXTRA_KEYS
    monkeypatch.setenv("RMSERVE_API_KEY", "k-score")
    assert tuple(run(compute_score("s", "r", None, {"prompt": PROMPT}))) == EXTRA_KEYS
    with pytest.raises(AuthenticationError):
        run(compute_score("s", "r", None, {"prompt": PROMPT, "rmserve_api_key": "wrong"}))


# ---------------------------------------------------------------------------
# Loops, threads, the sync entry points, the run monitor


def test_a_batcher_per_event_loop(server):
    # verl may run each worker on a loop of its own: a new loop gets its own client and batcher
    for _ in range(2):
        assert tuple(asyncio.run(compute_score("s", "r", None, {"prompt": PROMPT}))) == EXTRA_KEYS
    results, errors = [], []

    def worker(i):
        try:
            results.append(run(lambda: asyncio.gather(*(compute_score("s", f"t{i}-{j}", None, {"prompt": PROMPT})
                                                 for j in range(16)))))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4 and all(len(r) == 16 for r in results)


def test_sync_entry_points_batch_across_threads(server):
    before = score_rpcs(server)
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: compute_score_sync("s", f"r{i}", None, {"prompt": PROMPT}), range(32)))
    assert [tuple(o) for o in outs] == [EXTRA_KEYS] * 32
    assert score_rpcs(server) - before < 32
    outs = compute_score_batch(["s"] * 3, ["a", "b", "c"], [None] * 3, [{"prompt": PROMPT}, {"prompt": CHAT}, {}])
    with RewardClient(server.address, timeout=30) as c:
        want = c.score([{"prompt": PROMPT, "response": "a"}, {"prompt": CHAT, "response": "b"},
                        {"prompt": "", "response": "c"}])
    assert [o["score"] for o in outs] == pytest.approx([w.reward for w in want], abs=1e-4)


def test_run_id_and_step_tag_the_calls(server, monkeypatch):
    monkeypatch.setenv("RMSERVE_RUN_ID", "verl-test")
    for step in (1, 2, 3):
        run(lambda step=step: asyncio.gather(*(compute_score("s", f"r{i}", None, {"prompt": PROMPT, "global_step": step})
                             for i in range(4))))
    with RewardClient(server.address, timeout=30) as c:
        status = c.run_status("verl-test")
    assert [(st.first_step, st.count) for st in status.series] == [(1, 4), (2, 4), (3, 4)]


def test_step_from_pauses_between_rounds(server, monkeypatch):
    monkeypatch.setenv("RMSERVE_RUN_ID", "verl-gap")
    monkeypatch.setenv("RMSERVE_STEP_GAP_S", "0.3")
    monkeypatch.setattr(rv, "_round", {"step": -1, "last": -math.inf})

    async def rounds():
        for _ in range(3):
            await asyncio.gather(*(compute_score("s", f"r{i}", None, {"prompt": PROMPT}) for i in range(4)))
            await asyncio.sleep(0.5)

    run(rounds())
    with RewardClient(server.address, timeout=30) as c:
        status = c.run_status("verl-gap")
    assert [(st.first_step, st.count) for st in status.series] == [(0, 4), (1, 4), (2, 4)]


# ---------------------------------------------------------------------------
# verl's own reward loop


class _RayStub(importlib.machinery.PathFinder):
    """Stands in for `ray` (not installed here): any attribute is a MagicMock, `get` is the identity."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            return importlib.machinery.ModuleSpec(name, cls(), is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        if spec.name == "ray":
            module.get = lambda refs, **_: refs
        return module

    def exec_module(self, module):
        pass


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


@pytest.fixture(scope="module")
def verl():
    paths = [p for p in os.environ.get("RMSERVE_VERL_PATH", "").split(os.pathsep) if p]
    if not paths:
        pytest.skip("verl is not installed: set RMSERVE_VERL_PATH to an unpacked verl wheel (examples/verl.md)")
    sys.path[:0] = paths
    stub = None
    try:
        import ray  # noqa: F401
    except ImportError:
        stub = _RayStub
        sys.meta_path.insert(0, stub)
    try:
        verl = pytest.importorskip("verl")
        pytest.importorskip("verl.experimental.reward_loop")
        yield verl
    finally:
        if stub is not None:  # later tests must not find a fake ray
            sys.meta_path.remove(stub)
            for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
                del sys.modules[name]
        for p in paths:
            sys.path.remove(p)


def _config(tok_dir: Path, fn_file: Path | str, manager: str, **reward):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(tok_dir), "tokenizer_path": str(tok_dir)}},
        "reward": {
            "num_workers": 2,
            "custom_reward_function": {"path": str(fn_file), "name": "compute_score", "reward_kwargs": {}},
            "reward_manager": {"source": "register", "name": manager,
                               "module": {"path": None, "name": "custom_reward_manager"}},
            "reward_model": {"enable": False, "enable_resource_pool": False, "model_path": None},
            "sandbox_fusion": {"url": None},
            **reward,
        },
    })


def _batch(tokenizer, rows):
    """A DataProto shaped like a rollout: left-padded prompts, right-padded responses."""
    import numpy as np
    import torch
    from verl import DataProto

    p_ids = [tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"] for r in rows]
    r_ids = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] for r in rows]
    P, R = max(map(len, p_ids)), max(map(len, r_ids)) + 2
    prompts = torch.zeros(len(rows), P, dtype=torch.long)
    responses = torch.zeros(len(rows), R, dtype=torch.long)
    mask = torch.zeros(len(rows), P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        prompts[i, P - len(p):] = torch.tensor(p)
        responses[i, :len(r)] = torch.tensor(r)
        mask[i, P - len(p):P + len(r)] = 1
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask,
                 "input_ids": torch.cat([prompts, responses], 1)},
        non_tensors={
            "data_source": np.array(["rmserve"] * len(rows), dtype=object),
            "reward_model": np.array([{"ground_truth": ""} for _ in rows], dtype=object),
            "extra_info": np.array([{"prompt": r["prompt"], "index": i} for i, r in enumerate(rows)], dtype=object),
        },
    )


@pytest.fixture
def verl_setup(verl, server, tiny_ensemble, tmp_path):
    from transformers import AutoTokenizer

    tok_dir = tiny_ensemble / "backbone"  # the policy's tokenizer: any will do, this one is at hand
    fn_file = tmp_path / "reward_fn.py"
    fn_file.write_text("from rmserve.client.verl import compute_score  # noqa: F401\n")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = [{"prompt": [{"role": "user", "content": f"{PROMPT} ({i})"}], "prompt_text": f"{PROMPT} ({i})",
             "response": f"Mix flour and water, step {i}."} for i in range(12)]
    return tok_dir, fn_file, tokenizer, rows


def _expected(server, tokenizer, rows):
    with RewardClient(server.address, timeout=30) as c:
        return c.score([{"prompt": r["prompt"], "response": tokenizer.decode(
            tokenizer(r["response"], add_special_tokens=False)["input_ids"], skip_special_tokens=True)}
            for r in rows])


@pytest.mark.parametrize(("manager", "path"), [("naive", "pkg"), ("naive", "file"), ("rate_limited", "pkg")])
def test_verl_reward_loop_manager_and_workers(verl_setup, server, manager, path):
    """verl's RewardLoopManager.compute_rm_score over two RewardLoopWorkers, each on its own event
    loop (as in two Ray actors), loading our function from `custom_reward_function.path`
    (`pkg://rmserve.client.verl`, or a file that imports it)."""
    import numpy as np
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager, RewardLoopWorker
    from verl.experimental.reward_loop.reward_manager.limited import RateLimitedRewardManager
    from verl.trainer.ppo.reward import extract_reward, resolve_reward_manager_cls

    tok_dir, fn_file, tokenizer, rows = verl_setup
    fn_path = "pkg://rmserve.client.verl" if path == "pkg" else fn_file
    config = _config(tok_dir, fn_path, manager, max_concurrent=64, timeout=60.0)
    RateLimitedRewardManager._class_initialized = False  # its limiters are class-wide, bound to a loop
    before = score_rpcs(server)

    class Handle:  # what ray.remote(RewardLoopWorker).remote(...) would be
        def __init__(self):
            asyncio.set_event_loop(asyncio.new_event_loop())  # verl's get_event_loop() picks it up
            self.worker = RewardLoopWorker(config, None)
            self.compute_score_batch = types.SimpleNamespace(remote=self._batch)

        def _batch(self, chunk):
            return self.worker.loop.run_until_complete(self.worker.compute_score_batch(chunk))

    manager_obj = RewardLoopManager.__new__(RewardLoopManager)
    manager_obj.config, manager_obj.reward_model_manager, manager_obj.reward_router_address = config, None, None
    manager_obj.reward_manager_cls = resolve_reward_manager_cls(config)
    manager_obj.reward_loop_workers = [Handle(), Handle()]
    workers = [h.worker for h in manager_obj.reward_loop_workers]
    assert workers[0].loop is not workers[1].loop
    assert all(w.reward_manager.is_async_reward_score for w in workers)  # verl awaits it on its loop
    assert type(workers[0].reward_manager).__name__ == {"naive": "NaiveRewardManager",
                                                       "rate_limited": "RateLimitedRewardManager"}[manager]
    try:
        out = manager_obj.compute_rm_score(_batch(tokenizer, rows))
    finally:
        for h in manager_obj.reward_loop_workers:
            h.worker.loop.run_until_complete(rv.reset())
            h.worker.loop.close()
        asyncio.set_event_loop(None)

    rm_scores, extra = extract_reward(out)
    assert set(extra) == set(EXTRA_KEYS)
    want = _expected(server, tokenizer, rows)
    lengths = out.batch["rm_scores"].new_tensor(
        [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]).long()
    got = rm_scores[np.arange(len(rows)), lengths - 1].tolist()
    assert got == pytest.approx([w.reward for w in want], abs=1e-4)
    assert extra["rm_std"].tolist() == pytest.approx([w.std for w in want], abs=1e-4)
    assert np.isnan(extra["rm_ood"].astype(float)).all() or np.isfinite(extra["rm_ood"].astype(float)).all()
    assert score_rpcs(server) - before <= 4  # 12 samples, 2 workers: one batch each (not 12 RPCs)
    if manager == "rate_limited":  # a timeout or error there would come back as reward 0 plus these keys
        assert "error" not in extra and "timeout" not in extra


def test_verl_legacy_reward_managers(verl_setup, server):
    """The legacy (non reward-loop) managers: `naive` calls compute_score_sync, `batch` compute_score_batch."""
    from verl.workers.reward_manager import BatchRewardManager, NaiveRewardManager

    _, _, tokenizer, rows = verl_setup
    data = _batch(tokenizer, rows[:4])
    want = [w.reward for w in _expected(server, tokenizer, rows[:4])]
    for mgr in (NaiveRewardManager(tokenizer, num_examine=0, compute_score=compute_score_sync),
                BatchRewardManager(tokenizer, num_examine=0, compute_score=compute_score_batch)):
        out = mgr(data, return_dict=True)
        assert set(out["reward_extra_info"]) >= set(EXTRA_KEYS)
        assert list(out["reward_extra_info"]["score"]) == pytest.approx(want, abs=1e-4)
        assert out["reward_tensor"].sum(-1).tolist() == pytest.approx(want, abs=1e-4)


def test_verl_manager_from_the_docs_puts_raw_prompt_into_extra_info(verl_setup, server, tmp_path):
    """The reward manager examples/verl.md gives, loaded as verl loads it (`source: importlib`)."""
    import re

    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    tok_dir, fn_file, tokenizer, rows = verl_setup
    doc = (Path(__file__).parents[1] / "examples" / "verl.md").read_text()
    section = doc.split("<!-- verl-manager-begin -->")[1].split("<!-- verl-manager-end -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "rmserve_manager.py").write_text(code)
    config = _config(tok_dir, fn_file, "PromptToExtraInfo")
    config.reward.reward_manager.source = "importlib"
    config.reward.reward_manager.module.path = str(tmp_path / "rmserve_manager.py")
    data = _batch(tokenizer, rows[:4])
    for info in data.non_tensor_batch["extra_info"]:
        del info["prompt"]  # only verl's raw_prompt carries it now
    import numpy as np

    raw = np.empty(4, dtype=object)
    raw[:] = [np.array(r["prompt"], dtype=object) for r in rows[:4]]  # as verl's dataset gives it
    data.non_tensor_batch["raw_prompt"] = raw
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = RewardLoopWorker(config, None)
    try:
        outs = worker.loop.run_until_complete(worker.compute_score_batch(data))
        worker.loop.run_until_complete(rv.reset())
    finally:
        worker.loop.close()
        asyncio.set_event_loop(None)
    assert type(worker.reward_manager).__name__ == "PromptToExtraInfo"
    want = _expected(server, tokenizer, rows[:4])
    assert [o["reward_score"] for o in outs] == pytest.approx([w.reward for w in want], abs=1e-4)
