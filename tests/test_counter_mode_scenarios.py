"""Counter mode end to end on the simulator: only what a counter probe on every rank
would send (cumulative waits per source rank, tokens per local expert, read every
few steps on each rank's own clock), through the collector's estimators, at P = 16,
64 and 256 with heavy-tailed, shared and drifting noise. Each fault must be found
with the right rank and cause as exactly one episode; clean runs flag nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from epwatch.cli.simulate import run_scenario
from epwatch.collector.estimators import GroupReport
from epwatch.simulator.counters import CounterStream
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import ScenarioError, load_scenario

EXPERTS, ONSET = 256, 60
NOISE: dict[str, dict[str, Any]] = {
    "compute": {"noise_cv": 0.10, "shared_cv": 0.10, "drift_cv": 0.005,
                "spike_prob": 0.003, "rank_spike_prob": 0.002},
    "attention": {"noise_cv": 0.10},
    "network": {"noise_cv": 0.05, "link_noise_cv": 0.03, "spike_prob": 0.002},
}  # fmt: skip


def counters_run(p: int, fault: dict | None, steps: int = 260, seed: int = 5) -> GroupReport:
    data: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "cluster": {"ranks": p, "ranks_per_node": 8},
        # Fewer layers at P = 256 keep the P x P wait matrices of every collective cheap.
        "model": {"layers": 4 if p >= 256 else 8, "experts": EXPERTS},
        "workload": {"batch_tokens": 64 * p, "rank_batch_jitter": 0.10},
        "network": {"latency_us": 60, "bandwidth_gbps": 25, **NOISE["network"]},
        "compute": NOISE["compute"],
        "attention": NOISE["attention"],
        "probe": {"mode": "counters"},
        "faults": [] if fault is None else [{"start_step": ONSET, **fault}],
    }
    report, _ = run_scenario(load_scenario(data))
    return report


def episodes(report: GroupReport) -> list[tuple[int, str]]:
    return [(s.rank, s.cause) for s in report.stragglers]


@pytest.mark.parametrize("p", [16, 64, 256])
def test_each_fault_is_one_episode_of_the_right_rank_and_cause(p: int) -> None:
    hot = EXPERTS // p * (p - 1) - 1  # the last expert of rank P - 2
    cases = [
        ({"kind": "slow_nic", "rank": p // 2 + 1, "factor": 1.3}, (p // 2 + 1, "network")),
        ({"kind": "hot_expert", "expert": hot, "share": 0.3 / (p - 1)}, (p - 2, "routing")),
        ({"kind": "slow_gpu", "rank": p // 3, "factor": 1.2}, (p // 3, "compute")),
        ({"kind": "batch_imbalance", "rank": 1, "factor": 1.3}, (1, "batch")),
    ]
    for fault, want in cases:
        report = counters_run(p, fault)
        assert report.mode == "counters"
        assert episodes(report) == [want], (fault, report.stragglers)
        (flag,) = report.stragglers
        assert flag.active and flag.source == "counters"
        assert ONSET <= flag.first_step <= ONSET + 100, flag
        if want[1] == "routing":
            assert flag.evidence[0].startswith(f"hot expert {hot}:"), flag.evidence


@pytest.mark.parametrize("p", [16, 64, 256])
def test_a_hang_is_pinned_on_the_rank_that_stopped(p: int) -> None:
    # layer 0: it never started the step (its step counter stays behind);
    # layer 2: its GPU stuck inside the step (its probe goes silent).
    for layer, why in ((0, "its step counter stayed at"), (2, "")):
        fault = {"kind": "hang", "rank": p // 4, "layer": layer, "start_step": 200}
        report = counters_run(p, fault, steps=260)
        hangs = [s for s in report.stragglers if s.cause == "hang"]
        assert [(s.rank, s.cause) for s in report.stragglers] == [(p // 4, "hang")], report
        assert hangs[0].evidence and hangs[0].evidence[0].startswith(why)
        assert report.stalled_s >= 5.0


@pytest.mark.parametrize("p", [16, 64, 256])
def test_a_clean_run_of_1000_steps_flags_nothing(p: int) -> None:
    report = counters_run(p, None, steps=1000, seed=p)
    assert report.stragglers == () and report.suspect_links == (), report
    assert report.intervals >= p * 150  # every rank read about every five steps


def test_a_slow_link_is_a_suspect_link_not_a_rank() -> None:
    report = counters_run(16, {"kind": "slow_link", "rank": 2, "peer": 11, "factor": 1.3})
    assert report.stragglers == ()
    assert {(link.src, link.dst) for link in report.suspect_links} <= {(2, 11), (11, 2)}
    assert report.suspect_links and report.suspect_links[0].slowdown > 1.2


def test_counter_mode_sends_what_a_probe_would_and_no_records() -> None:
    sc = load_scenario(
        {"steps": 40, "cluster": {"ranks": 8}, "model": {"layers": 4, "experts": 64},
         "probe": {"mode": "counters", "counter_interval_steps": 4}}
    )  # fmt: skip
    sim = Simulation(sc)
    stream = CounterStream(sim)
    reads = [rows for chunk in sim.chunks() for _, rows in stream.intervals(chunk)]
    assert len(reads) == 40 // 4 - 1  # the first read is every rank's baseline
    rows = reads[-1]
    assert rows.expert_tokens.shape == (8, 64 // 8)
    assert (rows.step == 40).all()
    # Waits are seconds per source rank (itself included, as DeepEP counts it) over
    # each rank's own clock.
    assert (rows.dispatch_wait_s > 0).all() and (rows.combine_wait_s > 0).all()
    spans = (rows.end_ns - rows.start_ns) * 1e-9
    assert (spans > 0).all() and np.ptp(rows.start_ns) > 1e9  # clocks are not shared


def test_bad_probe_settings_are_clear_errors() -> None:
    with pytest.raises(ScenarioError, match="mode must be one of"):
        load_scenario({"probe": {"mode": "graphs"}})
    with pytest.raises(ScenarioError, match="counter_interval_steps must be >= 1"):
        load_scenario({"probe": {"counter_interval_steps": 0}})
