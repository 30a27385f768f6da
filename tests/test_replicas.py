"""Several replicas: the SDK balances over a list of addresses (round_robin) and a call that
meets a replica killed mid-run (SIGKILL) is retried on another: every request gets its result."""

from __future__ import annotations

import pytest

from rmserve.client import RewardClient
from rmserve.client._core import channel_target, is_balanced

SAMPLES = [{"prompt": f"question {i}: how do I bake bread?", "response": "Mix flour and water. " * (1 + i % 4)}
           for i in range(12)]


def test_targets():
    assert channel_target("h:1") == "h:1" and not is_balanced("h:1")
    assert channel_target(["127.0.0.1:5", "127.0.0.1:6"]) == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert channel_target(["localhost:7"]) == "localhost:7"
    assert is_balanced("dns:///rm.svc:50051") and is_balanced("ipv4:127.0.0.1:5,127.0.0.1:6")
    for bad in ([], [""], ["nohost", "127.0.0.1:1"], ["h:port", "127.0.0.1:1"]):
        with pytest.raises(ValueError):
            channel_target(bad)
    with pytest.raises(ValueError, match="cannot resolve"):
        channel_target(["no-such-host.invalid:1", "127.0.0.1:2"])


@pytest.mark.slow
def test_a_replica_killed_mid_run_loses_no_request(tiny_ensemble, tmp_path, serve_process):
    procs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        proc, address, _ = serve_process(tiny_ensemble, tmp_path / str(i), "--metrics-port", "-1", "--runs-file", "")
        procs.append((proc, address))
    addresses = [a for _, a in procs]
    with RewardClient(addresses[0], timeout=60) as one:
        want = [r.reward for r in one.score(SAMPLES)]
    results, errors = [], []
    with RewardClient(addresses, timeout=60, max_retries=8, initial_backoff=0.05, max_samples_per_request=3) as c:
        for step in range(40):
            if step == 15:
                procs[0][0].kill()  # SIGKILL: no graceful stop, connections die mid-call
            try:
                results.append([r.reward for r in c.score(SAMPLES)])
            except Exception as e:  # counted, and the test fails on any
                errors.append(repr(e))
    assert not errors, errors[:3]
    assert len(results) == 40
    for got in results:
        assert got == pytest.approx(want, abs=1e-6)
