"""Hot swap with several replicas on one registry directory (service/server/replica_sync.py).

Two `rmserve serve` processes share a registry holding v1, v2 and a broken version, and
poll its ACTIVE pointer every 0.2 s. ActivateModel(propagate=False) switches one replica
only; ActivateModel(propagate=True) (the default) moves the other within a bounded wait;
ACTIVE naming a version a replica cannot load leaves it serving its version, counted in its
metrics and not retried until ACTIVE is written again. Waits poll for a state with a
generous bound; nothing asserts on speed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shutil
import time
from pathlib import Path

import grpc
import pytest

from rmserve.client import RewardClient, RewardServiceError
from rmserve.service.engine.ensemble import read_manifest, write_manifest
from rmserve.service.server.registry import ACTIVE, Registry
from tests.helpers import scraped_sample

SAMPLE = [{"prompt": "hello", "response": "thanks for the bread"}]
POLL = "0.2"
WAIT_S = 120  # a bound for a busy machine, never reached when things work


def make_version(src: Path, registry: Path, version: str, *, broken: bool = False) -> Path:
    """A registry version: the tiny ensemble (with its backbone) under its own name, staged
    and renamed into place as the trainer publishes one."""
    staging = registry / f".staging-{version}"
    shutil.copytree(src, staging)
    write_manifest(staging, dataclasses.replace(read_manifest(staging), version=version))
    if broken:
        (staging / "member0" / "heads.safetensors").write_bytes(b"not a safetensors file")
    staging.rename(registry / version)
    return registry / version


def wait_for(what: str, check, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric(port: int, name: str, **labels: str) -> float:
    """A sample of a replica's /metrics; 0 when absent (a labelled counter not yet counted)."""
    return scraped_sample(f"http://127.0.0.1:{port}/metrics", name, **labels)


def version_of(address: str) -> str:
    with RewardClient(address, timeout=60) as c:
        return c.score(SAMPLE).model_version


@pytest.fixture
def shared_registry(tiny_ensemble, tmp_path) -> Path:
    registry = tmp_path / "shared-registry"
    registry.mkdir()
    for v in ("v1", "v2"):
        make_version(tiny_ensemble, registry, v)
    make_version(tiny_ensemble, registry, "broken", broken=True)
    Registry(registry).set_active("v1")
    return registry


@pytest.mark.slow
def test_replicas_follow_the_registry(shared_registry, tmp_path, serve_process):
    def start(name: str):
        cwd = tmp_path / name
        cwd.mkdir()
        # both start on v1 (the registry's ACTIVE too); each keeps its own preference store and run file
        return serve_process(shared_registry / "v1", cwd, "--registry", str(shared_registry),
                             "--registry-poll", POLL, "--metrics-port", "0", "--runs-file", "",
                             "--labels-db", str(cwd / "labels.sqlite3"))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two start in parallel
        (_, a, a_metrics), (_, b, b_metrics) = pool.map(start, ["a", "b"])
    assert version_of(a) == version_of(b) == "v1"
    active = shared_registry / ACTIVE

    # 1. propagate=False: replica A only (a canary); ACTIVE, and so B, stay on v1
    with RewardClient(a, timeout=60) as ca:
        act = ca.activate_model("v2", propagate=False)
    assert (act.version, act.previous_version, act.propagated) == ("v2", "v1", False)
    assert version_of(a) == "v2"
    assert active.read_text().strip() == "v1"
    wait_for("A to report itself off the registry's version",
             lambda: metric(a_metrics, "rmserve_registry_out_of_sync") == 1)
    time.sleep(10 * float(POLL))  # B polls ~10 times meanwhile: nothing may move it
    assert version_of(b) == "v1"
    assert metric(b_metrics, "rmserve_model_activations_total", source="registry", result="ok") == 0

    # 2. propagate=True (the default): ACTIVE names v2, B follows while it keeps answering;
    #    each response's model_version says which version scored it, and B never goes back
    with RewardClient(a, timeout=60) as ca:
        assert ca.activate_model("v2").propagated
    assert active.read_text().strip() == "v2"
    seen: list[str] = []
    with RewardClient(b, timeout=60) as cb:
        wait_for("B to serve v2", lambda: seen.append(cb.score(SAMPLE).model_version) or seen[-1] == "v2")
        assert cb.model_info().version == "v2"
    switch = seen.index("v2")
    assert set(seen[:switch]) <= {"v1"} and set(seen[switch:]) == {"v2"}, seen
    # the swap is visible before the follower has counted it: wait for the count too
    wait_for("B to count the activation", lambda: metric(
        b_metrics, "rmserve_model_activations_total", source="registry", result="ok") == 1)
    assert metric(b_metrics, "rmserve_registry_out_of_sync") == 0
    assert metric(a_metrics, "rmserve_model_activations_total", source="rpc", result="ok") == 2

    # 3. a version that fails to load on the replica asked is never propagated
    with RewardClient(a, timeout=60) as ca:
        with pytest.raises(RewardServiceError) as err:
            ca.activate_model("broken")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert active.read_text().strip() == "v2"
    assert metric(a_metrics, "rmserve_model_activations_total", source="rpc", result="failed") == 1

    # 4. ACTIVE naming a version these replicas cannot load (written by another writer, or one
    #    that loads elsewhere): each keeps serving v2, counts one failure, and does not retry it
    Registry(shared_registry).set_active("broken")
    for port in (a_metrics, b_metrics):
        wait_for("the failed follow to be counted", lambda port=port: metric(
            port, "rmserve_model_activations_total", source="registry", result="failed") == 1)
        assert metric(port, "rmserve_registry_out_of_sync") == 1
    time.sleep(10 * float(POLL))
    for address, port in ((a, a_metrics), (b, b_metrics)):
        assert version_of(address) == "v2"
        assert metric(port, "rmserve_model_activations_total", source="registry", result="failed") == 1

    # 5. rollback from the other replica: B activates v1 (default: propagate), A follows
    with RewardClient(b, timeout=60) as cb:
        assert cb.activate_model("v1").propagated
    wait_for("A to serve v1", lambda: version_of(a) == "v1")
    wait_for("A back in sync", lambda: metric(a_metrics, "rmserve_registry_out_of_sync") == 0)
    assert version_of(b) == "v1"


def test_a_version_that_appears_after_its_pointer_is_followed(shared_registry, tiny_ensemble, server_factory):
    """ACTIVE may reach a replica's view before the version's directory does (a bucket synced
    file by file): the follower keeps looking and activates it once it is there. In-process."""
    server = server_factory(None, registry=str(shared_registry), registry_poll_s=0.05)
    assert version_of(server.address) == "v1"
    Registry(shared_registry).set_active("v3")  # not there yet
    time.sleep(0.5)
    assert version_of(server.address) == "v1"
    make_version(tiny_ensemble, shared_registry, "v3")
    wait_for("the server to serve v3", lambda: version_of(server.address) == "v3")


def test_a_hand_copied_entry_whose_manifest_names_another_version_is_in_sync(shared_registry, tiny_ensemble,
                                                                            server_factory):
    """An operator copied a model into the registry under a directory name of their own; its
    manifest keeps its version. Once the follower serves it, the replica is in sync (before, the
    directory name never equalled the served version and out_of_sync stayed 1)."""
    server = server_factory(None, registry=str(shared_registry), registry_poll_s=0.05)
    port = int(server.metrics_url.rsplit(":", 1)[1].split("/")[0])
    copied = make_version(tiny_ensemble, shared_registry, "copied")
    write_manifest(copied, dataclasses.replace(read_manifest(copied), version="from-elsewhere-7"))
    Registry(shared_registry).set_active("copied")
    wait_for("the server to serve the copied entry", lambda: version_of(server.address) == "from-elsewhere-7")
    time.sleep(0.3)  # several polls after the activation
    assert metric(port, "rmserve_registry_out_of_sync") == 0
    assert version_of(server.address) == "from-elsewhere-7"  # and no reload loop moved it
    # a replica (re)started on that ACTIVE serves the entry and is in sync from the start
    again = server_factory(None, registry=str(shared_registry), registry_poll_s=0.05)
    assert version_of(again.address) == "from-elsewhere-7"
    time.sleep(0.3)
    assert metric(int(again.metrics_url.rsplit(":", 1)[1].split("/")[0]), "rmserve_registry_out_of_sync") == 0


def test_the_pointer_changes_identity_on_every_write(tmp_path):
    registry = Registry(tmp_path)
    assert registry.pointer() is None
    registry.set_active("v1")
    first = registry.pointer()
    registry.set_active("v1")  # activating the same version again is a new write a follower sees
    second = registry.pointer()
    assert first[0] == second[0] == "v1" and first != second
    assert not [p for p in tmp_path.iterdir() if p.name != ACTIVE], "no temp file left behind"


def test_a_replica_started_before_its_pointers_version_arrived_follows_it(shared_registry, tiny_ensemble,
                                                                          server_factory):
    """ACTIVE already names v4 when the replica starts, but v4's directory is not there yet: the
    replica starts on what it can serve and moves to v4 once it appears (not only after ACTIVE is
    written again)."""
    Registry(shared_registry).set_active("v4")
    server = server_factory(tiny_ensemble, registry=str(shared_registry), registry_poll_s=0.05)
    assert version_of(server.address) == "v1"  # the tiny ensemble's own version
    make_version(tiny_ensemble, shared_registry, "v4")
    wait_for("the server to serve v4", lambda: version_of(server.address) == "v4")


def test_an_activation_whose_pointer_cannot_be_written_reports_it_was_not_propagated(
        shared_registry, tiny_ensemble, server_factory, monkeypatch):
    """The replica switched; only writing ACTIVE failed (a read-only shared volume): the call
    succeeds with propagated=False rather than report a failure for a swap that happened."""
    server = server_factory(None, registry=str(shared_registry), registry_poll_s=0)
    before = Registry(shared_registry).pointer()

    def read_only(self, version):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Registry, "set_active", read_only)
    with RewardClient(server.address, timeout=60) as c:
        done = c.activate_model("v2")
    assert done.version == "v2" and done.propagated is False
    assert version_of(server.address) == "v2" and Registry(shared_registry).pointer() == before
