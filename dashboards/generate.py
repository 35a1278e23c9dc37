"""Generate epwatch's Grafana dashboards into dashboards/grafana/*.json.

    python -m dashboards.generate          # write the JSON files
    python -m dashboards.generate --check  # exit 1 if a committed file is stale

The dashboards are code so that every query uses the contract's metric names and
the recording rules of dashboards/prometheus/, and so that a test can prove the
committed JSON is what this code produces.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from dashboards.builder import (
    Dashboard,
    Json,
    Target,
    alerts_annotation,
    dashed,
    datasource_variable,
    heatmap,
    link_column,
    query_variable,
    right_axis,
    stat,
    state_timeline,
    table,
    thresholds,
    timeseries,
)

OUT_DIR = Path(__file__).resolve().parent / "grafana"
NODE_LINK = (
    "/d/epwatch-node/epwatch-node?var-node=${__value.raw}"
    "&${datasource:queryparam}&${__url_time_range}"
)
EP_GROUP_LINK = (
    "/d/epwatch-ep-group/epwatch-ep-group?var-ep_group=${__value.raw}"
    "&${datasource:queryparam}&${__url_time_range}"
)
RI = "$__rate_interval"

LINK_STATE = {"0": ("down", "red"), "1": ("up", "green")}
ACTIVE = {"0": ("-", "transparent"), "1": ("active", "red")}
RATIO_STEPS = thresholds((None, "green"), (1.2, "orange"), (1.5, "red"))


# --------------------------------------------------------------------------- fleet


def fleet() -> Dashboard:
    """Every EP group and node at a glance: where to look first."""
    g = 'ep_group=~"$ep_group"'
    n = 'node=~"$node"'
    board = Dashboard(
        uid="epwatch-fleet",
        title="epwatch / Fleet overview",
        description="All EP groups and nodes: stragglers, γ, skew, bandwidth, throttled GPUs, "
        "congested NICs and the health of the epwatch pipeline.",
        variables=[
            datasource_variable(),
            query_variable(
                "ep_group",
                "EP group",
                "label_values(epwatch_group_world_size, ep_group)",
                multi=True,
                include_all=True,
            ),
            query_variable(
                "node",
                "Node",
                "label_values(epwatch_sampler_up, node)",
                multi=True,
                include_all=True,
            ),
        ],
        annotations=[alerts_annotation('alertname=~"EP.+|GPU.+|NIC.+"')],
    )
    bad = thresholds((None, "green"), (1, "red"))
    board.row("Now").add(
        stat(
            "EP groups",
            Target(f"count(max by (ep_group) (epwatch_group_world_size{{{g}}}))"),
        ),
        stat(
            "Ranks (GPUs) in EP groups",
            Target(f"sum(max by (ep_group) (epwatch_group_world_size{{{g}}}))"),
        ),
        stat(
            "Straggler ranks",
            Target(f"sum(ep_group:epwatch_straggler:count{{{g}}})"),
            description="Ranks the collectors flag now (any cause, hangs included).",
            steps=bad,
        ),
        stat(
            "Firing epwatch alerts",
            Target(
                'count(ALERTS{alertstate="firing", alertname=~"EP.+|GPU.+|NIC.+"}) or vector(0)'
            ),
            steps=bad,
        ),
        stat(
            "GPUs throttled by hardware",
            Target(f"sum(node_gpu:epwatch_gpu_hw_slowdown:active{{{n}}})"),
            description="hw_slowdown, hw_thermal_slowdown or hw_power_brake_slowdown active.",
            steps=bad,
        ),
        stat("GPUs lost", Target(f"sum(epwatch_gpu_lost{{{n}}})"), steps=bad),
        stat(
            "NIC ports down",
            Target(f"sum(1 - epwatch_nic_link_up{{{n}}})"),
            steps=bad,
        ),
        stat("Agents connected", Target("sum(epwatch_agents_connected)")),
    )
    board.row("EP groups").add(
        table(
            "EP groups now",
            Target(f"max by (ep_group) (epwatch_group_world_size{{{g}}})"),
            Target(f'max by (ep_group) (epwatch_straggler_factor_ratio{{{g}, quantile="0.5"}})'),
            Target(f'max by (ep_group) (epwatch_routing_skew_ratio{{{g}, quantile="0.5"}})'),
            Target(f"ep_group:epwatch_straggler:count{{{g}}}"),
            Target(f"ep_group:epwatch_group_steps:rate1m{{{g}}}"),
            Target(f"ep_group:epwatch_straggler_time:ratio{{{g}}}"),
            Target(f"max by (ep_group) (epwatch_group_stalled_seconds{{{g}}})"),
            columns={
                "ep_group": "EP group",
                "Value #A": "P",
                "Value #B": "γ median",
                "Value #C": "skew median",
                "Value #D": "stragglers",
                "Value #E": "steps/s",
                "Value #F": "time lost",
                "Value #G": "stalled (s)",
            },
            width=24,
            height=7,
            description="One row per EP group; the name links to its EP group dashboard.",
            overrides=[link_column("EP group", "EP group dashboard", EP_GROUP_LINK)],
        ),
        timeseries(
            "Straggler factor γ (median)",
            Target(
                f'max by (ep_group) (epwatch_straggler_factor_ratio{{{g}, quantile="0.5"}})',
                "{{ep_group}}",
            ),
            description="max_r x_r / mean_r x_r of expert compute; EPStragglerFactorHigh at 1.2.",
            decimals=2,
            threshold=1.2,
            width=8,
        ),
        timeseries(
            "Routing skew (median over layers)",
            Target(
                f'max by (ep_group) (epwatch_routing_skew_ratio{{{g}, quantile="0.5"}})',
                "{{ep_group}}",
            ),
            description="max_r n_r / mean_r n_r per layer; EPRoutingSkewHigh at 1.5.",
            decimals=2,
            threshold=1.5,
            width=8,
        ),
        timeseries(
            "Time lost to stragglers",
            Target(f"ep_group:epwatch_straggler_time:ratio{{{g}}}", "{{ep_group}}"),
            description="Seconds lost to stragglers per second of serving.",
            unit="percentunit",
            width=8,
        ),
        timeseries(
            "Forward passes per second",
            Target(f"ep_group:epwatch_group_steps:rate1m{{{g}}}", "{{ep_group}}"),
            width=8,
        ),
        timeseries(
            "Effective bandwidth BW_eff",
            Target(
                f"max by (ep_group, phase) (epwatch_collective_bandwidth_bytes_per_second{{{g}}})",
                "{{ep_group}} {{phase}}",
            ),
            unit="Bps",
            width=8,
        ),
        timeseries(
            "Fixed latency L",
            Target(
                f"max by (ep_group, phase) (epwatch_collective_latency_seconds{{{g}}})",
                "{{ep_group}} {{phase}}",
            ),
            unit="s",
            width=8,
        ),
    )
    board.row("Nodes").add(
        timeseries(
            "Hardware-throttled GPUs by node",
            Target(f"sum by (node) (node_gpu:epwatch_gpu_hw_slowdown:active{{{n}}})", "{{node}}"),
            width=6,
        ),
        timeseries(
            "GPU temperature, hottest 10",
            Target(
                f"topk(10, max by (node, gpu) (epwatch_gpu_temperature_celsius{{{n}}}))",
                "{{node}} gpu{{gpu}}",
            ),
            unit="celsius",
            width=6,
        ),
        timeseries(
            "NIC transmit-wait, top 10 ports",
            Target(
                f"topk(10, node_device_port:epwatch_nic_transmit_wait:rate1m{{{n}}})",
                "{{node}} {{device}}/{{port}}",
            ),
            description="InfiniBand port_xmit_wait ticks per second: data queued, no credits.",
            width=6,
        ),
        timeseries(
            "RoCE CNP handled, top 10 ports",
            Target(
                f"topk(10, node_device_port:epwatch_nic_cnp_handled:rate1m{{{n}}})",
                "{{node}} {{device}}/{{port}}",
            ),
            unit="cps",
            width=6,
        ),
    )
    board.row("epwatch pipeline").add(
        timeseries(
            "Hook records ingested",
            Target(f"ep_group:epwatch_ingest_records:rate1m{{{g}}}", "{{ep_group}}"),
            unit="cps",
            width=6,
        ),
        timeseries(
            "Messages rejected",
            Target(f"sum by (reason) (rate(epwatch_ingest_rejected_total[{RI}]))", "{{reason}}"),
            unit="cps",
            width=6,
        ),
        timeseries(
            "Records dropped (hooks and agents)",
            Target(
                f"sum by (node) (rate(epwatch_agent_hook_records_dropped_total{{{n}}}[{RI}]))",
                "{{node}} hooks",
            ),
            Target(
                f"sum by (node) (rate(epwatch_agent_records_dropped_total{{{n}}}[{RI}]))",
                "{{node}} agent spool",
            ),
            unit="cps",
            width=6,
        ),
        timeseries(
            "Collectors",
            Target('up{job="epwatch-collector"}', "{{instance}} up"),
            Target("epwatch_agents_connected", "{{instance}} agents"),
            width=6,
        ),
    )
    return board


# ------------------------------------------------------------------------ EP group


def ep_group() -> Dashboard:
    """One EP group: who straggles and why, γ and skew, L and BW_eff, ingest health."""
    g = 'ep_group="$ep_group"'
    gn = 'ep_group="$ep_group", node=~"$node"'
    n = 'node=~"$node"'
    collector = f"on (instance) group by (instance) (epwatch_group_world_size{{{g}}})"
    board = Dashboard(
        uid="epwatch-ep-group",
        title="epwatch / EP group",
        description="One EP group: current stragglers with cause and evidence, per-rank "
        "slowdown, γ, routing skew, the Hockney fit (L, BW_eff, regime) and ingest health.",
        variables=[
            datasource_variable(),
            query_variable(
                "ep_group", "EP group", "label_values(epwatch_group_world_size, ep_group)"
            ),
            query_variable(
                "node",
                "Node",
                'label_values(epwatch_rank_compute_slowdown_ratio{ep_group="$ep_group"}, node)',
                multi=True,
                include_all=True,
            ),
        ],
        annotations=[alerts_annotation('ep_group="$ep_group"')],
    )
    board.row("Summary").add(
        stat("Ranks P", Target(f"max(epwatch_group_world_size{{{g}}})")),
        stat(
            "Forward passes / s",
            Target(f"sum(ep_group:epwatch_group_steps:rate1m{{{g}}})"),
            decimals=1,
        ),
        stat(
            "γ median",
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.5"}})'),
            decimals=2,
            steps=RATIO_STEPS,
        ),
        stat(
            "γ p99",
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.99"}})'),
            decimals=2,
            steps=RATIO_STEPS,
        ),
        stat(
            "Routing skew median",
            Target(f'max(epwatch_routing_skew_ratio{{{g}, quantile="0.5"}})'),
            decimals=2,
            steps=thresholds((None, "green"), (1.3, "orange"), (1.5, "red")),
        ),
        stat(
            "Balancedness",
            Target(f"max(epwatch_routing_balancedness_ratio{{{g}}})"),
            description="1 / median skew (vLLM's mean/max load).",
            decimals=2,
            steps=thresholds((None, "red"), (0.67, "orange"), (0.8, "green")),
        ),
        stat(
            "Lost per forward pass",
            Target(f"max(epwatch_straggler_seconds_per_step{{{g}}})"),
            description="Σ over layers of (max_r x_r - mean_r x_r).",
            unit="s",
        ),
        stat(
            "Stalled for",
            Target(f"max(epwatch_group_stalled_seconds{{{g}}})"),
            description="Seconds since the group last completed a collective (0 while moving).",
            unit="s",
            steps=thresholds((None, "green"), (10, "orange"), (60, "red")),
        ),
    )
    board.row("Stragglers").add(
        table(
            "Current stragglers",
            Target(f"epwatch_straggler{{{gn}}}"),
            Target(f"epwatch_straggler_first_step{{{gn}}}"),
            columns={
                "rank": "rank",
                "node": "node",
                "cause": "cause",
                "Value #A": "slowdown",
                "Value #B": "first step",
            },
            hide=("Time", "__name__", "job", "instance", "ep_group"),
            description="Ranks flagged now: cause compute, network, routing or hang; "
            "slowdown relative to the group. The node links to its node dashboard.",
            overrides=[link_column("node", "Node dashboard", NODE_LINK)],
        ),
        table(
            "Evidence",
            Target(f"epwatch_straggler_evidence{{{gn}}}"),
            columns={"rank": "rank", "node": "node", "cause": "cause", "evidence": "evidence"},
            hide=("Time", "__name__", "job", "instance", "ep_group", "Value"),
            description="Up to 4 lines per straggler: what the diagnosis rests on.",
        ),
    )
    board.row("Per-rank slowdown").add(
        heatmap(
            "Per-token compute slowdown by rank",
            Target(f"epwatch_rank_compute_slowdown_ratio{{{gn}}}", "{{rank}}"),
            description="Rank's median per-token expert compute over the group median: "
            "a slow GPU is a hot row here.",
            min=1,
        ),
        heatmap(
            "Routed load by rank",
            Target(f"epwatch_rank_load_ratio{{{gn}}}", "{{rank}}"),
            description="Routed tokens over the mean: a hot expert is a hot row here.",
            scheme="Blues",
            width=12,
        ),
        heatmap(
            "Arrival lag by rank",
            Target(f"epwatch_rank_arrival_lag_seconds{{{gn}}}", "{{rank}}"),
            description="How late each rank arrives at dispatch/combine: network and "
            "compute stragglers both arrive late.",
            unit="s",
            scheme="Reds",
            width=12,
        ),
    )
    board.row("Straggler factor and routing").add(
        timeseries(
            "Straggler factor γ",
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.5"}})', "median"),
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.99"}})', "p99"),
            decimals=2,
            threshold=1.2,
            width=8,
        ),
        timeseries(
            "Routing skew and balancedness",
            Target(f'max(epwatch_routing_skew_ratio{{{g}, quantile="0.5"}})', "skew median"),
            Target(f'max(epwatch_routing_skew_ratio{{{g}, quantile="1"}})', "skew max"),
            Target(f"max(epwatch_routing_balancedness_ratio{{{g}}})", "balancedness"),
            decimals=2,
            width=8,
            overrides=[right_axis("C", "percentunit")],
        ),
        timeseries(
            "Time lost to stragglers",
            Target(f"max(epwatch_straggler_seconds_per_step{{{g}}})", "per forward pass"),
            Target(f"max(ep_group:epwatch_straggler_time:ratio{{{g}}})", "share of time"),
            unit="s",
            width=8,
            overrides=[right_axis("B", "percentunit")],
        ),
        timeseries(
            "Slowest 10 ranks (per-token compute)",
            Target(
                f"topk(10, epwatch_rank_compute_slowdown_ratio{{{gn}}})",
                "rank {{rank}} ({{node}})",
            ),
            decimals=2,
            legend_table=True,
        ),
        timeseries(
            "Hottest 10 ranks (routed load)",
            Target(f"topk(10, epwatch_rank_load_ratio{{{gn}}})", "rank {{rank}} ({{node}})"),
            decimals=2,
            legend_table=True,
        ),
    )
    board.row("Communication: Hockney fit t = L + V / BW_eff per phase").add(
        timeseries(
            "Fixed latency L",
            Target(f"max by (phase) (epwatch_collective_latency_seconds{{{g}}})", "{{phase}}"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Effective bandwidth BW_eff",
            Target(
                f"max by (phase) (epwatch_collective_bandwidth_bytes_per_second{{{g}}})",
                "{{phase}}",
            ),
            Target(
                "max by (phase) (ep_group_phase:epwatch_collective_bandwidth_bytes_per_second"
                f":median1h{{{g}}})",
                "{{phase}} 1h median",
            ),
            description="EPBandwidthDegraded fires below 70% of the 1h median (dashed).",
            unit="Bps",
            width=8,
            overrides=[dashed("B")],
        ),
        timeseries(
            "Transfer time t_xfer (median)",
            Target(f"max by (phase) (epwatch_collective_transfer_seconds{{{g}}})", "{{phase}}"),
            description="min_r d_r: the collective's duration for the last arriver.",
            unit="s",
            width=8,
        ),
        timeseries(
            "Per-peer message vs crossover n½",
            Target(
                f"max by (phase) (epwatch_collective_per_peer_message_bytes{{{g}}})",
                "{{phase}} per-peer message",
            ),
            Target(
                f"max by (phase) (epwatch_collective_crossover_bytes{{{g}}})",
                "{{phase}} crossover n½",
            ),
            description="Below the crossover L·BW_eff the fixed latency dominates: "
            "raise the batch (EPLatencyBound).",
            unit="bytes",
            width=8,
            overrides=[dashed("B")],
        ),
        state_timeline(
            "Regime",
            Target(f"max by (phase) (epwatch_collective_latency_bound{{{g}}})", "{{phase}}"),
            {"0": ("bandwidth-bound", "green"), "1": ("latency-bound", "orange")},
            width=8,
        ),
        timeseries(
            "Fit quality",
            Target(f"max by (phase) (epwatch_collective_fit_r2_ratio{{{g}}})", "{{phase}} R²"),
            Target(f"max by (phase) (epwatch_collective_fit_points{{{g}}})", "{{phase}} points"),
            description="Alerts trust the fit only with R² ≥ 0.8 (latency) / 0.5 (bandwidth).",
            decimals=2,
            width=8,
            overrides=[right_axis("B", "short")],
        ),
    )
    board.row("Ingest health").add(
        timeseries(
            "Hook records ingested",
            Target(f"sum(ep_group:epwatch_ingest_records:rate1m{{{g}}})", "records/s"),
            Target(f"sum(ep_group:epwatch_group_steps:rate1m{{{g}}})", "steps/s"),
            unit="cps",
            width=8,
            overrides=[right_axis("B", "short")],
        ),
        timeseries(
            "Collector messages",
            Target(f"sum(rate(epwatch_ingest_batches_total[{RI}]) and {collector})", "accepted"),
            Target(
                f"sum(rate(epwatch_ingest_duplicates_total[{RI}]) and {collector})",
                "duplicates",
            ),
            Target(
                f"sum by (reason) (rate(epwatch_ingest_rejected_total[{RI}]) and {collector})",
                "rejected {{reason}}",
            ),
            description="Messages of the collector(s) serving this group.",
            unit="cps",
            width=8,
        ),
        timeseries(
            "Agents",
            Target(f"sum(epwatch_agents_connected and {collector})", "connected"),
            Target(f"sum by (node) (epwatch_agent_spool_records{{{n}}})", "{{node}} spool"),
            width=8,
            overrides=[right_axis("B", "short")],
        ),
        timeseries(
            "Records dropped",
            Target(
                f"sum by (node) (rate(epwatch_agent_hook_records_dropped_total{{{n}}}[{RI}]))",
                "{{node}} hooks",
            ),
            Target(
                f"sum by (node) (rate(epwatch_agent_records_dropped_total{{{n}}}[{RI}]))",
                "{{node}} agent spool",
            ),
            unit="cps",
            width=8,
        ),
        timeseries(
            "Estimator pass duration",
            Target(f"max(epwatch_estimator_duration_seconds and {collector})", "estimators"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Newest finalised step",
            Target(f"max(epwatch_group_last_step{{{g}}})", "step"),
            width=8,
        ),
    )
    return board


# ---------------------------------------------------------------------------- node


def node() -> Dashboard:
    """One node: its ranks, GPU clocks and throttling, interconnects, NICs, agent."""
    n = 'node=~"$node"'
    board = Dashboard(
        uid="epwatch-node",
        title="epwatch / Node",
        description="One node: its ranks, GPU clocks and clock-event reasons, power, "
        "temperature, NVLink and PCIe, NIC throughput, transmit-wait, CNP, errors, agent.",
        variables=[
            datasource_variable(),
            query_variable(
                "ep_group",
                "EP group",
                "label_values(epwatch_group_world_size, ep_group)",
                multi=True,
                include_all=True,
            ),
            query_variable("node", "Node", "label_values(epwatch_sampler_up, node)", multi=True),
        ],
        annotations=[alerts_annotation('node=~"$node"')],
    )
    gn = f'ep_group=~"$ep_group", {n}'
    board.row("Ranks on this node").add(
        table(
            "Stragglers on this node",
            Target(f"epwatch_straggler{{{gn}}}"),
            Target(f"epwatch_straggler_first_step{{{gn}}}"),
            columns={
                "ep_group": "EP group",
                "rank": "rank",
                "node": "node",
                "cause": "cause",
                "Value #A": "slowdown",
                "Value #B": "first step",
            },
            width=8,
            overrides=[link_column("EP group", "EP group dashboard", EP_GROUP_LINK)],
        ),
        timeseries(
            "Per-token compute slowdown of local ranks",
            Target(
                f"epwatch_rank_compute_slowdown_ratio{{{gn}}}",
                "{{ep_group}} rank {{rank}}",
            ),
            decimals=2,
            threshold=1.2,
            width=8,
        ),
        timeseries(
            "Arrival lag of local ranks",
            Target(f"epwatch_rank_arrival_lag_seconds{{{gn}}}", "{{ep_group}} rank {{rank}}"),
            unit="s",
            width=8,
        ),
    )
    board.row("GPU clocks and throttling").add(
        timeseries(
            "SM clock",
            Target(f"epwatch_gpu_sm_clock_hertz{{{n}}}", "{{node}} gpu{{gpu}}"),
            unit="hertz",
            width=8,
        ),
        timeseries(
            "GPUs per active clock-event reason",
            Target(
                f"sum by (reason) (epwatch_gpu_clock_event_active{{{n}}})",
                "{{reason}}",
            ),
            description="How many GPUs have each NVML clock-event (throttle) reason active. "
            "hw_* reasons fire GPUClockThrottled; sw_power_cap under load is normal.",
            width=8,
        ),
        state_timeline(
            "Hardware slowdown by GPU",
            Target(f"node_gpu:epwatch_gpu_hw_slowdown:active{{{n}}}", "{{node}} gpu{{gpu}}"),
            ACTIVE,
            width=8,
        ),
        timeseries(
            "Power",
            Target(f"epwatch_gpu_power_watts{{{n}}}", "{{node}} gpu{{gpu}}"),
            unit="watt",
            width=6,
        ),
        timeseries(
            "Temperature",
            Target(f"epwatch_gpu_temperature_celsius{{{n}}}", "{{node}} gpu{{gpu}}"),
            unit="celsius",
            width=6,
        ),
        timeseries(
            "SM utilisation",
            Target(f"epwatch_gpu_utilization_ratio{{{n}}}", "{{node}} gpu{{gpu}}"),
            unit="percentunit",
            min=0,
            max=1,
            width=6,
        ),
        timeseries(
            "Memory used",
            Target(f"epwatch_gpu_memory_used_bytes{{{n}}}", "{{node}} gpu{{gpu}}"),
            unit="bytes",
            width=6,
        ),
    )
    board.row("GPU interconnect and errors").add(
        timeseries(
            "NVLink throughput",
            Target(
                f"node_gpu:epwatch_gpu_nvlink_transmit_bytes:rate1m{{{n}}}",
                "{{node}} gpu{{gpu}} tx",
            ),
            Target(
                f"node_gpu:epwatch_gpu_nvlink_receive_bytes:rate1m{{{n}}}",
                "{{node}} gpu{{gpu}} rx",
            ),
            unit="Bps",
            width=8,
        ),
        timeseries(
            "PCIe throughput",
            Target(f"epwatch_gpu_pcie_transmit_bytes_per_second{{{n}}}", "{{node}} gpu{{gpu}} tx"),
            Target(f"epwatch_gpu_pcie_receive_bytes_per_second{{{n}}}", "{{node}} gpu{{gpu}} rx"),
            unit="Bps",
            width=8,
        ),
        timeseries(
            "NVLink errors and PCIe replays",
            Target(
                f"sum by (node, gpu, kind) (rate(epwatch_gpu_nvlink_errors_total{{{n}}}[{RI}]))",
                "{{node}} gpu{{gpu}} nvlink {{kind}}",
            ),
            Target(
                f"sum by (node, gpu) (rate(epwatch_gpu_pcie_replays_total{{{n}}}[{RI}]))",
                "{{node}} gpu{{gpu}} pcie replay",
            ),
            unit="cps",
            width=8,
        ),
        timeseries(
            "ECC errors",
            Target(
                f"sum by (node, gpu, kind) (rate(epwatch_gpu_ecc_errors_total{{{n}}}[{RI}]))",
                "{{node}} gpu{{gpu}} {{kind}}",
            ),
            unit="cps",
            width=8,
        ),
        timeseries(
            "Remapped rows",
            Target(f"epwatch_gpu_remapped_rows{{{n}}}", "{{node}} gpu{{gpu}} {{kind}}"),
            width=8,
        ),
        table(
            "XID events (since the agent started)",
            Target(f"epwatch_gpu_xid_errors_total{{{n}}}"),
            columns={"node": "node", "gpu": "gpu", "xid": "xid", "Value": "events"},
            width=8,
        ),
        state_timeline(
            "GPU lost",
            Target(f"epwatch_gpu_lost{{{n}}}", "{{node}} gpu{{gpu}}"),
            {"0": ("ok", "green"), "1": ("lost", "red")},
            width=24,
            height=5,
        ),
    )
    board.row("NICs").add(
        timeseries(
            "Throughput",
            Target(
                f"node_device_port:epwatch_nic_transmit_bytes:rate1m{{{n}}}",
                "{{device}}/{{port}} tx",
            ),
            Target(
                f"node_device_port:epwatch_nic_receive_bytes:rate1m{{{n}}}",
                "{{device}}/{{port}} rx",
            ),
            unit="Bps",
            width=8,
        ),
        timeseries(
            "Packets",
            Target(
                f"sum by (device, port) (rate(epwatch_nic_transmit_packets_total{{{n}}}[{RI}]))",
                "{{device}}/{{port}} tx",
            ),
            Target(
                f"sum by (device, port) (rate(epwatch_nic_receive_packets_total{{{n}}}[{RI}]))",
                "{{device}}/{{port}} rx",
            ),
            unit="pps",
            width=8,
        ),
        timeseries(
            "Transmit-wait (InfiniBand)",
            Target(
                f"node_device_port:epwatch_nic_transmit_wait:rate1m{{{n}}}",
                "{{device}}/{{port}}",
            ),
            Target(
                f"node_device_port:epwatch_nic_transmit_wait:rate1m_median1h{{{n}}}",
                "{{device}}/{{port}} 1h median",
            ),
            description="port_xmit_wait ticks per second; NICCongestion at 3x the 1h median.",
            width=8,
            overrides=[dashed("B")],
        ),
        timeseries(
            "Congestion notifications (RoCE)",
            Target(
                f"node_device_port:epwatch_nic_cnp_handled:rate1m{{{n}}}",
                "{{device}}/{{port}} CNP handled",
            ),
            Target(
                f"node_device_port:epwatch_nic_cnp_sent:rate1m{{{n}}}",
                "{{device}}/{{port}} CNP sent",
            ),
            Target(
                f"node_device_port:epwatch_nic_ecn_marked_packets:rate1m{{{n}}}",
                "{{device}}/{{port}} ECN marked",
            ),
            unit="cps",
            width=8,
        ),
        timeseries(
            "Errors",
            Target(
                f"sum by (device, port, kind) (rate(epwatch_nic_errors_total{{{n}}}[{RI}]))",
                "{{device}}/{{port}} {{kind}}",
            ),
            unit="cps",
            width=8,
        ),
        timeseries(
            "Retransmissions",
            Target(
                f"sum by (device, port, kind) "
                f"(rate(epwatch_nic_retransmissions_total{{{n}}}[{RI}]))",
                "{{device}}/{{port}} {{kind}}",
            ),
            unit="cps",
            width=8,
        ),
        state_timeline(
            "Link state",
            Target(f"epwatch_nic_link_up{{{n}}}", "{{node}} {{device}}/{{port}}"),
            LINK_STATE,
        ),
        timeseries(
            "Link rate",
            Target(
                f"epwatch_nic_link_rate_bytes_per_second{{{n}}}", "{{node}} {{device}}/{{port}}"
            ),
            unit="Bps",
        ),
    )
    board.row("Agent").add(
        state_timeline(
            "Samplers",
            Target(f"epwatch_sampler_up{{{n}}}", "{{node}} {{sampler}}"),
            {"0": ("failing", "red"), "1": ("ok", "green")},
            width=8,
        ),
        timeseries(
            "Sampler round time",
            Target(f"epwatch_sampler_duration_seconds{{{n}}}", "{{node}} {{sampler}}"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Spool and drops",
            Target(f"epwatch_agent_spool_records{{{n}}}", "{{node}} spool"),
            Target(
                f"rate(epwatch_agent_records_dropped_total{{{n}}}[{RI}])",
                "{{node}} agent drops/s",
            ),
            Target(
                f"rate(epwatch_agent_hook_records_dropped_total{{{n}}}[{RI}])",
                "{{node}} hook drops/s",
            ),
            width=8,
        ),
    )
    return board


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "epwatch-fleet.json": fleet,
    "epwatch-ep-group.json": ep_group,
    "epwatch-node.json": node,
}


def render(board: Dashboard) -> str:
    """Stable JSON text (the committed form)."""
    return json.dumps(board.to_json(), indent=2, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {name: render(factory()) for name, factory in DASHBOARDS.items()}


def dashboards_json() -> dict[str, Json]:
    """File name -> dashboard JSON object (for tests)."""
    return {name: factory().to_json() for name, factory in DASHBOARDS.items()}


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Committed files that differ from the generator's output, or should not exist."""
    wanted = build_all()
    stale = [
        name
        for name, text in wanted.items()
        if not (out_dir / name).exists() or (out_dir / name).read_text() != text
    ]
    stale += sorted(p.name for p in out_dir.glob("*.json") if p.name not in wanted)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if committed JSON is stale")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale: {args.out / name} (run: python -m dashboards.generate)")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in build_all().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
