"""The node dashboard: GPU clocks and throttle reasons, NIC counters, the agent's health."""

from __future__ import annotations

from epwatch.dashboards.builder import (
    Dashboard,
    Target,
    alerts_annotation,
    dashed,
    datasource_variable,
    link_column,
    query_variable,
    state_timeline,
    table,
    timeseries,
)
from epwatch.dashboards.common import ACTIVE, EP_GROUP_LINK, LINK_STATE, RI


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
