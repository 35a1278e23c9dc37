"""NodeEvidence: node-side facts behind a straggler flag.

Samples are fed as wire ``MetricPoint``s, the way the collector's ingest path hands
them over, with names and labels from the "Node samples" contract.
"""

from __future__ import annotations

import pytest

from epwatch.collector.estimators.evidence import NodeEvidence
from epwatch.protos import epwatch_pb2 as pb

GAUGE, COUNTER = pb.MetricPoint.GAUGE, pb.MetricPoint.COUNTER
REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
)


def mp(name: str, value: float, point_kind=GAUGE, /, **labels: str) -> pb.MetricPoint:
    return pb.MetricPoint(name=name, labels=labels, value=value, kind=point_kind)


def gpu_points(
    clocks: dict[int, float] | None = None,
    active: dict[int, set[str]] | None = None,
    temps: dict[int, float] | None = None,
    lost: set[int] | None = None,
    xids: dict[tuple[int, int], int] | None = None,
    local_ranks: dict[int, int] | None = None,
    gpus: int = 8,
) -> list[pb.MetricPoint]:
    """One NVIDIA sampler round for an 8-GPU node; healthy unless told otherwise."""
    clocks, active, temps = clocks or {}, active or {}, temps or {}
    lost, xids = lost or set(), xids or {}
    out = []
    for i in range(gpus):
        g = str(i)
        rank = (local_ranks or {i: i for i in range(gpus)}).get(i)
        if rank is not None:
            out.append(mp("epwatch_gpu_local_rank", rank, gpu=g))
        out.append(mp("epwatch_gpu_lost", 1.0 if i in lost else 0.0, gpu=g))
        if i in lost:
            continue
        out.append(mp("epwatch_gpu_sm_clock_hertz", clocks.get(i, 1980e6), gpu=g))
        out.append(mp("epwatch_gpu_temperature_celsius", temps.get(i, 60.0), gpu=g))
        for reason in REASONS:
            on = 1.0 if reason in active.get(i, set()) else 0.0
            out.append(mp("epwatch_gpu_clock_event_active", on, gpu=g, reason=reason))
        out.append(mp("epwatch_gpu_ecc_errors_total", 0, COUNTER, gpu=g, kind="uncorrected"))
    for (gpu, xid), count in xids.items():
        out.append(mp("epwatch_gpu_xid_errors_total", count, COUNTER, gpu=str(gpu), xid=str(xid)))
    return out


def nic_points(
    t: float,
    wait_rate: dict[str, float] | None = None,
    cnp_rate: dict[str, float] | None = None,
    rates_gbps: dict[str, float] | None = None,
    errors: dict[tuple[str, str], float] | None = None,
    up: dict[str, bool] | None = None,
) -> list[pb.MetricPoint]:
    """One InfiniBand round for mlx5_0..mlx5_3 (port 1) plus the eth0 management NIC.

    Counters are ``rate * t`` so their growth over the window is the given rate.
    """
    wait_rate, cnp_rate, rates_gbps = wait_rate or {}, cnp_rate or {}, rates_gbps or {}
    errors, up = errors or {}, up or {}
    out = []
    for dev in ("mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"):
        labels = {"device": dev, "port": "1"}
        out.append(mp("epwatch_nic_link_up", 1.0 if up.get(dev, True) else 0.0, **labels))
        out.append(mp("epwatch_nic_physical_state", 5, **labels))
        gbps = rates_gbps.get(dev, 400)
        out.append(mp("epwatch_nic_link_rate_bytes_per_second", gbps * 1e9 / 8, **labels))
        out.append(mp("epwatch_nic_transmit_bytes_total", 1e9 * t, COUNTER, **labels))
        base_wait = 1e12  # large absolute value: only growth matters
        out.append(
            mp(
                "epwatch_nic_transmit_wait_total",
                base_wait + wait_rate.get(dev, 0) * t,
                COUNTER,
                **labels,
            )
        )
        out.append(
            mp("epwatch_nic_cnp_handled_total", 5e6 + cnp_rate.get(dev, 0) * t, COUNTER, **labels)
        )
        for kind in ("symbol_error", "link_downed", "port_rcv_errors"):
            out.append(
                mp(
                    "epwatch_nic_errors_total",
                    errors.get((dev, kind), 0.0),
                    COUNTER,
                    kind=kind,
                    **labels,
                )
            )
        out.append(
            mp("epwatch_nic_retransmissions_total", 31, COUNTER, kind="out_of_sequence", **labels)
        )
    eth = {"device": "eth0", "port": "1"}
    out.append(mp("epwatch_nic_link_up", 1.0, **eth))
    out.append(mp("epwatch_nic_link_rate_bytes_per_second", 25e9 / 8, **eth))
    out.append(mp("epwatch_nic_errors_total", 1000 * t, COUNTER, kind="rx_dropped", **eth))
    return out


def new_evidence(**kw) -> NodeEvidence:
    """A store whose clock is the newest sample time: no node looks silent."""
    holder: list[NodeEvidence] = []

    def clock() -> float:
        return max((n.updated_s for n in holder[0]._nodes.values()), default=0.0)

    holder.append(NodeEvidence(clock=clock, **kw))
    return holder[0]


def feed(ev: NodeEvidence, node: str, rounds: int, step_s: float = 5.0, t0: float = 1000.0, **kw):
    """``rounds`` samples of one node, ``step_s`` apart; kwargs pass to the builders."""
    gpu_kw = {
        k: v
        for k, v in kw.items()
        if k in ("clocks", "active", "temps", "lost", "xids", "local_ranks")
    }
    nic_kw = {
        k: v for k, v in kw.items() if k in ("wait_rate", "cnp_rate", "rates_gbps", "errors", "up")
    }
    for i in range(rounds):
        t = t0 + i * step_s
        ev.update(node, gpu_points(**gpu_kw) + nic_points(t, **nic_kw), t)
    return t0 + (rounds - 1) * step_s


def clean_cluster(ev: NodeEvidence, nodes=("n0", "n1", "n2"), rounds: int = 13) -> None:
    for node in nodes:
        feed(
            ev, node, rounds, wait_rate={"mlx5_0": 2e4, "mlx5_1": 2e4, "mlx5_2": 2e4, "mlx5_3": 2e4}
        )


def test_compute_straggler_with_thermal_slowdown():
    ev = new_evidence()
    clean_cluster(ev)
    # 49 rounds 5 s apart: hw thermal slowdown held for 240 s on gpu 3
    feed(
        ev,
        "n3",
        49,
        clocks={3: 1410e6},
        active={3: {"hw_thermal_slowdown", "sw_thermal_slowdown"}},
        temps={3: 91.0},
    )
    lines = ev.evidence_for("compute", "n3", 3)
    assert lines[0] == "gpu 3: hw_thermal_slowdown active for 4 min"
    assert "gpu 3: sw_thermal_slowdown active for 4 min" in lines
    assert "gpu 3 SM clock 1410 MHz, 29% below node median" in lines
    assert "gpu 3 at 91 °C (node median 60 °C)" in lines
    assert len(lines) <= 4
    # the neighbour on the same node is clean
    assert ev.evidence_for("compute", "n3", 2) == []


def test_compute_evidence_follows_the_local_rank_mapping():
    ev = new_evidence()
    # local ranks 0..3 run on GPUs 4..7 (CUDA_VISIBLE_DEVICES=4,5,6,7)
    mapping = {4: 0, 5: 1, 6: 2, 7: 3}
    feed(ev, "n0", 5, clocks={6: 1200e6}, active={6: {"sw_power_cap"}}, local_ranks=mapping)
    lines = ev.evidence_for("compute", "n0", 2)
    assert lines[0].startswith("gpu 6: sw_power_cap active for")
    assert any(line.startswith("gpu 6 SM clock 1200 MHz") for line in lines)
    assert ev.evidence_for("compute", "n0", 0) == []  # GPU 4 is fine
    # without a mapping the gpu index is the local device
    ev2 = new_evidence()
    feed(ev2, "n0", 5, clocks={6: 1200e6})
    assert ev2.evidence_for("compute", "n0", 6)[0].startswith("gpu 6 SM clock 1200 MHz")


def test_whole_node_slow_is_measured_against_the_cluster():
    ev = new_evidence()
    clean_cluster(ev)
    feed(ev, "n3", 5, clocks={i: 1500e6 for i in range(8)})
    assert ev.evidence_for("compute", "n3", 1) == [
        "gpu 1 SM clock 1500 MHz, 24% below cluster median"
    ]


def test_network_straggler_with_credit_waits_and_cnp():
    ev = new_evidence()
    clean_cluster(ev)
    feed(
        ev,
        "n3",
        13,
        wait_rate={"mlx5_0": 2e4, "mlx5_1": 2e4, "mlx5_2": 3.2e6, "mlx5_3": 2e4},
        cnp_rate={"mlx5_2": 120.0},
        rates_gbps={"mlx5_2": 200},
    )
    lines = ev.evidence_for("network", "n3", 5)
    assert lines == [
        "mlx5_2/1 link rate 200 Gb/s (node max 400 Gb/s)",
        "mlx5_2/1 port_xmit_wait +3.2e6 ticks/s",
        "mlx5_2/1 CNP handled +120/s",
    ]


def test_network_errors_and_link_down_come_first_and_output_is_bounded():
    ev = new_evidence()
    clean_cluster(ev)
    feed(ev, "n3", 6, wait_rate={"mlx5_2": 3.2e6}, cnp_rate={"mlx5_2": 120.0})
    # then errors grow on two ports and mlx5_1 goes down
    for i, t in enumerate((1030.0, 1035.0, 1040.0)):
        errs = {("mlx5_0", "symbol_error"): 3.0 * (i + 1), ("mlx5_3", "port_rcv_errors"): 7.0 * i}
        ev.update(
            "n3",
            gpu_points()
            + nic_points(
                t,
                wait_rate={"mlx5_2": 3.2e6},
                cnp_rate={"mlx5_2": 120.0},
                errors=errs,
                up={"mlx5_1": False},
            ),
            t,
        )
    lines = ev.evidence_for("network", "n3", None)
    assert len(lines) == 4
    assert lines[0] == "mlx5_1/1 link down"
    assert "mlx5_0/1 symbol_error +9 in 40 s" in lines
    assert "mlx5_3/1 port_rcv_errors +14 in 40 s" in lines
    # rx_dropped on the management NIC grows everywhere: never evidence
    assert not any("rx_dropped" in line for line in lines)


def test_clean_node_yields_nothing():
    ev = new_evidence()
    clean_cluster(ev, nodes=("n0", "n1", "n2", "n3"))
    for cause in ("compute", "network", "hang", "routing"):
        for dev in (0, 3, None):
            assert ev.evidence_for(cause, "n3", dev) == [], (cause, dev)


def test_single_node_below_the_absolute_floors_yields_nothing():
    ev = new_evidence()
    feed(ev, "n0", 13, wait_rate={"mlx5_0": 500.0}, cnp_rate={"mlx5_0": 0.5})
    assert ev.evidence_for("network", "n0", 0) == []
    ev2 = new_evidence()
    feed(ev2, "n0", 13, wait_rate={"mlx5_0": 5e5})  # no peers: the floor alone decides
    assert ev2.evidence_for("network", "n0", 0) == ["mlx5_0/1 port_xmit_wait +5.0e5 ticks/s"]


def test_hang_gpu_lost_and_xid():
    ev = new_evidence()
    feed(ev, "n0", 3, t0=1000.0)
    # XID 79 appears (first event on this node), then the GPU is lost
    ev.update("n0", gpu_points(xids={(3, 79): 1}) + nic_points(1015.0), 1015.0)
    for t in (1020.0, 1025.0, 1030.0, 1035.0):
        ev.update("n0", gpu_points(lost={3}, xids={(3, 79): 1}) + nic_points(t), t)
    lines = ev.evidence_for("hang", "n0", 3)
    assert lines[0] == "gpu 3 lost for 10 s"
    assert "gpu 3 XID 79 +1 in 20 s" in lines  # 25 s, in 10 s steps
    assert ev.evidence_for("compute", "n0", 3)[0] == "gpu 3 lost for 10 s"
    # another rank on the node sees its neighbour's loss, ranked lower
    assert ev.evidence_for("hang", "n0", 1) == ["gpu 3 (another rank's) lost for 10 s"]


def test_hang_silent_node():
    now = [2000.0]
    ev = NodeEvidence(clock=lambda: now[0])
    feed(ev, "n0", 3, t0=1900.0)  # last sample at 1910
    assert ev.evidence_for("hang", "n0", 0) == ["no node sample for 1 min"]
    now[0] = 1915.0
    assert ev.evidence_for("hang", "n0", 0) == []


def test_counter_reset_counts_like_prometheus():
    ev = new_evidence()
    labels = {"device": "mlx5_0", "port": "1", "kind": "symbol_error"}
    for t, v in ((0.0, 100.0), (10.0, 103.0), (20.0, 2.0), (30.0, 4.0)):
        ev.update("n0", [mp("epwatch_nic_errors_total", v, COUNTER, **labels)], t)
    # +3, then a reset to 2 (counted as +2), then +2
    assert ev.evidence_for("network", "n0", None) == ["mlx5_0/1 symbol_error +7 in 30 s"]


def test_history_is_bounded_and_old_growth_ages_out():
    ev = new_evidence(horizon_s=60.0)
    labels = {"device": "mlx5_0", "port": "1", "kind": "symbol_error"}
    for i in range(500):
        value = 5.0 if i >= 10 else 0.0  # errors at t=10 s, nothing after
        ev.update("n0", [mp("epwatch_nic_errors_total", value, COUNTER, **labels)], float(i))
    series = next(iter(ev._nodes["n0"].history.values()))
    assert len(series) <= 14
    assert ev.evidence_for("network", "n0", None) == []


def test_unknown_node_and_routing_are_empty():
    ev = new_evidence()
    assert ev.evidence_for("compute", "nowhere", 0) == []
    feed(ev, "n0", 3, clocks={0: 1000e6})
    assert ev.evidence_for("routing", "n0", 0) == []


def test_accepts_sampler_points_and_dicts():
    from epwatch.catalogue import metric

    ev = new_evidence()
    for t in (0.0, 5.0):
        points = [
            metric("epwatch_gpu_clock_event_active", 1.0, gpu="0", reason="hw_slowdown"),
            {"name": "epwatch_gpu_sm_clock_hertz", "labels": {"gpu": "0"}, "value": 1e9},
            {"name": "epwatch_gpu_sm_clock_hertz", "labels": {"gpu": "1"}, "value": 2e9},
        ]
        ev.update("n0", points, t)
    assert ev.evidence_for("compute", "n0", 0) == [
        "gpu 0: hw_slowdown active for 0 s",
        "gpu 0 SM clock 1000 MHz, 33% below node median",
    ]


@pytest.mark.parametrize("cause", ["compute", "network", "hang"])
def test_negative_local_device_means_unknown(cause):
    ev = new_evidence()
    feed(ev, "n0", 3)
    assert ev.evidence_for(cause, "n0", -1) == []
