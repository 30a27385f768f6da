"""The shipped monitoring assets agree with the metrics the server exports.

docs/monitoring/ holds a Grafana dashboard, Prometheus alert rules and promtool
unit tests for them. A metric renamed in service/server/metrics.py would silently
empty a panel or disarm an alert; these tests catch that, and run promtool on
the rules when it is installed (Debian package `prometheus`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rmserve.service.server.metrics import Metrics

MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
METRIC = re.compile(r"rmserve_[a-z_]+")


def exported_names() -> set[str]:
    """Every sample name a fresh server's registry can expose.

    A labelled metric exposes nothing until it has a child, so give each one a
    child first; then the collected samples carry the exact suffixes
    prometheus_client writes (_total, _bucket, _count, and _sum only where the
    histogram has no negative bucket; no _created: the server disables those)."""
    m = Metrics()
    for metric in vars(m).values():
        labelnames = getattr(metric, "_labelnames", ())
        if labelnames:
            metric.labels(*["x"] * len(labelnames))
    return {s.name for family in m.registry.collect() for s in family.samples}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", []) if "expr" in t]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        exprs.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    return exprs


def alert_exprs() -> list[str]:
    yaml = pytest.importorskip("yaml")
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return [r["expr"] for r in rules] + [v for r in rules for v in r.get("annotations", {}).values()]


def alert_test_series() -> list[str]:
    yaml = pytest.importorskip("yaml")
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return [s["series"] for t in tests for s in t["input_series"]]


def promql_test_exprs() -> list[str]:
    """The expressions alerts_test.yml checks with promtool's promql_expr_test."""
    yaml = pytest.importorskip("yaml")
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return [e["expr"] for t in tests for e in t.get("promql_expr_test", [])]


def unknown(texts: list[str]) -> set[str]:
    names = exported_names()
    return {n for text in texts for n in METRIC.findall(text)} - names


def test_registry_exports_what_the_docs_assume():
    names = exported_names()
    assert {"rmserve_requests_total", "rmserve_request_latency_seconds_bucket", "rmserve_ready",
            "rmserve_model_info", "rmserve_dropped_samples_total", "rmserve_requests_in_flight",
            "rmserve_queue_capacity", "rmserve_reward_observed_sum",
            "rmserve_reward_observed_count"} <= names
    assert not {n for n in names if n.endswith("_created")}, "the README says _created is off"
    # rmserve_reward has negative buckets, so prometheus_client writes no _sum for it;
    # the mean comes from the rmserve_reward_observed summary instead.
    assert "rmserve_reward_count" in names and "rmserve_reward_sum" not in names


def test_reward_summary_gives_the_mean():
    m = Metrics()
    rewards = [-2.5, -0.75, 0.25, 1.0, 7.5]  # 7.5: beyond the histogram's top bucket
    m.scored(rewards, [0.1] * len(rewards), truncated=0)
    value = m.registry.get_sample_value
    count = value("rmserve_reward_observed_count")
    total = value("rmserve_reward_observed_sum")
    assert count == len(rewards) == value("rmserve_reward_count")
    assert total / count == pytest.approx(sum(rewards) / len(rewards))
    # The _sum falls with every negative reward, so it is no counter: rate()/increase()
    # would take each fall for a reset. The dashboard must use delta() (next test).
    m.scored([-1.0], [0.1], truncated=0)
    assert value("rmserve_reward_observed_sum") < total


def test_mean_reward_query_is_delta_based_and_promtool_tested():
    """The dashboard divides delta(_sum) by delta(_count), and alerts_test.yml checks
    exactly that query (with $job, $instance and $__rate_interval filled in) on
    negative rewards and a restart."""
    exprs = [e for e in dashboard_exprs() + alert_exprs() if "rmserve_reward_observed_sum" in e]
    assert len(exprs) >= 2  # the mean in "Reward quantiles" and "Mean reward by instance"
    counter_fn = re.compile(r"\b(?:i?rate|increase)\(\s*rmserve_reward_observed_sum")
    assert [e for e in exprs if counter_fn.search(e)] == []
    tested = set(promql_test_exprs())
    for e in dashboard_exprs():
        if "rmserve_reward_observed_sum" not in e:
            continue
        concrete = e.replace('{job=~"$job", instance=~"$instance"}', '{job=~"rmserve", instance=~".+"}')
        assert concrete.replace("$__rate_interval", "5m") in tested, e


def test_queue_alert_follows_max_queue():
    """QueueSaturated compares the depth with the exported capacity, not a number
    that is only right for the default --max-queue."""
    depth_rules = [e for e in alert_exprs() if "rmserve_queue_depth" in e]
    assert depth_rules and all("rmserve_queue_capacity" in e for e in depth_rules)
    assert "6554" not in ALERTS.read_text()


def test_dashboard_uses_only_exported_metrics():
    exprs = dashboard_exprs()
    assert any(METRIC.search(e) for e in exprs)
    assert unknown(exprs) == set()


def test_alerts_use_only_exported_metrics():
    texts = alert_exprs()
    assert any(METRIC.search(t) for t in texts)
    assert unknown(texts) == set()


def test_alert_unit_tests_feed_exported_metrics():
    assert unknown(alert_test_series()) == set()
    assert unknown(promql_test_exprs()) == set()


def test_dashboard_is_importable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39
    assert dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        assert p.get("title"), f"panel {p['id']} has no title"
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert all(t.get("expr") for t in p["targets"]), f"panel {p['title']!r} has an empty query"
        assert p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r} hard-codes its datasource"
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, f"panel {p['title']!r} gridPos"


def test_dashboard_covers_every_metric():
    """Each metric family shows up somewhere on the dashboard."""
    used = {n for e in dashboard_exprs() for n in METRIC.findall(e)}
    families = {f.name for f in Metrics().registry.collect()}
    missing = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert missing == set()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH: install the Debian package `prometheus` "
                    "(or extract usr/bin/promtool from it) to check the alert rules")
    return path


@pytest.mark.parametrize("args", [["check", "rules", ALERTS.name], ["test", "rules", ALERTS_TEST.name]],
                         ids=["check", "test"])
def test_promtool(args):
    proc = subprocess.run([promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
