"""The run monitor and its over-optimisation detector, on synthetic streams with known
change points, and through the real server and the TRL adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rmserve.service.server.monitor import MonitorConfig, RunMonitor

N = 64  # samples per step


def feed(mon: RunMonitor, run: str, steps: range, reward_at, std_at, seed: int = 0, concentrate_from: int | None = None):
    """Feeds `steps` of N samples: reward ~ N(reward_at(s), 0.5), std ~ std_at(s) * U[0.8, 1.2].
    With `concentrate_from`, from that step on the std of a sample grows with its reward
    (the top rewards sit where the members disagree) while the step's mean std stays put."""
    rng = np.random.default_rng(seed)
    for s in steps:
        r = rng.normal(reward_at(s), 0.5, N)
        sd = std_at(s) * rng.uniform(0.8, 1.2, N)
        if concentrate_from is not None and s >= concentrate_from:
            rank = np.argsort(np.argsort(r)) / (N - 1)            # 0 (lowest reward) .. 1 (highest)
            sd = sd * np.exp(3.0 * (rank - 0.5))
            sd *= std_at(s) / sd.mean()                           # same mean std as before
        mon.observe(run, s, r.tolist(), sd.tolist())
    return mon


def rising(s: int) -> float:
    return 0.05 * s


def flat(_: int) -> float:
    return 0.3


def test_a_healthy_run_rising_with_flat_uncertainty_raises_no_alarm():
    mon = feed(RunMonitor(), "healthy", range(60), rising, flat)
    run, series = mon.status("healthy")
    assert not run.alarm and run.reason == ""
    assert len(series) == 60 and [s.count for s in series] == [N] * 60
    assert series[-1].reward_mean > series[0].reward_mean + 2  # the reward really did rise


def test_growing_uncertainty_while_the_reward_rises_fires_after_the_change_point_not_before():
    change = 25

    def std_at(s: int) -> float:
        return 0.3 if s < change else 0.3 * (1 + 0.08 * (s - change))

    mon = RunMonitor()
    for s in range(60):
        feed(mon, "hacked", range(s, s + 1), rising, std_at, seed=s)
        run, _ = mon.status("hacked")
        if s <= change:
            assert not run.alarm, f"fired at step {s}, before the change point"
    run, _ = mon.status("hacked")
    assert run.alarm and change < run.alarm_step < change + 15, run.alarm_step
    assert "ensemble std grew" in run.reason


class _Scaled:
    """Feeds a monitor every reward and std multiplied by `c`: a proxy on another reward scale."""

    def __init__(self, mon: RunMonitor, c: float):
        self.mon, self.c = mon, c

    def observe(self, run: str, step: int, rewards: list[float], stds: list[float]) -> None:
        self.mon.observe(run, step, [self.c * r for r in rewards], [self.c * x for x in stds])


def test_the_spread_gate_fires_at_the_same_step_whatever_the_reward_scale():
    """min_rise_spread measures the rise in the run's own within-step spread, so a stream on
    another scale (powers of two: every statistic scales exactly) alarms at the same step;
    the absolute gate does not."""
    change = 25

    def std_at(s: int) -> float:
        return 0.3 if s < change else 0.3 * (1 + 0.08 * (s - change))

    def alarm(cfg: MonitorConfig, c: float) -> int | None:
        mon = RunMonitor(cfg)
        for s in range(60):
            feed(_Scaled(mon, c), "hacked", range(s, s + 1), rising, std_at, seed=s)
        run, _ = mon.status("hacked")
        return run.alarm_step if run.alarm else None

    with pytest.raises(ValueError, match="min_rise_spread must be >= 0"):
        MonitorConfig(min_rise_spread=-1)
    spread = MonitorConfig(min_reward_rise=0.0, min_rise_spread=0.5)
    steps = {c: alarm(spread, c) for c in (0.125, 1.0, 8.0)}
    assert steps[1.0] is not None and change < steps[1.0] < change + 15, steps
    assert steps[0.125] == steps[1.0] == steps[8.0]
    # a baseline without spread (every sample of a step the same) cannot scale the rise: no alarm
    flat_mon = RunMonitor(spread)
    for s in range(40):
        flat_mon.observe("one", s, [0.001 * s] * 4, [0.3 * (1 + 0.1 * s)] * 4)
    assert not flat_mon.status("one")[0].alarm
    absolute = {c: alarm(MonitorConfig(), c) for c in (0.125, 1.0)}
    assert absolute[1.0] is not None and absolute[0.125] != absolute[1.0], absolute  # a compressed proxy alarms late


def test_uncertainty_growing_under_a_flat_reward_is_not_overoptimisation():
    mon = feed(RunMonitor(), "flat", range(60), lambda s: 0.0, lambda s: 0.3 * (1 + 0.05 * s))
    assert not mon.status("flat")[0].alarm


def test_top_rewards_concentrating_where_members_disagree_fires():
    mon = feed(RunMonitor(), "conc", range(60), rising, flat, concentrate_from=30)
    run, series = mon.status("conc")
    assert run.alarm and run.alarm_step >= 30, (run.alarm_step, run.reason)
    assert "highest rewards sit where the members disagree" in run.reason
    assert series[40].top_decile_std > 1.5 * series[40].std_mean and series[40].reward_std_corr > 0.5
    # the same stream without the concentration stays quiet (the healthy test's stream)


def test_step_statistics_are_exact_and_the_reservoir_is_bounded():
    mon = RunMonitor(MonitorConfig(reservoir=50))
    rng = np.random.default_rng(1)
    r, sd = rng.normal(size=1000), rng.uniform(0.1, 0.5, 1000)
    for chunk in range(10):  # ten calls of one step
        mon.observe("big", 7, r[chunk * 100:(chunk + 1) * 100].tolist(), sd[chunk * 100:(chunk + 1) * 100].tolist())
    run, (step,) = mon.status("big")
    assert len(run.open.samples) == 50
    assert step.count == 1000 and step.first_step == step.last_step == 7
    assert step.reward_mean == pytest.approx(r.mean(), abs=1e-12) and step.std_mean == pytest.approx(sd.mean(), abs=1e-12)
    assert step.epistemic_mean is None and step.ood_fraction is None  # not served: absent, not invented


def test_late_samples_and_untagged_steps_are_counted_exactly():
    mon = RunMonitor()
    mon.observe("r", 1, [1.0] * 4, [0.1] * 4)
    mon.observe("r", 2, [2.0] * 4, [0.1] * 4)
    mon.observe("r", 1, [3.0] * 4, [0.1] * 4)       # a late batch of step 1
    mon.observe("r", None, [2.0] * 2, [0.1] * 2)    # no step: the current one (2)
    _, series = mon.status("r")
    assert [(s.last_step, s.count) for s in series] == [(1, 8), (2, 6)]
    assert series[0].reward_mean == pytest.approx(2.0)


def test_more_runs_than_the_cap_evicts_the_least_recently_seen_and_long_runs_merge_old_steps():
    mon = RunMonitor(MonitorConfig(max_runs=3, max_steps=10, baseline_steps=2, window=2))
    for name in ("a", "b", "c"):
        mon.observe(name, 0, [0.0], [0.1])
    mon.observe("a", 1, [0.0], [0.1])               # a is now the most recent
    mon.observe("d", 0, [0.0], [0.1])               # evicts b, the least recently seen
    assert [r.run_id for r, _ in mon.runs()] == ["d", "a", "c"] and mon.evicted == 1
    assert mon.status("b") is None
    feed(mon, "long", range(100), rising, flat)
    run, series = mon.status("long")
    assert len(run.steps) <= 10 and sum(s.count for s in series) == 100 * N
    assert series[0].first_step == 0 and series[0].last_step > 0      # old steps merged into a window
    assert [s.last_step for s in series[-5:]] == [95, 96, 97, 98, 99]  # recent steps exact


def test_a_restart_keeps_the_summaries_the_baseline_and_the_alarm(tmp_path):
    path = tmp_path / "runs.json"
    mon = RunMonitor(path=path)
    feed(mon, "hacked", range(50), rising, lambda s: 0.3 if s < 20 else 0.3 * (1 + 0.1 * (s - 20)))
    feed(mon, "healthy", range(10), rising, flat)
    assert mon.save() and not mon.save()  # nothing new: nothing written
    again = RunMonitor(path=path)
    for name in ("hacked", "healthy"):
        (a, sa), (b, sb) = mon.status(name), again.status(name)
        assert (a.alarm, a.alarm_step, a.reason) == (b.alarm, b.alarm_step, b.reason)
        assert [s.count for s in sa] == [s.count for s in sb] and sb[-1].reward_mean == pytest.approx(sa[-1].reward_mean)
        assert a.baseline == b.baseline
    assert again.status("hacked")[0].alarm
    # a damaged file is set aside, not fatal
    path.write_text("{not json")
    assert RunMonitor(path=path).runs() == [] and list(tmp_path.glob("runs.unreadable-*.json"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_steps must hold"):
        MonitorConfig(max_steps=3)
    with pytest.raises(ValueError, match="max_runs must be >= 1"):
        MonitorConfig(max_runs=0)


# Hair-trigger settings: the baseline is steps 0-1, and the first step closed after it
# (step 2, closed by step 3's first call) fires whatever the model scores.
TRIGGER = {"baseline_steps": 2, "window": 1, "patience": 1, "std_ratio": 0.0, "min_reward_rise": -1e9}
PROMPTS = ["How do I bake bread?", "hello there", "Can you help me?"]
RESPONSES = ["Mix flour.", "hi!", "Sure, here is how.", "No.", "I cannot help with that."]


def test_the_real_server_reports_the_alarm_through_the_client(tiny_ensemble, server_factory, tmp_path):
    """Score calls tagged with run_id/step feed the monitor; run_status reads it back; the
    per-step series equals the rewards the calls returned; the summaries reach the disk."""
    from rmserve.client import NotFoundError, RewardClient

    server = server_factory(tiny_ensemble, runs_file=str(tmp_path / "runs.json"), monitor=TRIGGER)
    returned: dict[int, list[float]] = {}
    with RewardClient(server.address, timeout=60) as c:
        with pytest.raises(NotFoundError, match="no run 'ppo-1'"):
            c.run_status("ppo-1")
        for step in range(4):
            batch = [{"prompt": p, "response": r} for p in PROMPTS for r in RESPONSES[: 2 + step]]
            res = c.score(batch, run_id="ppo-1", step=step)
            returned[step] = [x.reward for x in res]
            if step == 2:
                assert not c.run_status("ppo-1").alarm  # step 2 is still open
        c.score_groups(PROMPTS[0], RESPONSES, run_id="grpo-1", step=0)
        status = c.run_status("ppo-1")
        runs = {r.run_id: r for r in c.list_runs()}
    assert status.run_id == "ppo-1" and status.steps == 4
    assert [s.count for s in status.series] == [len(v) for v in returned.values()]
    assert status.reward_mean == pytest.approx([float(np.mean(v)) for v in returned.values()], abs=1e-6)
    assert len(status.std_mean) == 4 and all(x > 0 for x in status.std_mean)
    assert status.alarm and status.alarm_step == 2 and "ensemble std grew" in status.reason
    assert set(runs) == {"ppo-1", "grpo-1"} and runs["grpo-1"].steps == 1 and not runs["grpo-1"].alarm
    assert runs["ppo-1"].series == ()  # list_runs carries no series
    server.stop()
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert {r["run_id"] for r in saved["runs"]} == {"ppo-1", "grpo-1"}


def test_the_trl_adapter_logs_the_alarm_and_switches_to_the_conservative_reward(tiny_ensemble, server_factory):
    from rmserve.client import RewardClient, as_trl_reward_func

    server = server_factory(tiny_ensemble, runs_file="", monitor=TRIGGER)
    f = as_trl_reward_func(server.address, run_id="grpo-7", on_alarm="conservative", uncertainty_penalty=2.0)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    completions = RESPONSES[:3] * 2

    class State:
        global_step = 0

    alarms, out = [], []
    for step in range(4):
        State.global_step = step
        metrics: dict[str, float] = {}
        out.append(f(prompts, completions, trainer_state=State(), log_metric=metrics.__setitem__))
        alarms.append(metrics["rmserve/alarm"])
    f.close()
    assert alarms == [0.0, 0.0, 0.0, 1.0] and "rmserve/std_trend" in metrics
    with RewardClient(server.address, timeout=60) as c:
        direct = c.score([{"prompt": p, "response": r} for p, r in zip(prompts, completions, strict=True)],
                         uncertainty_penalty=2.0)
    assert out[2] == pytest.approx([r.reward for r in direct], abs=1e-5)        # before: the mean
    assert out[3] == pytest.approx([r.conservative for r in direct], abs=1e-5)  # after: conservative
    assert any(abs(r.reward - r.conservative) > 1e-4 for r in direct)           # and they differ
