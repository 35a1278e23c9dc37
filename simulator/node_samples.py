"""Node counters consistent with a scenario's faults, in the agent samplers' terms.

A slow GPU is modelled as a thermally throttled one (hardware thermal slowdown
active, SM clock down by the fault's factor, hot); a slow NIC as a port that trained
at a lower rate and sits in credit waits with congestion notifications growing; a
hang as a GPU that fell off the bus (XID 79). Healthy hardware gets the quiet
counters of a loaded cluster, so the collector's evidence has a normal to compare to.

Every series a real NVIDIA + InfiniBand node's samplers export is present, error
counters included (at 0 where nothing goes wrong), so that dashboards and alert
rules see what they would see on such a node.
"""

from __future__ import annotations

from epwatch.catalogue import Point, metric
from epwatch.simulator.scenario import Scenario

BASE_SM_CLOCK_HZ = 1.98e9
LINK_RATE_BPS = 400e9 / 8  # 400 Gb/s
_REASONS = ("gpu_idle", "sw_power_cap", "hw_slowdown", "sw_thermal_slowdown",
            "hw_thermal_slowdown", "hw_power_brake_slowdown")  # fmt: skip
# Per-second rates of a healthy loaded port, and of a congested one.
_QUIET = {"wait": 200.0, "cnp": 0.2, "ecn": 0.2, "cnp_sent": 0.2}
# A congested port is marked (ECN) and, as notification point, sends a CNP per mark.
_CONGESTED = {"wait": 4.0e6, "cnp": 800.0, "ecn": 1200.0, "cnp_sent": 1200.0}
MEMORY_USED_BYTES = 71.5e9  # weights, KV cache and buffers of a serving engine
PCIE_BPS = 2.0e9  # host <-> device traffic of a serving GPU (inputs, outputs, KV swaps)
MTU_BYTES = 4096
PHYS_LINK_UP = 5.0
# Error counters by kind, as the NVML and InfiniBand samplers name them; all stay at 0.
_NVLINK_ERRORS = ("crc_flit", "crc_data", "replay", "recovery")
_ECC = ("corrected", "uncorrected")
_REMAPPED = ("correctable", "uncorrectable", "pending", "failure")
_NIC_ERRORS = ("symbol_error", "link_downed", "link_error_recovery", "port_rcv_errors")
_RETRANSMISSIONS = ("out_of_sequence", "packet_seq_err", "local_ack_timeout_err")
# Sampler -> seconds its round takes on a loaded 8-GPU node.
_SAMPLERS = {"nvidia": 0.012, "infiniband": 0.003}


class NodeSampleModel:
    """Advances every node's cumulative counters step by step."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.P = scenario.cluster.ranks
        self.per_node = scenario.cluster.ranks_per_node
        self._totals: dict[tuple[int, str], float] = {}
        self._t = 0.0

    def _active(self, kind: str, rank: int, step: int) -> float | None:
        """The factor of a ``kind`` fault on ``rank`` at ``step``, if one is active."""
        for f in self.s.faults:
            if f.kind == kind and f.rank == rank and step >= f.start_step:
                return f.factor
        return None

    def _add(self, rank: int, key: str, rate: float, dt: float) -> float:
        total = self._totals.get((rank, key), 0.0) + rate * dt
        self._totals[(rank, key)] = total
        return total

    def advance(self, step: int, dt_s: float) -> dict[str, list[Point]]:
        """Move ``dt_s`` seconds on at ``step``; every node's points at that instant."""
        self._t += dt_s
        out: dict[str, list[Point]] = {}
        nic_rate = self.s.network.bandwidth_gbps * 1e9 * 0.4
        # Of a rank's all-to-all bytes, the share for local peers goes over NVLink.
        remote_peers = max(1, self.P - self.per_node)
        nvlink_rate = nic_rate * (min(self.per_node, self.P) - 1) / remote_peers
        for node in self.s.nodes:
            out[node] = [
                point
                for sampler, seconds in _SAMPLERS.items()
                for point in (
                    metric("epwatch_sampler_up", 1.0, sampler=sampler),
                    metric("epwatch_sampler_duration_seconds", seconds, sampler=sampler),
                )
            ]
        for rank in range(self.P):
            node, dev = self.s.node_of(rank), rank % self.per_node
            gpu, nic = str(dev), f"mlx5_{dev}"
            slow_gpu = self._active("slow_gpu", rank, step)
            slow_nic = self._active("slow_nic", rank, step)
            lost = self._active("hang", rank, step) is not None
            pts = out.setdefault(node, [])
            pts += [
                metric("epwatch_gpu_local_rank", dev, gpu=gpu),
                metric("epwatch_gpu_sm_clock_hertz", BASE_SM_CLOCK_HZ / (slow_gpu or 1.0), gpu=gpu),
                metric("epwatch_gpu_temperature_celsius", 91.0 if slow_gpu else 63.0, gpu=gpu),
                metric("epwatch_gpu_power_watts", 610.0, gpu=gpu),
                metric(
                    "epwatch_gpu_energy_joules_total", self._add(rank, "j", 610.0, dt_s), gpu=gpu
                ),
                metric("epwatch_gpu_utilization_ratio", 0.0 if lost else 0.93, gpu=gpu),
                metric("epwatch_gpu_memory_used_bytes", MEMORY_USED_BYTES, gpu=gpu),
                metric("epwatch_gpu_pcie_transmit_bytes_per_second",
                       0.0 if lost else PCIE_BPS / 2, gpu=gpu),
                metric("epwatch_gpu_pcie_receive_bytes_per_second",
                       0.0 if lost else PCIE_BPS, gpu=gpu),
                metric("epwatch_gpu_nvlink_transmit_bytes_total",
                       self._add(rank, "nvtx", 0.0 if lost else nvlink_rate, dt_s), gpu=gpu),
                metric("epwatch_gpu_nvlink_receive_bytes_total",
                       self._add(rank, "nvrx", 0.0 if lost else nvlink_rate, dt_s), gpu=gpu),
                metric("epwatch_gpu_pcie_replays_total", 0.0, gpu=gpu),
                metric("epwatch_gpu_lost", 1.0 if lost else 0.0, gpu=gpu),
                metric("epwatch_gpu_xid_errors_total", 1.0 if lost else 0.0, gpu=gpu, xid="79"),
            ]  # fmt: skip
            pts += [metric("epwatch_gpu_nvlink_errors_total", 0.0, gpu=gpu, kind=k)
                    for k in _NVLINK_ERRORS]  # fmt: skip
            pts += [metric("epwatch_gpu_ecc_errors_total", 0.0, gpu=gpu, kind=k) for k in _ECC]
            pts += [metric("epwatch_gpu_remapped_rows", 0.0, gpu=gpu, kind=k) for k in _REMAPPED]
            pts += [
                metric("epwatch_gpu_clock_event_active",
                       1.0 if slow_gpu and reason == "hw_thermal_slowdown" else 0.0,
                       gpu=gpu, reason=reason)
                for reason in _REASONS
            ]  # fmt: skip
            rates = _CONGESTED if slow_nic else _QUIET
            port = {"device": nic, "port": "1"}
            tx = self._add(rank, "tx", nic_rate / (slow_nic or 1.0), dt_s)
            rx = self._add(rank, "rx", nic_rate / (slow_nic or 1.0), dt_s)
            pts += [
                metric("epwatch_nic_link_up", 1.0, **port),
                metric("epwatch_nic_physical_state", PHYS_LINK_UP, **port),
                metric("epwatch_nic_link_rate_bytes_per_second",
                       LINK_RATE_BPS / (slow_nic or 1.0), **port),
                metric("epwatch_nic_transmit_bytes_total", tx, **port),
                metric("epwatch_nic_receive_bytes_total", rx, **port),
                metric("epwatch_nic_transmit_packets_total", tx // MTU_BYTES, **port),
                metric("epwatch_nic_receive_packets_total", rx // MTU_BYTES, **port),
                metric("epwatch_nic_transmit_wait_total",
                       self._add(rank, "wait", rates["wait"], dt_s), **port),
                metric("epwatch_nic_cnp_handled_total",
                       self._add(rank, "cnp", rates["cnp"], dt_s), **port),
                metric("epwatch_nic_cnp_sent_total",
                       self._add(rank, "cnp_sent", rates["cnp_sent"], dt_s), **port),
                metric("epwatch_nic_ecn_marked_packets_total",
                       self._add(rank, "ecn", rates["ecn"], dt_s), **port),
            ]  # fmt: skip
            pts += [metric("epwatch_nic_errors_total", 0.0, kind=k, **port) for k in _NIC_ERRORS]
            pts += [metric("epwatch_nic_retransmissions_total", 0.0, kind=k, **port)
                    for k in _RETRANSMISSIONS]  # fmt: skip
        return out
