"""The fleet dashboard: every EP group and node at a glance, with links into each."""

from __future__ import annotations

from epwatch.dashboards.builder import (
    Dashboard,
    Target,
    alerts_annotation,
    datasource_variable,
    link_column,
    query_variable,
    stat,
    table,
    thresholds,
    timeseries,
)
from epwatch.dashboards.common import EP_GROUP_LINK, RI


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
