"""The simulator: scenario validation, determinism, and records that look like a real
probe's (so the estimators cannot tell them apart)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epwatch.schema import RecordColumns
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import ScenarioError, load_scenario

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "seed": 5,
    "steps": 40,
    "cluster": {"ranks": 8, "ranks_per_node": 4},
    "model": {"layers": 4, "experts": 32},
}


def all_records(sim: Simulation) -> RecordColumns:
    return RecordColumns.concat([sim.records(c) for c in sim.chunks()])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cluster": {"rank": 8}}, "[cluster] unknown key 'rank'"),
        ({"stepz": 3}, "unknown key 'stepz'"),
        ({"cluster": {"ranks": 1}}, "[cluster] ranks must be >= 2"),
        ({"model": {"experts": 100}, "cluster": {"ranks": 16}}, "multiple of [cluster] ranks"),
        ({"workload": {"routing": "pareto"}}, "[workload] routing must be one of"),
        ({"workload": {"batch_jitter": 1.5}}, "batch_jitter must be in [0, 1)"),
        ({"network": {"bandwidth_gbps": 0}}, "[network] bandwidth_gbps must be > 0"),
        ({"compute": {"ns_per_token": "fast"}}, "[compute] ns_per_token must be a number"),
        ({"faults": [{"kind": "slow_cpu"}]}, "kind must be one of"),
        ({"faults": [{"kind": "slow_gpu", "rank": 99}]}, "rank must be in [0, 16)"),
        ({"faults": [{"kind": "slow_gpu", "rank": 1, "factor": 0.5}]}, "factor must be >= 1"),
        (
            {"faults": [{"kind": "hot_expert", "expert": 3, "share": 1.5}]},
            "share must be in (0, 1)",
        ),
        ({"faults": [{"kind": "slow_gpu", "rank": 1, "speed": 2}]}, "unknown key 'speed'"),
        ({"steps": 10, "faults": [{"kind": "hang", "rank": 1, "start_step": 10}]}, "start_step"),
        ({"workload": {"zipf_s": -1.0}}, "zipf_s must be >= 0"),
        ({"compute": {"spike_prob": 1.5}}, "[compute] spike_prob must be in [0, 1)"),
        ({"compute": {"spike_min": 3.0, "spike_max": 2.0}}, "spike_min <= spike_max"),
        ({"attention": {"ns_per_token": -1.0}}, "[attention] ns_per_token must be >= 0"),
        (
            {"faults": [{"kind": "batch_imbalance", "rank": 1, "factor": 0.5}]},
            "factor must be >= 1",
        ),
    ],
)
def test_bad_scenarios_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        load_scenario({"cluster": {"ranks": 16}, **data} if "cluster" not in data else data)
    assert message in str(err.value)


def test_zipf_s_0_is_uniform_popularity() -> None:
    s = load_scenario({**SMALL, "workload": {"routing": "zipf", "zipf_s": 0.0}})
    rec = all_records(Simulation(s))
    load = rec.recv_tokens[rec.phase == 0].reshape(-1, 8)
    assert load.sum(0).max() / load.sum(0).mean() < 1.05


def test_a_batch_imbalance_gives_one_rank_more_tokens_and_a_longer_attention() -> None:
    fault = {"kind": "batch_imbalance", "rank": 2, "factor": 1.5, "start_step": 20}
    s = load_scenario({**SMALL, "workload": {"rank_batch_jitter": 0.0}, "faults": [fault]})
    sim = Simulation(s)
    sent, gap = [], []
    for chunk in sim.chunks():
        sent.append(chunk.send_bytes[:, :, 0, :])  # [S, L, P] dispatch
        gap.append(chunk.enter_s[:, 1:, 0, :] - chunk.exit_s[:, :-1, 1, :])
    sent, gap = np.concatenate(sent), np.concatenate(gap)
    assert np.allclose(sent[:20, :, 2], sent[:20, :, 0])
    assert np.allclose(sent[20:, :, 2] / sent[20:, :, 0], 1.5, rtol=0.05)
    assert np.median(gap[20:, :, 2]) > 1.2 * np.median(gap[20:, :, 0])


def test_scenario_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nranks = = 3\n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")


def test_same_seed_same_records_other_seed_other_records() -> None:
    a = all_records(Simulation(load_scenario(SMALL)))
    b = all_records(Simulation(load_scenario(SMALL)))
    c = all_records(Simulation(load_scenario({**SMALL, "seed": 6})))
    for name, col in a.as_dict().items():
        np.testing.assert_array_equal(col, getattr(b, name), err_msg=name)
    assert not np.array_equal(a.exit_ns, c.exit_ns)


def test_records_follow_the_schema_and_cover_every_collective() -> None:
    s = load_scenario(SMALL)
    rec = all_records(Simulation(s))
    rec.validate(world_size=8)
    assert len(rec) == 40 * 4 * 2 * 8
    keys = set(
        zip(
            rec.step.tolist(),
            rec.layer.tolist(),
            rec.phase.tolist(),
            rec.rank.tolist(),
            strict=True,
        )
    )
    assert len(keys) == len(rec)
    dispatch = rec.phase == 0
    assert (rec.recv_tokens[~dispatch] == 0).all()
    # Every dispatch routes the k slots of every token of every rank's own batch.
    call = (rec.step * 4 + rec.layer)[dispatch]
    routed = np.bincount(call, weights=rec.recv_tokens[dispatch])
    sent_slots = np.bincount(call, weights=rec.send_bytes[dispatch]) / s.model.hidden
    assert np.allclose(routed, sent_slots)
    assert np.allclose(routed / 8, np.round(routed / 8))


def test_each_rank_has_its_own_clock_yet_all_leave_together() -> None:
    sim = Simulation(load_scenario(SMALL))
    chunk = next(sim.chunks())
    rec = sim.records(chunk)
    first = (rec.step == 0) & (rec.layer == 0) & (rec.phase == 0)
    local_exit = rec.exit_ns[first]
    # On the ranks' own clocks exits differ by the clock offsets (seconds to hours)...
    assert np.ptp(local_exit) > 1e9
    # ... while in true time every rank leaves the all-to-all at the same instant.
    assert np.ptp(chunk.exit_s[0, 0, 0]) == 0
    # The last arriver has the shortest duration.
    d = chunk.exit_s[0, 0, 1] - chunk.enter_s[0, 0, 1]
    assert np.argmin(d) == np.argmax(chunk.enter_s[0, 0, 1])


def test_peer_waits_are_sampled_every_n_steps_on_one_layer() -> None:
    sim = Simulation(load_scenario({**SMALL, "probe": {"peer_sample_every": 10}}))
    rows = [c.peer_rows for c in sim.chunks()]
    steps = sorted({int(s) for r in rows for s in r.step})
    assert steps == [0, 10, 20, 30]
    r = rows[0]
    assert r.wait_s.shape == (len(r), 8) and r.send_bytes.shape == (len(r), 8)
    assert (r.wait_s >= 0).all()
    r.validate(world_size=8)


def test_hang_stops_the_records_and_pins_the_heartbeat() -> None:
    data = {**SMALL, "faults": [{"kind": "hang", "rank": 3, "start_step": 20, "layer": 2}]}
    sim = Simulation(load_scenario(data))
    chunks = list(sim.chunks())
    rec = RecordColumns.concat([sim.records(c) for c in chunks])
    assert rec.step.max() == 20
    last = rec.step == 20
    assert set(rec.layer[last].tolist()) == {0, 1}
    hb = chunks[-1].entered
    assert hb.layer[3] == 1 and hb.phase[3] == 1  # rank 3 finished layer 1's combine
    others = np.arange(8) != 3
    assert (hb.layer[others] == 2).all() and (hb.phase[others] == 0).all()


def simulate_cli(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "simulate", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_simulate_cli_json_and_text(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        "seed = 2\nsteps = 150\n[cluster]\nranks = 16\n[model]\nlayers = 12\n"
        '[[faults]]\nkind = "slow_gpu"\nrank = 9\nstart_step = 40\nfactor = 1.2\n'
    )
    out = simulate_cli(scenario, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    g = doc["groups"][0]
    assert {
        "ep_group",
        "ranks",
        "steps",
        "gamma",
        "skew",
        "balancedness",
        "dispatch",
        "combine",
        "stragglers",
    } <= set(g)
    assert set(g["dispatch"]) >= {"latency_s", "bandwidth_Bps", "r2", "regime"}
    assert [(s["rank"], s["cause"]) for s in g["stragglers"]] == [(9, "compute")]
    assert set(g["stragglers"][0]) >= {"rank", "node", "cause", "slowdown", "first_step"}
    text = simulate_cli(scenario)
    assert "rank 9 on node-1: compute, since step" in text.stdout
    assert "slow GPU" in text.stdout


def test_simulate_cli_rejects_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nbandwith_gbps = 10\n")
    out = simulate_cli(bad)
    assert out.returncode == 2
    assert "unknown key 'bandwith_gbps'" in out.stderr
    assert "Traceback" not in out.stderr


def test_simulate_record_into_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text("steps = 20\n[cluster]\nranks = 4\n[model]\nlayers = 2\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = simulate_cli(scenario, "--json", "--record", str(blocker / "rec"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("epwatch simulate: --record folder ")
    assert f"{blocker / 'rec'} is not writable" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("path", sorted((ROOT / "simulator" / "scenarios").glob("*.toml")))
def test_shipped_example_scenarios_load(path: Path) -> None:
    assert load_scenario(path).faults


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"kind": "slow_gpu", "rank": 5, "factor": 1.2}, "hw_thermal_slowdown active"),
        ({"kind": "slow_nic", "rank": 5, "factor": 2.0}, "port_xmit_wait"),
        ({"kind": "hang", "rank": 5, "layer": 1}, "XID 79"),
    ],
)
def test_stragglers_carry_node_evidence_consistent_with_the_fault(fault, expected) -> None:
    from epwatch.cli.simulate import run_scenario

    data = {
        **SMALL,
        "steps": 160,  # per-peer waits (network) are sampled every 10th step
        "cluster": {"ranks": 16, "ranks_per_node": 8},
        "faults": [{**fault, "start_step": 20}],
    }
    report, _ = run_scenario(load_scenario(data))
    (s,) = report.stragglers
    assert s.rank == 5
    assert any(expected in line for line in s.evidence), s.evidence


def test_node_samples_cover_every_node_metric_and_healthy_errors_stay_at_zero() -> None:
    """The node dashboard and rules read every catalogued series; a clean cluster's
    error counters must not move (or NICLinkErrors and friends would fire)."""
    from epwatch.catalogue import METRICS
    from epwatch.simulator.node_samples import NodeSampleModel

    model = NodeSampleModel(load_scenario({**SMALL, "cluster": {"ranks": 16}}))
    first = model.advance(0, 1.0)
    later = model.advance(50, 10.0)
    assert set(first) == {"node-0", "node-1"}
    assert {p.name for pts in later.values() for p in pts} == set(METRICS)
    for pts in (first, later):
        for p in (p for pts_ in pts.values() for p in pts_):
            if "error" in p.name or "retransmission" in p.name or "replays" in p.name:
                assert p.value == 0, p
    tx = [p.value for p in later["node-1"] if p.name == "epwatch_gpu_nvlink_transmit_bytes_total"]
    assert len(tx) == 8 and min(tx) > 0


def test_simulate_report_carries_the_what_if() -> None:
    from epwatch import costmodel
    from epwatch.cli.simulate import run_scenario

    report, truth = run_scenario(load_scenario({**SMALL, "steps": 60}))
    w = report.to_json()["whatif"]
    # The simulator's truth, through the cost model, predicts what the report says.
    sent = report.phases["dispatch"].per_peer_message_bytes * 7
    assert w["t_comm_s"] == pytest.approx(
        costmodel.comm_seconds(truth.latency_s, truth.bandwidth_Bps, sent), rel=0.1
    )
    assert w["regime"] == costmodel.regime(
        sent / 7, truth.latency_s, truth.bandwidth_Bps
    )  # fmt: skip
    assert w["double_ranks"]["per_peer_message_bytes"] < w["per_peer_message_bytes"]
    assert w["double_batch"]["t_compute_s"] == pytest.approx(2 * w["t_compute_s"])
