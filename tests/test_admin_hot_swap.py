"""Train through the Train RPC while another client keeps scoring, activate the new
version, and check every request was served by the right version and none failed."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time

import grpc
import pytest

from rmserve.client import RewardClient, RewardServiceError
from rmserve.service.engine.ensemble import read_manifest

WORDS = ["fox", "dog", "bread", "flour", "water", "salt", "yeast", "quick", "brown", "lazy", "hello", "today"]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Chosen says 'thanks' where rejected says 'no': a rule a tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        body = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        pos = rng.randint(0, len(body))
        prompt = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"prompt": prompt, "chosen": " ".join([*body[:pos], "thanks", *body[pos:]]),
                     "rejected": " ".join([*body[:pos], "no", *body[pos:]])})
    return rows


@pytest.fixture
def admin_server(tiny_ensemble, server_factory, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(64, 1)))
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(32, 2)))
    registry = tmp_path / "registry"
    server = server_factory(tiny_ensemble, registry=str(registry), data_roots=[str(data)])
    return server, data, registry


def test_train_while_scoring_then_hot_swap(admin_server):
    server, data, registry = admin_server
    served: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def keep_scoring():
        with RewardClient(server.address, timeout=60) as c:
            while not stop.is_set():
                try:
                    served.append(c.score([{"prompt": "hello", "response": "thanks for the bread"}]).model_version)
                except Exception as e:  # any failure fails the test
                    errors.append(e)
                time.sleep(0.01)

    scorer = threading.Thread(target=keep_scoring)
    scorer.start()
    try:
        with RewardClient(server.address, timeout=300) as c:
            events = list(c.train(
                str(data / "train.jsonl"), dev_path=str(data / "dev.jsonl"), num_heads=3, epochs=30, lr=0.05,
                activate=True, options={"feature_cache": "", "calib_frac": 0.0},
            ))
            new_version = events[0].version
            # wait (not sleep) for a few requests answered by the new version
            for _ in range(60_000):
                if sum(v == new_version for v in served) >= 3 or errors or not scorer.is_alive():
                    break
                time.sleep(0.001)
    finally:
        stop.set()
        scorer.join(60)

    kinds = [e.event for e in events]
    assert kinds[0] == "start" and "done" in kinds and kinds[-1] == "activated", kinds
    assert "error" not in kinds
    new = events[0].version
    assert all(e.version == new for e in events)
    done = next(e for e in events if e.event == "done")
    assert done.report["train"]["accuracy"] >= 0.9
    assert any(e.event == "step" and e.loss is not None for e in events)

    assert not errors, errors[:3]
    assert served[0] == "v1" and served[-1] == new
    switch = served.index(new)
    assert set(served[:switch]) == {"v1"} and set(served[switch:]) == {new}, "versions interleaved after the swap"

    with RewardClient(server.address, timeout=60) as c:
        assert c.model_info().version == new
        models = c.list_models()
        assert [m.version for m in models] == [new] and models[0].active
        assert models[0].report["train"]["accuracy"] == done.report["train"]["accuracy"]
    assert read_manifest(registry / new).version == new
    assert (registry / "ACTIVE").read_text().strip() == new
    assert not any(p.name.startswith(".staging") for p in registry.iterdir())


def test_a_failed_activation_keeps_the_current_version_serving(admin_server, tiny_ensemble):
    server, _, registry = admin_server
    broken = registry / "broken"
    shutil.copytree(tiny_ensemble, broken)
    (broken / "member0" / "heads.safetensors").write_bytes(b"not a safetensors file")
    with RewardClient(server.address, timeout=60) as c:
        with pytest.raises(RewardServiceError) as err:
            c.activate_model("broken")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "still serving v1" in str(err.value)
        with pytest.raises(RewardServiceError) as err:
            c.activate_model("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert c.model_info().version == "v1"
        assert len(c.score([{"prompt": "a", "response": "b"}])) == 1


def test_train_refuses_data_outside_its_roots_and_bad_options(admin_server, tmp_path):
    server, data, _ = admin_server
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((data / "train.jsonl").read_text())
    with RewardClient(server.address, timeout=60) as c:
        for path, options, match in [
            (str(outside), None, "outside the server's data roots"),
            (str(data / "missing.jsonl"), None, "does not exist"),
            (str(data / "train.jsonl"), {"out": "/tmp/x"}, "may not set ['out']"),
            (str(data / "train.jsonl"), {"epochs": 0}, "bad training config"),
        ]:
            with pytest.raises(RewardServiceError) as err:
                list(c.train(path, options=options))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, path
            assert match in str(err.value)


def test_train_is_refused_without_data_roots(tiny_server):
    with RewardClient(tiny_server.address, timeout=60) as c:
        with pytest.raises(RewardServiceError) as err:
            list(c.train("/etc/passwd"))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--data-root" in str(err.value)
