"""Labelers feeding preferences back: the store (durable, idempotent, all-or-nothing
batches, versioned schema), the LabelService through the SDK, the export, and
training from the store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from rmserve.service.data.preferences import (
    MIGRATIONS,
    Filters,
    Preference,
    PreferenceConflict,
    SqliteStore,
    StoreFull,
    StoreUnavailable,
)


def pref(i: int, *, choice: int = 0, labeler: str = "ann", kind: str = "human", **kw) -> Preference:
    return Preference(id=f"p{i}", prompt=f"question {i}?", responses=[f"good answer {i}", f"bad answer {i}"],
                      choice=choice, labeler=labeler, labeler_kind=kind, **kw)


def item(i: int, **kw) -> dict:
    base = {"id": f"p{i}", "prompt": f"question {i}?", "responses": [f"good answer {i}", f"bad answer {i}"],
            "choice": 0, "labeler": "ann", "labeler_kind": "human"}
    return {**base, **kw}


# -- the store ----------------------------------------------------------------------------


def test_a_retry_is_a_duplicate_and_a_changed_label_is_a_conflict_that_stores_nothing(tmp_path):
    store = SqliteStore(tmp_path / "prefs.sqlite3")
    r = store.submit([pref(0), pref(1)])
    assert (r.accepted, r.duplicates, r.total) == (2, 0, 2)
    r = store.submit([pref(1), pref(2)])             # a retried item beside a new one
    assert (r.accepted, r.duplicates, r.total) == (1, 1, 3)
    with pytest.raises(PreferenceConflict, match=r"item 1: id 'p0' is already stored with different content"):
        store.submit([pref(3), pref(0, choice=1)])   # p0 relabelled: the whole batch fails
    assert store.count() == 3 and [p.id for p in store.query()] == ["p0", "p1", "p2"]
    assert next(store.query()).choice == 0           # the stored label is untouched
    with pytest.raises(PreferenceConflict):          # the same id twice with different content in one batch
        store.submit([pref(9), pref(9, choice=1)])
    assert store.count() == 3


def test_a_server_filled_timestamp_keeps_a_retry_a_duplicate(tmp_path):
    store = SqliteStore(tmp_path / "prefs.sqlite3")
    store.submit([pref(0)])
    assert store.submit([pref(0)]).duplicates == 1   # received differs; the client's content does not
    assert store.submit([pref(1, timestamp=100.0)]).accepted == 1
    with pytest.raises(PreferenceConflict):
        store.submit([pref(1, timestamp=200.0)])     # a client timestamp is content


def test_filters_and_training_rows(tmp_path):
    store = SqliteStore(tmp_path / "prefs.sqlite3")
    store.submit([
        pref(0, tag="a", timestamp=10.0),
        pref(1, kind="ai", labeler="judge-1", judge="smollm2", tag="b", timestamp=20.0, margin=0.5),
        Preference(id="r", prompt=[{"role": "user", "content": "rank these"}], responses=["x", "y", "z"],
                   ranking=[1, 0, 2], labeler="bob", timestamp=30.0),
        Preference(id="t", prompt="tie?", responses=["same", "also same"], tie=True, labeler="bob", timestamp=40.0),
        Preference(id="c3", prompt="pick", responses=["u", "v", "w"], choice=2, labeler="bob", timestamp=50.0),
    ])
    assert [p.id for p in store.query(Filters(kind="ai"))] == ["p1"]
    assert [p.id for p in store.query(Filters(since=25.0))] == ["r", "t", "c3"]
    assert [p.id for p in store.query(Filters(tag="a"))] == ["p0"]
    assert [p.id for p in store.query(Filters(labeler="bob", since=35.0))] == ["t", "c3"]
    rows = {p.id: p.training_row() for p in store.query()}
    assert rows["p0"]["chosen"] == "good answer 0" and rows["p0"]["rejected"] == "bad answer 0"
    assert rows["p1"]["margin"] == 0.5 and rows["p1"]["labeler_kind"] == "ai" and rows["p1"]["judge"] == "smollm2"
    assert rows["r"]["ranking"] == [1, 0, 2] and rows["r"]["prompt"][0]["content"] == "rank these"
    assert rows["t"]["tie"] is True and rows["c3"]["ranking"] == [1, 1, 0]

    from rmserve.service.data.preferences import training_rows
    from rmserve.training.data import pairs_from_rows

    pairs, report = pairs_from_rows(training_rows(store))
    # p0, p1: one pair each; r: 3 untied pairs; t: a tie (counted, no pair); c3: w beats u and v,
    # and says nothing of u vs v (counted as a tie too)
    assert len(pairs) == 2 + 3 + 2 and sum(report.ties.values()) == 2


def test_the_schema_is_versioned_and_a_newer_store_is_refused(tmp_path):
    path = tmp_path / "prefs.sqlite3"
    SqliteStore(path).submit([pref(0)])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreUnavailable, match="upgrade rmserve"):
        SqliteStore(path).count()


def test_a_full_disk_and_an_unwritable_store_fail_clearly_and_store_nothing(tmp_path):
    store = SqliteStore(tmp_path / "prefs.sqlite3")
    store.submit([pref(0)])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
    big = [pref(i, rationale="x" * 20_000) for i in range(1, 20)]
    with pytest.raises(StoreFull, match="full disk: nothing of this batch was stored"):
        store.submit(big)
    assert store.count() == 1
    with pytest.raises(StoreUnavailable, match="cannot be written"):
        SqliteStore("/proc/rmserve-no-such-dir/prefs.sqlite3").submit([pref(0)])


def _submit_many(path: str, start: int, n: int, overlap: int) -> None:
    store = SqliteStore(path)
    for i in range(start, start + n):
        store.submit([pref(i), pref(i % overlap)])  # every submitter also resubmits shared ids


def test_concurrent_submitters_in_threads_and_processes_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "prefs.sqlite3")
    SqliteStore(path).count()  # create the schema once
    threads = [threading.Thread(target=_submit_many, args=(path, k * 40, 40, 7)) for k in range(3)]
    procs = [mp.get_context("spawn").Process(target=_submit_many, args=(path, 1000 + k * 40, 40, 7)) for k in range(2)]
    for t in threads + procs:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = [p.id for p in SqliteStore(path).query()]
    expected = {f"p{i}" for k in range(3) for i in range(k * 40, k * 40 + 40)}
    expected |= {f"p{i}" for k in range(2) for i in range(1000 + k * 40, 1000 + k * 40 + 40)}
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected


# -- the service --------------------------------------------------------------------------


@pytest.fixture
def label_server(tiny_ensemble, server_factory, tmp_path):
    return server_factory(tiny_ensemble, labels_db=str(tmp_path / "labels.sqlite3"), max_samples_per_request=16)


def test_submit_through_the_sdk_is_idempotent_and_names_bad_items(label_server, tmp_path):
    from rmserve.client import AlreadyExistsError, InvalidRequestError, RewardClient

    with RewardClient(label_server.address, timeout=60, max_samples_per_request=16) as c:
        r = c.submit_preferences([item(i) for i in range(40)])  # 3 requests of <= 16
        assert (r.accepted, r.duplicates, r.total) == (40, 0, 40)
        r = c.submit_preferences([item(i) for i in range(35, 45)])
        assert (r.accepted, r.duplicates, r.total) == (5, 5, 45)
        with pytest.raises(AlreadyExistsError, match="item 1: id 'p3'"):
            c.submit_preferences([item(100), item(3, choice=1)])
        with pytest.raises(InvalidRequestError, match=r"item 1 \(id 'p101'\): choice 2 is out of range for 2 responses"):
            c.submit_preferences([item(102), item(101, choice=2)])
        with pytest.raises(InvalidRequestError, match="labeler_kind must be one of"):
            c.submit_preferences([item(103, labeler_kind="robot")])
        rows = list(c.export_preferences())
        assert len(rows) == 45 and rows[0]["id"] == "p0" and "p100" not in {r["id"] for r in rows}
        assert list(c.export_preferences(kind="ai")) == []
    store = SqliteStore(tmp_path / "labels.sqlite3")
    assert store.count() == 45


def test_the_label_scope_guards_the_label_service(tiny_ensemble, server_factory, tmp_path):
    from rmserve.client import PermissionDeniedError, RewardClient

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-score": ["score"], "k-label": ["label"]}))
    s = server_factory(tiny_ensemble, api_keys=str(keys), labels_db=str(tmp_path / "l.sqlite3"))
    with RewardClient(s.address, timeout=60, api_key="k-score") as c, pytest.raises(PermissionDeniedError, match="label"):
        c.submit_preferences([item(0)])
    with RewardClient(s.address, timeout=60, api_key="k-label") as c:
        assert c.submit_preferences([item(0)]).accepted == 1


def test_a_full_store_is_resource_exhausted_and_the_server_keeps_serving(label_server):
    from rmserve.client import ResourceExhaustedError, RewardClient

    store = label_server.server.store
    store.count()
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with RewardClient(label_server.address, timeout=60, max_retries=0) as c:
        with pytest.raises(ResourceExhaustedError, match="full disk"):
            c.submit_preferences([item(i, rationale="x" * 20_000) for i in range(10)])
        assert len(c.score([{"prompt": "hi", "response": "hello"}])) == 1
    assert store.count() == 0


def test_every_acknowledged_label_survives_a_sigkill(tiny_ensemble, tmp_path):
    """A real `rmserve serve` process, killed with SIGKILL right after acknowledging."""
    from rmserve.client import RewardClient

    db = tmp_path / "labels.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rmserve.service.cli", "serve", "--model", str(tiny_ensemble), "--port", "0",
         "--metrics-port", "-1", "--labels-db", str(db), "--registry", str(tmp_path / "reg"), "--runs-file", ""],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        address = None
        for line in proc.stderr:
            if m := re.search(r"SERVING .* on 127\.0\.0\.1:(\d+)", line):
                address = f"127.0.0.1:{m.group(1)}"
                break
        assert address, "the server did not come up"
        acked = 0
        with RewardClient(address, timeout=60) as c:
            for batch in range(5):
                acked += c.submit_preferences([item(batch * 10 + i) for i in range(10)]).accepted
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no flush: only what was committed counts
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert acked == 50
    assert SqliteStore(db).count() == 50


def test_labels_export_cli_from_a_store_and_training_from_the_store_equals_training_from_the_jsonl(
    tmp_path, tiny_llama_backbone
):
    """`rmserve labels export --store` writes training rows; `train --from-store` gives the same
    ensemble report as training on that JSONL."""
    from rmserve.service.cli import main
    from rmserve.service.data.train_config import TrainConfig
    from rmserve.training.trainer import train

    rng = __import__("random").Random(0)
    store = SqliteStore(tmp_path / "prefs.sqlite3")
    items = []
    for i in range(64):
        words = [rng.choice(["red", "blue", "green", "cat", "dog", "sun"]) for _ in range(6)]
        good, bad = " ".join([*words, "thanks"]), " ".join([*words, "no"])
        items.append(Preference(id=f"s{i}", prompt=f"prompt {i}", responses=[good, bad] if i % 2 else [bad, good],
                                choice=1 - i % 2, labeler="synth", labeler_kind="ai" if i % 4 else "human"))
    store.submit(items)
    store.close()
    out = tmp_path / "prefs.jsonl"
    assert main(["labels", "export", "--store", str(tmp_path / "prefs.sqlite3"), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 64
    base = dict(backbone=str(tiny_llama_backbone), max_tokens=64, kind="heads", num_heads=2, epochs=2, lr=1e-2,
                calib_frac=0.0, feature_cache=str(tmp_path / "cache"), version="v1", name="x")
    a = train(TrainConfig(data=str(out), out=str(tmp_path / "a"), **base)).report
    b = train(TrainConfig(data="", from_store=str(tmp_path / "prefs.sqlite3"), out=str(tmp_path / "b"), **base)).report
    for key in ("train",):
        assert a[key] == b[key]
    assert a["data"]["pairs"] == b["data"]["pairs"] == 64
    c = train(TrainConfig(data="", from_store=str(tmp_path / "prefs.sqlite3"), out=str(tmp_path / "c"),
                          store_filters={"kind": "human"}, **base)).report
    assert c["data"]["pairs"] == 16


def test_grpc_status_codes_of_the_store_errors():
    from rmserve.service.server.errors import grpc_status

    assert grpc_status(PreferenceConflict("x"))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert grpc_status(StoreFull("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(StoreUnavailable("x"))[0] == grpc.StatusCode.UNAVAILABLE


# -- choosing what to label, and watching the labelers --------------------------------------


def test_suggest_comparisons_ranks_pairs_by_the_acquisition_rule(label_server):
    from rmserve.client import RewardClient
    from rmserve.service.data.acquisition import score_pairs

    candidates = [
        {"id": f"c{i}", "prompt": f"How do I do task {i}?",
         "responses": [f"Step one, then step two for {i}.", "No.", f"I cannot help with task {i}."]}
        for i in range(4)
    ]
    with RewardClient(label_server.address, timeout=60) as c:
        got = c.suggest_comparisons(candidates, k=3)
        members = {
            (cand["id"], j): np.array(r.members)
            for cand in candidates
            for j, r in enumerate(c.score([{"prompt": cand["prompt"], "response": x} for x in cand["responses"]],
                                          return_members=True))
        }
    assert len(got) == 3 and [s.score for s in got] == sorted((s.score for s in got), reverse=True)
    assert len({s.candidate_id for s in got}) == 3  # the diversity rule: one pair per prompt first
    for s in got:
        want = score_pairs(members[(s.candidate_id, s.index_a)][None], members[(s.candidate_id, s.index_b)][None])
        assert s.prob == pytest.approx(float(want.prob[0]), abs=1e-4)
        assert s.score == pytest.approx(float(want.score[0]), abs=1e-4)
        cand = next(x for x in candidates if x["id"] == s.candidate_id)
        assert (s.response_a, s.response_b) == (cand["responses"][s.index_a], cand["responses"][s.index_b])
        assert s.prompt == cand["prompt"]
    # every pair of every candidate was considered: the best one is the best score over all 12 pairs
    all_scores = [
        float(score_pairs(members[(cand["id"], i)][None], members[(cand["id"], j)][None]).score[0])
        for cand in candidates for i in range(3) for j in range(i + 1, 3)
    ]
    assert got[0].score == pytest.approx(max(all_scores), abs=1e-4)


def test_the_labeler_report_singles_out_an_adversarial_labeler(label_server):
    """Four honest labelers (right 90% of the time) and one who flips every label, on shared items."""
    from rmserve.client import RewardClient

    rng = np.random.default_rng(0)
    honest = ["h1", "h2", "h3", "h4"]
    items = []
    for q in range(40):
        truth = int(rng.integers(2))   # which response is the better one
        for who in [*rng.choice(honest, size=3, replace=False).tolist(), "flipper"]:
            right = who != "flipper" and rng.random() < 0.9
            items.append(item(q, id=f"{who}-{q}", labeler=who, choice=truth if right else 1 - truth,
                              responses=[f"answer one to {q}", f"answer two to {q}"]))
    with RewardClient(label_server.address, timeout=120, max_samples_per_request=16) as c:
        assert c.submit_preferences(items).accepted == len(items)
        report = {s.labeler: s for s in c.labeler_report()}
    assert set(report) == {*honest, "flipper"}
    assert [w for w, s in report.items() if s.flagged] == ["flipper"], {w: s.reason for w, s in report.items()}
    assert report["flipper"].agreement_with_others < 0 < min(report[h].agreement_with_others for h in honest)
    assert report["flipper"].volume == 40 and report["flipper"].reason


def test_an_rlaif_round_labels_the_suggestions_and_a_rerun_stores_nothing_twice(label_server):
    from rmserve.client import RewardClient
    from rmserve.client.rlaif import label_round

    def shorter_is_better(prompt, a: str, b: str) -> float:
        return 0.9 if len(a) < len(b) else 0.1

    candidates = [{"prompt": f"q{i}?", "responses": [f"a short {i}", f"a much longer answer {i}", "mid answer"]}
                  for i in range(5)]
    with RewardClient(label_server.address, timeout=60) as c:
        first = label_round(c, candidates, shorter_is_better, labeler="judge-x", judge_name="fake", k=4, batch=3,
                            progress=lambda m: None)
        again = label_round(c, candidates, shorter_is_better, labeler="judge-x", judge_name="fake", k=4, batch=3,
                            progress=lambda m: None)
        rows = list(c.export_preferences(kind="ai"))
    assert (first.accepted, first.duplicates) == (4, 0) and (again.accepted, again.duplicates) == (0, 4)
    assert len(rows) == 4
    for r in rows:
        assert r["judge"] == "fake" and r["labeler"] == "judge-x" and "judge P(a better)" in r["rationale"]
        assert len(r["chosen"]) < len(r["rejected"])  # the judge's choice was stored


def _submit_through_the_server(address: str, start: int, n: int) -> None:
    from rmserve.client import RewardClient

    with RewardClient(address, timeout=120, max_samples_per_request=16) as c:
        for i in range(start, start + n, 5):
            # every batch also resends the first ids of everyone's range: retries and overlap
            c.submit_preferences([item(j) for j in range(i, min(i + 5, start + n))] + [item(j) for j in (0, 1, 2)])


def test_many_submitters_through_the_server_lose_and_duplicate_nothing(label_server, tmp_path):
    address = label_server.address
    threads = [threading.Thread(target=_submit_through_the_server, args=(address, k * 30, 30)) for k in range(4)]
    procs = [mp.get_context("spawn").Process(target=_submit_through_the_server, args=(address, 500 + k * 30, 30))
             for k in range(2)]
    for t in threads + procs:
        t.start()
    for t in threads:
        t.join(300)
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    ids = [p.id for p in SqliteStore(tmp_path / "labels.sqlite3").query()]
    expected = {f"p{i}" for k in range(4) for i in range(k * 30, k * 30 + 30)}
    expected |= {f"p{i}" for k in range(2) for i in range(500 + k * 30, 500 + k * 30 + 30)}
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected


def test_an_unwritable_store_is_unavailable_and_scoring_goes_on(tiny_ensemble, server_factory):
    from rmserve.client import RewardClient, UnavailableError

    s = server_factory(tiny_ensemble, labels_db="/proc/rmserve-no-such-dir/labels.sqlite3")
    with RewardClient(s.address, timeout=60, max_retries=0) as c:
        with pytest.raises(UnavailableError, match="cannot be written"):
            c.submit_preferences([item(0)])
        assert len(c.score([{"prompt": "hi", "response": "hello"}])) == 1


def test_the_train_rpc_trains_on_the_servers_own_store(tiny_ensemble, server_factory, tmp_path):
    from rmserve.client import FailedPreconditionError, RewardClient

    s = server_factory(tiny_ensemble, labels_db=str(tmp_path / "labels.sqlite3"), registry=str(tmp_path / "reg"),
                       max_samples_per_request=64)
    rng = __import__("random").Random(1)
    items = []
    for i in range(48):
        words = " ".join(rng.choice(["red", "blue", "cat", "dog", "sun", "moon"]) for _ in range(5))
        items.append(item(i, prompt=f"prompt {i}", responses=[f"{words} thanks", f"{words} no"],
                          labeler_kind="human" if i % 3 else "ai"))
    with RewardClient(s.address, timeout=300, max_samples_per_request=64) as c:
        with pytest.raises(FailedPreconditionError, match="preference store is empty"):
            list(c.train("", options={"from_store": True}))
        c.submit_preferences(items)
        events = list(c.train("", num_heads=2, epochs=2,
                              options={"from_store": True, "store_filters": {"kind": "human"},
                                       "feature_cache": "", "calib_frac": 0.0}))
    done = next(e for e in events if e.event == "done")
    assert done.report["data"]["pairs"] == 32  # the human labels only
