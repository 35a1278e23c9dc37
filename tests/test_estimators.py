"""The streaming estimators as the live collector drives them: records from many
agents in any order, late and partial steps, and a hang seen through heartbeats."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from epwatch.collector.analyzer import log_flag_change
from epwatch.collector.estimators import EstimatorConfig, GroupEstimator
from epwatch.schema import Entered, RecordColumns
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import load_scenario

SCENARIO = {
    "seed": 11,
    "steps": 120,
    "cluster": {"ranks": 16, "ranks_per_node": 4},
    "model": {"layers": 8},
    "faults": [{"kind": "slow_gpu", "rank": 6, "start_step": 30, "factor": 1.25}],
}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def by_node(sim: Simulation, shuffle: bool, seed: int = 0):
    """Per-node batches of each chunk, as four agents would ship them."""
    rng = np.random.default_rng(seed)
    for chunk in sim.chunks():
        batches = []
        for node in range(4):
            ranks = np.arange(node * 4, node * 4 + 4)
            rec = sim.records(chunk, ranks)
            if shuffle:
                rec = rec.take(rng.permutation(len(rec)))
            batches.append((f"node-{node}", rec))
        if shuffle:
            batches = [batches[i] for i in rng.permutation(4)]
        yield chunk, batches


def run_live(shuffle: bool) -> GroupEstimator:
    sim = Simulation(load_scenario(SCENARIO))
    est = GroupEstimator("ep0", 16, EstimatorConfig(window_steps=200), clock=FakeClock())
    for chunk, batches in by_node(sim, shuffle):
        for node, rec in batches:
            est.ingest(rec, node)
        est.ingest_peer_rows(chunk.peer_rows)
        est.update()
    est.update(final=True)
    return est


def test_arrival_order_does_not_change_the_diagnosis() -> None:
    ordered, shuffled = run_live(False).report(), run_live(True).report()
    assert ordered.steps == shuffled.steps == 120
    assert ordered.gamma_median == pytest.approx(shuffled.gamma_median, rel=1e-12)
    assert [(s.rank, s.cause, s.first_step) for s in ordered.stragglers] == [
        (s.rank, s.cause, s.first_step) for s in shuffled.stragglers
    ]
    assert [(s.rank, s.node, s.cause) for s in shuffled.stragglers] == [(6, "node-1", "compute")]
    assert shuffled.nodes[6] == "node-1"


def test_flag_openings_are_handed_out_once_and_logged(caplog) -> None:
    est = run_live(False)
    changes = est.take_flag_changes()
    assert [(event, s.rank, s.cause) for event, s in changes] == [("opened", 6, "compute")]
    assert est.take_flag_changes() == []
    with caplog.at_level(logging.INFO, logger="epwatch.collector.analyzer"):
        log_flag_change("ep0", *changes[0])
    (line,) = caplog.messages
    assert line.startswith("EP group ep0: rank 6 on node-1 flagged as compute straggler, 1.2")
    assert line.endswith(f"step {changes[0][1].opened_step}")


def test_late_records_are_counted_not_applied() -> None:
    sim = Simulation(load_scenario({**SCENARIO, "steps": 40, "faults": []}))
    est = GroupEstimator("ep0", 16, clock=FakeClock())
    chunks = list(sim.chunks())
    for c in chunks:
        est.ingest(sim.records(c), "n")
    est.update(final=True)
    steps = est.report().steps
    est.ingest(sim.records(chunks[0]), "n")  # a resend of long-finalised steps
    est.update(final=True)
    assert est.report().steps == steps
    assert est.late_records == len(sim.records(chunks[0]))


def test_a_step_missing_a_rank_is_dropped_once_left_behind() -> None:
    sim = Simulation(load_scenario({**SCENARIO, "steps": 48, "faults": []}))
    est = GroupEstimator("ep0", 16, EstimatorConfig(max_slots=8), clock=FakeClock())
    for chunk in sim.chunks():
        rec = sim.records(chunk)
        lost = (rec.step == 5) & (rec.rank == 3) & (rec.layer == 2)
        est.ingest(rec.take(~lost), "n")
        est.update()
    est.update(final=True)
    assert est.incomplete_steps == 1
    assert est.report().steps == 47


def test_hang_is_reported_after_the_timeout_and_clears_on_progress() -> None:
    clock = FakeClock()
    sim = Simulation(load_scenario({**SCENARIO, "faults": []}))
    est = GroupEstimator("ep0", 16, EstimatorConfig(hang_after_s=5.0), clock=clock)
    chunk = next(sim.chunks())
    est.ingest(sim.records(chunk), "n")
    est.update()
    last = int(chunk.steps[-1])
    # Everyone but rank 9 entered the next step's first dispatch.
    step = np.full(16, last + 1)
    layer = np.zeros(16, dtype=np.int64)
    phase = np.zeros(16, dtype=np.int64)
    step[9], layer[9], phase[9] = last, 7, 1
    clock.t = 1.0
    est.ingest_entered(Entered(np.arange(16), step, layer, phase))
    clock.t = 4.0
    est.update()
    assert est.report().stragglers == ()  # not yet: under hang_after_s
    clock.t = 7.0
    est.update()
    (hang,) = est.report().stragglers
    assert (hang.rank, hang.cause, hang.first_step) == (9, "hang", last)
    assert hang.slowdown > 1  # seconds stalled over a step's time
    assert est.report().stalled_s == pytest.approx(6.0)
    # Rank 9 arrives; the group moves on.
    step[9], layer[9], phase[9] = last + 1, 0, 0
    est.ingest_entered(Entered(np.arange(16), step, layer, phase))
    est.update()
    assert est.report().stragglers == ()
    assert [s.cause for s in est.report(include_closed=True).stragglers] == ["hang"]
    assert [(e, s.rank, s.cause) for e, s in est.take_flag_changes()] == [
        ("opened", 9, "hang"), ("cleared", 9, "hang")
    ]


def test_a_group_that_simply_went_idle_is_not_a_hang() -> None:
    clock = FakeClock()
    sim = Simulation(load_scenario({**SCENARIO, "steps": 16, "faults": []}))
    est = GroupEstimator("ep0", 16, clock=clock)
    chunk = next(sim.chunks())
    est.ingest(sim.records(chunk), "n")
    est.ingest_entered(chunk.entered)
    clock.t = 60.0
    est.update()
    assert est.report().stragglers == ()


def test_evidence_callback_is_attached_and_bounded() -> None:
    est = run_live(False)
    calls = []

    def evidence(cause: str, node: str, device: int) -> list[str]:
        calls.append((cause, node, device))
        return [f"line {i}" for i in range(10)]

    (s,) = est.report(evidence=evidence).stragglers
    assert calls == [("compute", "node-1", 2)]
    assert len(s.evidence) == 4


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size"):
        GroupEstimator("ep0", 0)


def test_a_backlog_older_than_the_assembly_window_counts_as_late() -> None:
    """An agent catching up after a reconnect sends steps others finished long ago."""
    sim = Simulation(load_scenario({**SCENARIO, "steps": 96, "faults": []}))
    est = GroupEstimator("ep0", 16, EstimatorConfig(max_slots=8), clock=FakeClock())
    chunks = list(sim.chunks())
    newest = sim.records(chunks[-1], np.arange(8, 16))  # node-2/3 are up to date
    backlog = sim.records(chunks[0], np.arange(8))  # node-0/1 replay steps 0..15
    est.ingest(newest, "node-2")
    est.ingest(backlog, "node-0")
    assert est.late_records == len(backlog)
    est.update(final=True)


def test_a_fixed_cost_per_call_does_not_make_light_ranks_look_slow() -> None:
    """Grouped GEMMs cost a + b n: x / n alone would flag every lightly loaded rank."""
    from epwatch.collector.estimators.stats import expected_compute

    rng = np.random.default_rng(4)
    n = rng.integers(200, 4000, (8, 32)).astype(float)  # very uneven loads
    slow = np.ones(32)
    slow[11] = 1.1
    x = (300e-6 + 40e-9 * n) * slow * rng.lognormal(0, 0.01, n.shape)
    ratio = np.median(x / expected_compute(x, n), axis=0)
    ratio /= np.median(ratio)
    assert ratio[11] == pytest.approx(1.1, rel=0.02)
    others = np.delete(ratio, 11)
    assert np.abs(others - 1).max() < 0.02
    naive = np.median(x / n, axis=0)
    naive /= np.median(naive)
    assert np.abs(np.delete(naive, 11) - 1).max() > 0.5  # what x / n would have said


def run_steps(est: GroupEstimator, sim: Simulation, step_offset: int = 0) -> None:
    for chunk in sim.chunks():
        rec = sim.records(chunk)
        rec = RecordColumns(**{**rec.as_dict(), "step": rec.step - step_offset})
        hb = chunk.entered
        est.ingest(rec, "n")
        est.ingest_entered(Entered(hb.rank, hb.step - step_offset, hb.layer, hb.phase))
        est.update()


def test_an_engine_restart_starts_a_new_run_instead_of_dropping_everything() -> None:
    sim = Simulation(load_scenario({**SCENARIO, "steps": 96, "faults": []}))
    est = GroupEstimator("ep0", 16, clock=FakeClock())
    run_steps(est, sim, step_offset=-1000)  # steps 1000..1095
    assert est.report().steps > 80
    run_steps(est, sim)  # the engine restarted: steps 0..95 again
    report = est.report()
    assert report.restarts == 1
    assert report.last_step >= 80  # the new run is analysed
    assert report.steps > 160


def test_a_stray_layer_spoils_one_step_and_huge_layers_are_ignored() -> None:
    sim = Simulation(load_scenario({**SCENARIO, "steps": 48, "faults": []}))
    est = GroupEstimator("ep0", 16, EstimatorConfig(max_layers=64), clock=FakeClock())
    chunks = list(sim.chunks())
    for i, chunk in enumerate(chunks):
        rec = sim.records(chunk)
        if i == 0:
            stray = rec.take(slice(0, 2))
            layer = np.array([40, 4000], dtype="<i4")  # one odd layer, one beyond the bound
            est.ingest(RecordColumns(**{**stray.as_dict(), "layer": layer}), "n")
        est.ingest(rec, "n")
        est.update()
    est.update(final=True)
    assert est.incomplete_steps == 1  # the step with layer 40, and only it
    assert est.report().steps == 47
    assert est.ignored_records == 1
    assert est.buffer.layers == 41  # nothing was allocated for layer 4000


def test_step_arithmetic_on_a_hand_built_step() -> None:
    """Three ranks, one layer, numbers small enough to check by hand (ns)."""
    # Dispatch: ranks enter at 0, 10, 30 (their own clocks) and all leave at "100":
    # rank 2 arrived last (lag 30), t_xfer = 70. Expert compute x = 50, 50, 80 ns.
    # Combine: enter = exit(dispatch) + x; everyone leaves at 200.
    enter = np.array([[[0, 10, 30], [150, 150, 180]]], dtype=np.int64)
    exit_ = np.array([[[100, 100, 100], [200, 200, 200]]], dtype=np.int64)
    tokens = np.array([[[10, 10, 40], [0, 0, 0]]], dtype=np.int64)
    send = np.array([[[1000, 1000, 1000], [500, 500, 2000]]], dtype=np.int64)
    recv = np.array([[[500, 500, 2000], [1000, 1000, 1000]]], dtype=np.int64)
    arrays = {"enter_ns": enter, "exit_ns": exit_, "recv_tokens": tokens,
              "send_bytes": send, "recv_bytes": recv}  # fmt: skip
    from epwatch.collector.estimators.stats import durations, step_stats

    s = step_stats(7, arrays, durations(arrays))
    assert s.transfer_s[0, 0] == pytest.approx(70e-9)  # min_r d on dispatch
    assert s.transfer_s[0, 1] == pytest.approx(20e-9)  # combine: rank 2 entered at 180
    assert s.gamma[0] == pytest.approx(80 / 60)  # max x / mean x
    assert s.skew[0] == pytest.approx(40 / 20)  # max n / mean n
    assert s.lost_s == pytest.approx(20e-9)  # max x - mean x
    np.testing.assert_allclose(s.load_ratio, [0.5, 0.5, 2.0])
    # Lags max d - d: dispatch d = (100, 90, 70) -> (0, 10, 30), rank 2 arrived last;
    # combine d = (50, 50, 20) -> (0, 0, 30). Per-rank median over both phases:
    np.testing.assert_allclose(s.arrival_lag_s, [0.0, 5e-9, 30e-9], atol=1e-18)
    assert s.volume_bytes[0, 0] == 2000 and s.send_bytes[0, 0] == 1000
    # x = a + b n through (10, 50) and (40, 80): a = 40 ns, b = 1 ns/token, so every
    # rank's compute is what its load predicts: nobody is slow.
    np.testing.assert_allclose(s.compute_ratio, [1.0, 1.0, 1.0])


def test_a_restart_without_heartbeats_is_noticed_from_the_records() -> None:
    clock = FakeClock()
    sim = Simulation(load_scenario({**SCENARIO, "steps": 64, "faults": []}))
    est = GroupEstimator("ep0", 16, EstimatorConfig(hang_after_s=5.0), clock=clock)
    for chunk in sim.chunks():
        rec = sim.records(chunk)
        est.ingest(RecordColumns(**{**rec.as_dict(), "step": rec.step + 500}), "n")
        est.update()
    clock.t = 10.0  # the engine took a while to come back, counting from 0
    for chunk in sim.chunks():
        est.ingest(sim.records(chunk), "n")
        est.update()
    assert est.restarts == 1
    assert est.report().last_step >= 40


@pytest.mark.parametrize(
    ("workload", "network", "why"),
    [
        ({"batch_jitter": 0.0}, {}, "message sizes too uniform to separate L from BW"),
        ({"batch_jitter": 0.3}, {"noise_cv": 0.9}, "fit too poor to trust: R^2 0."),
    ],
)
def test_an_untrustworthy_fit_publishes_no_latency_or_bandwidth(workload, network, why) -> None:
    """Equal message sizes (the issue's R^2 = 0.0005 case) or times that hardly follow
    the sizes: no L, BW_eff, crossover or regime, in the report and on /metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    from epwatch.collector.estimators.text import format_report
    from epwatch.collector.groups import Group
    from epwatch.collector.metrics import GroupMetrics
    from tests.helpers import samples

    scenario = load_scenario({
        "seed": 4, "steps": 60, "cluster": {"ranks": 16, "ranks_per_node": 8},
        "model": {"layers": 4}, "workload": workload, "network": network,
    })  # fmt: skip
    sim = Simulation(scenario)
    est = GroupEstimator("ep0", 16)
    for chunk in sim.chunks():
        est.ingest(sim.records(chunk), "n")
    est.update(final=True)
    report = est.report()
    for phase in ("dispatch", "combine"):
        fit = report.phases[phase]
        assert fit.regime == "unknown" and fit.fit_problem.startswith(why), fit
        assert np.isnan(fit.latency_s) and np.isnan(fit.bandwidth_Bps)
        assert fit.n > 100 and np.isfinite(fit.transfer_s)
    assert report.whatif == {}
    assert f"unknown ({why}" in format_report(report)
    group = Group("ep0", 16, est)
    group.report = report
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GroupMetrics(lambda: [group], lambda g: 0.0))
    text = generate_latest(registry).decode()
    gated = (
        "epwatch_collective_latency_seconds",
        "epwatch_collective_bandwidth_bytes_per_second",
        "epwatch_collective_crossover_bytes",
        "epwatch_collective_latency_bound",
    )
    for name in gated:
        assert not samples(text, name), name
    assert samples(text, "epwatch_collective_transfer_seconds")  # the rest stays
