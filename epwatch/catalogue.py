"""The node-sample catalogue: every metric an agent may ship, with its kind and help.

The agent's samplers, the simulator's node model and the collector's exposition all
name node series from this one table (the "Node samples" table of
docs/contracts.md), so a name cannot drift between the side that makes a point and
the side that exposes it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Kind(enum.IntEnum):
    """Same numbers as ``MetricPoint.Kind`` on the wire."""

    GAUGE = 0
    COUNTER = 1


G, C = Kind.GAUGE, Kind.COUNTER

# name -> (kind, help). Mirrors the "Node samples" table of docs/contracts.md.
METRICS: dict[str, tuple[Kind, str]] = {
    "epwatch_sampler_up": (G, "1 if the sampler's last round succeeded, else 0"),
    "epwatch_sampler_duration_seconds": (G, "Time the sampler's last round took"),
    "epwatch_gpu_sm_clock_hertz": (G, "SM clock"),
    "epwatch_gpu_clock_event_active": (G, "1 while that clock-event (throttle) reason is active"),
    "epwatch_gpu_power_watts": (G, "Power draw"),
    "epwatch_gpu_energy_joules_total": (C, "Energy since driver load"),
    "epwatch_gpu_temperature_celsius": (G, "GPU temperature"),
    "epwatch_gpu_utilization_ratio": (G, "SM utilisation 0..1"),
    "epwatch_gpu_memory_used_bytes": (G, "Framebuffer used"),
    "epwatch_gpu_pcie_transmit_bytes_per_second": (G, "PCIe transmit throughput"),
    "epwatch_gpu_pcie_receive_bytes_per_second": (G, "PCIe receive throughput"),
    "epwatch_gpu_nvlink_transmit_bytes_total": (C, "NVLink data transmitted"),
    "epwatch_gpu_nvlink_receive_bytes_total": (C, "NVLink data received"),
    "epwatch_gpu_nvlink_errors_total": (C, "NVLink CRC/replay/recovery errors"),
    "epwatch_gpu_pcie_replays_total": (C, "PCIe replay counter"),
    "epwatch_gpu_ecc_errors_total": (C, "ECC errors"),
    "epwatch_gpu_remapped_rows": (G, "Row remapping"),
    "epwatch_gpu_xid_errors_total": (C, "XID events seen"),
    "epwatch_gpu_lost": (G, "1 when the GPU fell off the bus / is unreachable"),
    "epwatch_gpu_local_rank": (G, "The local rank mapped to the GPU"),
    "epwatch_nic_transmit_bytes_total": (C, "Bytes transmitted"),
    "epwatch_nic_receive_bytes_total": (C, "Bytes received"),
    "epwatch_nic_transmit_packets_total": (C, "Packets transmitted"),
    "epwatch_nic_receive_packets_total": (C, "Packets received"),
    "epwatch_nic_errors_total": (C, "NIC error counters"),
    "epwatch_nic_transmit_wait_total": (C, "IB port_xmit_wait: ticks with data but no credits"),
    "epwatch_nic_cnp_sent_total": (C, "RoCE congestion notifications sent (np_cnp_sent)"),
    "epwatch_nic_cnp_handled_total": (C, "RoCE congestion notifications handled (rp_cnp_handled)"),
    "epwatch_nic_ecn_marked_packets_total": (C, "RoCE packets received ECN-marked"),
    "epwatch_nic_retransmissions_total": (C, "Out-of-sequence, sequence errors, retries, timeouts"),
    "epwatch_nic_link_up": (G, "1 when the IB state is ACTIVE / the Ethernet operstate is up"),
    "epwatch_nic_physical_state": (G, "IB phys_state code (5 = LinkUp, 2 = Polling, 3 = Disabled)"),
    "epwatch_nic_link_rate_bytes_per_second": (G, "Link rate"),
}


@dataclass(frozen=True, slots=True)
class Point:
    """One sample value; converts to the wire's ``MetricPoint``.

    ``labels`` is not copied: samplers may share one mapping between points and
    rounds, so treat it as read-only.
    """

    name: str
    labels: Mapping[str, str]
    value: float
    kind: Kind = Kind.GAUGE
    help: str = ""

    def to_proto(self) -> Any:
        from epwatch.protos import epwatch_pb2 as pb

        return pb.MetricPoint(
            name=self.name,
            labels=dict(self.labels),
            value=float(self.value),
            kind=int(self.kind),
            help=self.help,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": dict(self.labels),
            "value": self.value,
            "kind": self.kind.name.lower(),
        }


def metric(name: str, value: float, **labels: str) -> Point:
    """A point of a catalogued metric; an unknown name is a bug and raises KeyError."""
    kind, help_text = METRICS[name]
    return Point(name, {k: str(v) for k, v in labels.items()}, float(value), kind, help_text)
