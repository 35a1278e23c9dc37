"""/metrics of a collector running on simulated records: promtool-clean, with the
straggler series and its labels."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epwatch import wire
from epwatch.catalogue import METRICS
from epwatch.collector.service import CollectorService
from epwatch.protos import epwatch_pb2 as pb
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import load_scenario
from tests.helpers import get_json, samples, scrape, start_collector, stub, value

pytestmark = pytest.mark.timeout(120)

SCENARIO = {
    "seed": 3,
    "steps": 96,
    "cluster": {"ranks": 16, "ranks_per_node": 8, "ep_group": "ep0"},
    "model": {"layers": 8},
    "faults": [{"kind": "slow_gpu", "rank": 5, "start_step": 16, "factor": 1.3}],
}


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[CollectorService, str]]:
    svc = start_collector(estimators=None, metrics=True)
    ch = grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}")
    push = stub(ch).Push
    scenario = load_scenario(SCENARIO)
    sim = Simulation(scenario)
    seq = 0
    for chunk in sim.chunks():
        records = sim.records(chunk)
        for node_index, node in enumerate(scenario.nodes):
            mine = records.take(records.rank // 8 == node_index)
            seq += 1
            batch = wire.encode_records("ep0", 16, mine, chunk.peer_rows, chunk.entered)
            msg = pb.AgentMessage(agent_id=f"a-{node}", node=node, seq=seq, batch=batch)
            assert push(msg, timeout=10).code == 0
    sample = pb.NodeSample(
        points=[
            pb.MetricPoint(name="epwatch_gpu_sm_clock_hertz", labels={"gpu": "5"}, value=1.4e9),
            pb.MetricPoint(
                name="epwatch_gpu_clock_event_active",
                labels={"gpu": "5", "reason": "hw_slowdown"},
                value=1,
            ),
            pb.MetricPoint(
                name="epwatch_nic_transmit_bytes_total",
                labels={"device": "mlx5_0", "port": "1"},
                value=4e12,
                kind=pb.MetricPoint.COUNTER,
            ),
        ]
    )
    msg = pb.AgentMessage(agent_id="a-node-0", node="node-0", seq=seq + 1, sample=sample)
    push(msg, timeout=10)
    svc.analyzer.run_once()
    yield svc, scrape(svc.metrics_port)
    ch.close()
    svc.stop(grace_s=0.2)


def test_metrics_pass_promtool(running: tuple[CollectorService, str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed: sudo apt-get install --no-install-recommends prometheus "
            "(or make system-deps)"
        )
    out = subprocess.run(
        [promtool, "check", "metrics"], input=running[1], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_straggler_series_and_labels(running: tuple[CollectorService, str]) -> None:
    text = running[1]
    flagged = samples(text, "epwatch_straggler")
    assert flagged, "no straggler flagged"
    labels = [dict(k) for k in flagged]
    assert all(set(lab) == {"ep_group", "rank", "node", "cause"} for lab in labels)
    assert {"ep_group": "ep0", "rank": "5", "node": "node-0", "cause": "compute"} in labels
    slowdown = value(text, "epwatch_straggler", rank="5", cause="compute")
    assert slowdown is not None and 1.1 < slowdown < 1.6
    assert value(text, "epwatch_straggler_first_step", rank="5", cause="compute") >= 16


def test_group_and_rank_series(running: tuple[CollectorService, str]) -> None:
    text = running[1]
    assert value(text, "epwatch_ingest_records_total", ep_group="ep0") == 96 * 8 * 2 * 16
    assert value(text, "epwatch_group_world_size", ep_group="ep0") == 16
    assert value(text, "epwatch_group_steps_total", ep_group="ep0") > 0
    gamma = value(text, "epwatch_straggler_factor_ratio", ep_group="ep0", quantile="0.5")
    assert gamma is not None and gamma > 1
    for phase in ("dispatch", "combine"):
        assert value(text, "epwatch_collective_bandwidth_bytes_per_second", phase=phase) > 0
    per_rank = samples(text, "epwatch_rank_compute_slowdown_ratio")
    assert len(per_rank) == 16
    slow = value(text, "epwatch_rank_compute_slowdown_ratio", rank="5")
    assert slow == pytest.approx(1.3, rel=0.1)
    assert np.isclose(value(text, "epwatch_rank_compute_slowdown_ratio", rank="0"), 1, atol=0.1)


def test_node_samples_reexposed_with_node(running: tuple[CollectorService, str]) -> None:
    text = running[1]
    assert value(text, "epwatch_gpu_sm_clock_hertz", node="node-0", gpu="5") == 1.4e9
    assert value(text, "epwatch_nic_transmit_bytes_total", node="node-0", device="mlx5_0") == 4e12


def test_straggler_evidence_from_node_samples(running: tuple[CollectorService, str]) -> None:
    pytest.importorskip("epwatch.collector.estimators.evidence")
    lines = samples(running[1], "epwatch_straggler_evidence")
    mine = [dict(k) for k in lines if dict(k)["rank"] == "5"]
    assert mine and len(mine) <= 4
    assert any("hw_slowdown" in lab["evidence"] for lab in mine)


def test_group_health_counters_are_exposed(running: tuple[CollectorService, str]) -> None:
    text = running[1]
    for name in ("epwatch_group_late_records_total", "epwatch_group_incomplete_steps_total",
                 "epwatch_group_restarts_total", "epwatch_whatif_batch_scale_ratio"):  # fmt: skip
        assert value(text, name, ep_group="ep0") is not None, name
    assert value(text, "epwatch_group_restarts_total", ep_group="ep0") == 0


def test_evidence_labels_do_not_churn() -> None:
    from epwatch.collector.metrics import evidence_label

    assert evidence_label("gpu 5: hw_thermal_slowdown active for 30 s") == (
        "gpu 5: hw_thermal_slowdown active"
    )
    a = evidence_label("gpu 5 SM clock 1584 MHz, 20% below node median")
    b = evidence_label("gpu 5 SM clock 1591 MHz, 20% below node median")
    assert a == b == "gpu 5 SM clock 1600 MHz, 20% below node median"
    assert evidence_label("mlx5_1/1 XID 79 +1 in 20 s") == "mlx5_1/1 XID 79 +1"


def test_reserved_names_cover_every_series_the_collector_makes(
    running: tuple[CollectorService, str],
) -> None:
    """Node samples may not reuse a collector name: the reserved set, derived from the
    collectors' describe(), holds every family and sample name the collector exposed."""
    svc, text = running
    node_samples = set(METRICS) | {name.removesuffix("_total") for name in METRICS}
    exposed = set()
    for family in text_string_to_metric_families(text):
        if family.name in node_samples:
            continue
        exposed |= {family.name} | {s.name for s in family.samples}
    assert "epwatch_straggler" in exposed and "epwatch_ingest_records_total" in exposed
    assert exposed <= svc.reserved_names, sorted(exposed - svc.reserved_names)


def test_a_hang_has_its_own_metric_and_drops_are_counted() -> None:
    """A hang's value is seconds stalled (not a slowdown in the thousands); dropped
    slots are a counter per rank; both pass promtool."""
    from prometheus_client import CollectorRegistry, generate_latest

    from epwatch.collector.estimators.report import GroupReport, StragglerReport
    from epwatch.collector.groups import Group, NullEstimator
    from epwatch.collector.metrics import GroupMetrics

    group = Group("g", 4, NullEstimator("g", 4))
    group.report = GroupReport(
        "g", 4, steps=10, last_step=9, stalled_s=42.0, nodes=("a", "a", "b", "b"),
        stragglers=(
            StragglerReport(2, "b", "hang", 4200.0, 5, 9, True),
            StragglerReport(1, "a", "routing", 1.8, 3, 9, True, evidence=("rank 1 dropped",)),
        ),
        dropped_tokens_total=(0, 330, 0, 0),
    )  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GroupMetrics(lambda: [group], lambda g: 42.0))
    text = generate_latest(registry).decode()
    assert value(text, "epwatch_rank_stalled_seconds", rank="2", node="b") == 42.0
    assert {dict(k)["cause"] for k in samples(text, "epwatch_straggler")} == {"routing"}
    assert value(text, "epwatch_dropped_tokens_total", ep_group="g", rank="1") == 330
    assert len(samples(text, "epwatch_dropped_tokens_total")) == 1  # ranks that dropped
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_live_diagnosis_api_on_the_metrics_port(running: tuple[CollectorService, str]) -> None:
    svc = running[0]
    status, doc = get_json(svc.metrics_port, "/api/v1/diagnosis")
    assert status == 200
    (group,) = doc["groups"]
    assert (group["ep_group"], group["ranks"]) == ("ep0", 16)
    slow = [s for s in group["stragglers"] if (s["rank"], s["cause"]) == (5, "compute")]
    assert slow and slow[0]["active"] and any("hw_slowdown" in e for e in slow[0]["evidence"])
    assert get_json(svc.metrics_port, "/api/v1/diagnosis?ep_group=ep0") == (status, doc)
    missing, err = get_json(svc.metrics_port, "/api/v1/diagnosis?ep_group=nope")
    assert missing == 404 and "no EP group 'nope'" in err["error"]


def test_status_prints_the_live_report(
    running: tuple[CollectorService, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from epwatch.cli import main

    url = f"http://127.0.0.1:{running[0].metrics_port}"
    assert main(["status", "--collector-url", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("EP group ep0: 16 ranks")
    assert "rank 5 on node-0: compute, since step" in out and "evidence: " in out
    assert main(["status", "--collector-url", url, "--json", "--ep-group", "ep0"]) == 0
    assert '"ep_group": "ep0"' in capsys.readouterr().out
    assert main(["status", "--collector-url", url, "--ep-group", "nope"]) == 1
    assert "no EP group 'nope'" in capsys.readouterr().err
