"""Node evidence: what the agents' GPU and NIC samples say about a flagged rank.

The estimators decide *that* a rank is slow and guess *why* (compute, network,
routing, hang) from timings alone. This store keeps each node's latest sample points
plus a short history of the counters that matter (about a minute), so a flag can carry
the node-side facts an operator would check next: the GPU's active clock-event
reasons and how its SM clock compares with its neighbours', NIC credit waits,
congestion notifications, errors and link-rate drops, lost GPUs and XID events.

Pure Python on purpose (it runs beside the estimators, no pandas). Lines are short,
at most four per call, and rounded (two significant digits, coarse durations) because
they become the ``evidence`` label of ``epwatch_straggler_evidence``: exact numbers
would mint a new series every scrape.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_LINES = 4

# Counters whose growth is evidence; their history is kept per series.
_TRACKED = frozenset(
    {
        "epwatch_nic_transmit_wait_total",
        "epwatch_nic_cnp_handled_total",
        "epwatch_nic_cnp_sent_total",
        "epwatch_nic_ecn_marked_packets_total",
        "epwatch_nic_retransmissions_total",
        "epwatch_nic_errors_total",
        "epwatch_gpu_xid_errors_total",
        "epwatch_gpu_ecc_errors_total",
        "epwatch_gpu_nvlink_errors_total",
        "epwatch_gpu_pcie_replays_total",
    }
)
# Gauges whose latest value is enough.
_LATEST = frozenset(
    {
        "epwatch_gpu_sm_clock_hertz",
        "epwatch_gpu_clock_event_active",
        "epwatch_gpu_temperature_celsius",
        "epwatch_gpu_lost",
        "epwatch_gpu_local_rank",
        "epwatch_gpu_remapped_rows",
        "epwatch_nic_link_up",
        "epwatch_nic_physical_state",
        "epwatch_nic_link_rate_bytes_per_second",
    }
)
# Clock-event reasons that slow a busy GPU, most serious first. gpu_idle,
# applications_clocks_setting, sync_boost and display_clock_setting are normal.
SLOWDOWN_REASONS = (
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "hw_slowdown",
    "sw_thermal_slowdown",
    "sw_power_cap",
)
# NIC counters where any growth matters (timeouts and hard errors).
_HARD_RETRANSMISSIONS = frozenset(
    {
        "local_ack_timeout_err",
        "rnr_nak_retry_err",
        "req_transport_retries_exceeded",
        "req_rnr_retries_exceeded",
        "retrans_timeout_events",
        "unresponsive_remote_events",
    }
)
# Error kinds that grow on healthy hosts (unknown protocols, full rings): not evidence.
_NOISY_ERRORS = frozenset({"rx_dropped", "tx_dropped", "rx_missed_errors", "rx_over_errors"})

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Node:
    updated_s: float = -math.inf
    latest: dict[Key, tuple[float, float]] = field(default_factory=dict)  # value, seen at
    history: dict[Key, deque[tuple[float, float]]] = field(default_factory=dict)
    reason_since: dict[tuple[str, str], float] = field(default_factory=dict)  # (gpu, reason)
    lost_since: dict[str, float] = field(default_factory=dict)
    ever_up: set[tuple[str, str]] = field(default_factory=set)  # NIC ports seen up


@dataclass(frozen=True)
class _Line:
    severity: float  # higher first
    text: str


def _point_fields(point: Any) -> tuple[str, Mapping[str, str], float]:
    if isinstance(point, Mapping):
        return point["name"], point.get("labels", {}), float(point["value"])
    return point.name, point.labels, float(point.value)


def _key(name: str, labels: Mapping[str, str]) -> Key:
    return name, tuple(sorted((str(k), str(v)) for k, v in labels.items() if k != "node"))


def _sig(x: float) -> str:
    """Two significant digits, compact: 3.2e6, 120, 4.5, 0.31."""
    if x == 0:
        return "0"
    if abs(x) >= 1e4:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(x) >= 10:
        digits = math.floor(math.log10(abs(x))) - 1
        return str(int(round(x, -digits)))
    return f"{x:.2g}"


def _duration(seconds: float) -> str:
    """Coarse: 10 s steps under a minute, then minutes, then hours."""
    if seconds < 60:
        return f"{int(seconds // 10 * 10)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    return f"{int(seconds // 3600)} h"


def _increase(samples: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(increase, seconds covered) of a counter, counting resets like Prometheus does."""
    total, first_t, last_t, prev = 0.0, None, None, None
    for t, v in samples:
        if prev is not None:
            total += v - prev if v >= prev else v
        else:
            first_t = t
        prev, last_t = v, t
    if first_t is None or last_t is None:
        return 0.0, 0.0
    return total, last_t - first_t


class NodeEvidence:
    """Latest GPU/NIC samples per node, and evidence lines for a flagged rank.

    ``update`` is called by the ingest path for every ``NodeSample``; ``evidence_for``
    by the estimators when they report a flag. Both are thread-safe.
    """

    def __init__(
        self,
        horizon_s: float = 60.0,
        max_nodes: int = 4096,
        stale_after_s: float = 30.0,
        clock_drop_ratio: float = 0.10,
        temperature_excess_c: float = 10.0,
        peer_ratio: float = 2.0,
        min_wait_ticks_per_s: float = 1e3,
        min_cnp_per_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.horizon_s = horizon_s
        self.spacing_s = horizon_s / 12
        self.max_nodes = max_nodes
        self.stale_after_s = stale_after_s
        self.clock_drop_ratio = clock_drop_ratio
        self.temperature_excess_c = temperature_excess_c
        self.peer_ratio = peer_ratio
        self.min_wait_ticks_per_s = min_wait_ticks_per_s
        self.min_cnp_per_s = min_cnp_per_s
        self.clock = clock
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()

    # --- ingest ------------------------------------------------------------------
    def update(self, node: str, points: Iterable[Any], now_s: float) -> None:
        """Take one round of a node's sample points (MetricPoint or Point-like)."""
        with self._lock:
            state = self._nodes.get(node)
            if state is None:
                if len(self._nodes) >= self.max_nodes:
                    oldest = min(self._nodes, key=lambda n: self._nodes[n].updated_s)
                    del self._nodes[oldest]
                state = self._nodes[node] = _Node()
            previous_s, state.updated_s = state.updated_s, now_s
            for point in points:
                name, labels, value = _point_fields(point)
                if name in _TRACKED:
                    self._append(state, _key(name, labels), now_s, value, previous_s)
                elif name in _LATEST:
                    self._latest(state, name, labels, value, now_s)
            self._expire(state, now_s)

    def _append(self, state: _Node, key: Key, t: float, v: float, previous_s: float) -> None:
        series = state.history.get(key)
        if series is None:
            series = state.history[key] = deque()
            if math.isfinite(previous_s) and previous_s < t:
                # A labelled counter that appears on a node we already watch (a first XID,
                # a new error kind) counted from zero since the last round.
                series.append((previous_s, 0.0))
        if len(series) >= 2 and series[-1][0] - series[-2][0] < self.spacing_s:
            series[-1] = (t, v)  # keep the newest value, points spaced by spacing_s
        else:
            series.append((t, v))
        # keep one sample at or before the window start as the anchor
        while len(series) > 2 and series[1][0] <= t - self.horizon_s:
            series.popleft()

    def _latest(
        self, state: _Node, name: str, labels: Mapping[str, str], value: float, t: float
    ) -> None:
        state.latest[_key(name, labels)] = (value, t)
        if name == "epwatch_gpu_clock_event_active":
            reason_key = (str(labels.get("gpu", "")), str(labels.get("reason", "")))
            if value:
                state.reason_since.setdefault(reason_key, t)
            else:
                state.reason_since.pop(reason_key, None)
        elif name == "epwatch_gpu_lost":
            gpu = str(labels.get("gpu", ""))
            if value:
                state.lost_since.setdefault(gpu, t)
            else:
                state.lost_since.pop(gpu, None)
        elif name == "epwatch_nic_link_up" and value:
            state.ever_up.add((str(labels.get("device", "")), str(labels.get("port", ""))))

    def _expire(self, state: _Node, now_s: float) -> None:
        """Drop series a sampler stopped reporting (device gone, sampler disabled)."""
        limit = now_s - 5 * self.horizon_s
        for key in [k for k, (_, t) in state.latest.items() if t < limit]:
            del state.latest[key]
        for key in [k for k, s in state.history.items() if s[-1][0] < limit]:
            del state.history[key]

    def forget(self, node: str) -> None:
        with self._lock:
            self._nodes.pop(node, None)

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    # --- queries -----------------------------------------------------------------
    def evidence_for(self, cause: str, node: str, local_device: int | None) -> list[str]:
        """Up to four short lines from ``node``'s samples that corroborate ``cause``."""
        if local_device is not None and local_device < 0:
            local_device = None
        with self._lock:
            state = self._nodes.get(node)
            if state is None:
                return []
            if cause == "compute":
                lines = self._compute(node, state, local_device)
            elif cause == "network":
                lines = self._network(node, state)
            elif cause == "hang":
                lines = self._hang(node, state, local_device)
            else:  # routing: the node is fine by definition; nothing to add
                lines = []
        lines.sort(key=lambda line: -line.severity)
        return list(dict.fromkeys(line.text for line in lines))[:MAX_LINES]

    # helpers over one node's latest values
    @staticmethod
    def _gauges(state: _Node, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), (v, _) in state.latest.items() if n == name}

    def _gpus(self, state: _Node) -> set[str]:
        return {
            dict(labels)["gpu"]
            for (name, labels) in state.latest
            if name.startswith("epwatch_gpu_") and "gpu" in dict(labels)
        }

    def _target_gpus(self, state: _Node, local_device: int | None) -> list[str]:
        """The GPU behind ``local_device`` (by local rank, else index); all if unknown."""
        gpus = self._gpus(state)
        if local_device is None:
            return sorted(gpus, key=_gpu_order)
        for labels, rank in self._gauges(state, "epwatch_gpu_local_rank").items():
            if int(rank) == local_device:
                return [dict(labels)["gpu"]]
        return [str(local_device)] if str(local_device) in gpus else []

    def _increase(self, state: _Node, key: Key) -> tuple[float, float]:
        series = state.history.get(key)
        return _increase(series) if series else (0.0, 0.0)

    # --- compute -----------------------------------------------------------------
    def _compute(self, node: str, state: _Node, local_device: int | None) -> list[_Line]:
        now = state.updated_s
        lines: list[_Line] = []
        targets = self._target_gpus(state, local_device)
        latest = state.latest
        clocks = {
            dict(labels)["gpu"]: v
            for labels, v in self._gauges(state, "epwatch_gpu_sm_clock_hertz").items()
        }
        idle = {gpu for (gpu, reason) in state.reason_since if reason == "gpu_idle"}
        busy_clocks = [v for g, v in clocks.items() if g not in idle and g not in state.lost_since]
        node_median = statistics.median(busy_clocks) if busy_clocks else None
        temps = {
            dict(labels)["gpu"]: v
            for labels, v in self._gauges(state, "epwatch_gpu_temperature_celsius").items()
        }
        temp_median = statistics.median(temps.values()) if temps else None
        for gpu in targets:
            if gpu in state.lost_since:
                lines.append(
                    _Line(100, f"gpu {gpu} lost for {_duration(now - state.lost_since[gpu])}")
                )
                continue
            for rank, reason in enumerate(SLOWDOWN_REASONS):
                since = state.reason_since.get((gpu, reason))
                if since is not None:
                    lines.append(
                        _Line(90 - rank, f"gpu {gpu}: {reason} active for {_duration(now - since)}")
                    )
            clock = clocks.get(gpu)
            if clock is not None and gpu not in idle:
                ref, where = node_median, "node median"
                if ref is None or clock >= ref * (1 - self.clock_drop_ratio):
                    ref, where = self._peer_median_clock(node), "cluster median"
                if ref and clock < ref * (1 - self.clock_drop_ratio):
                    drop = 1 - clock / ref
                    lines.append(
                        _Line(
                            70 + drop,
                            f"gpu {gpu} SM clock {clock / 1e6:.0f} MHz, "
                            f"{drop * 100:.0f}% below {where}",
                        )
                    )
            temp = temps.get(gpu)
            hot = temp is not None and temp_median is not None
            if hot and temp - temp_median >= self.temperature_excess_c:
                text = f"gpu {gpu} at {temp:.0f} °C (node median {temp_median:.0f} °C)"
                lines.append(_Line(60, text))
            pending = latest.get(_key("epwatch_gpu_remapped_rows", {"gpu": gpu, "kind": "pending"}))
            if pending is not None and pending[0] > 0:
                lines.append(_Line(50, f"gpu {gpu} row remapping pending (reset needed)"))
            lines.extend(self._gpu_counter_lines(state, gpu, hang=False))
        return lines

    def _peer_median_clock(self, node: str) -> float | None:
        """Median busy SM clock over the other nodes: catches a whole node running slow."""
        values = []
        for other, state in self._nodes.items():
            if other == node:
                continue
            idle = {gpu for (gpu, reason) in state.reason_since if reason == "gpu_idle"}
            for labels, v in self._gauges(state, "epwatch_gpu_sm_clock_hertz").items():
                gpu = dict(labels)["gpu"]
                if gpu not in idle and gpu not in state.lost_since:
                    values.append(v)
        return statistics.median(values) if values else None

    def _gpu_counter_lines(self, state: _Node, gpu: str, hang: bool) -> list[_Line]:
        """XIDs, uncorrected ECC and NVLink errors that grew within the window."""
        lines = []
        for key in state.history:
            name, labels_t = key
            labels = dict(labels_t)
            if labels.get("gpu") != gpu:
                continue
            inc, span = self._increase(state, key)
            if name == "epwatch_gpu_xid_errors_total":
                xid = labels.get("xid", "?")
                if inc > 0:
                    lines.append(
                        _Line(
                            95 if hang else 55,
                            f"gpu {gpu} XID {xid} +{_sig(inc)} in {_duration(span)}",
                        )
                    )
                elif hang and state.history[key][-1][1] > 0:
                    lines.append(_Line(80, f"gpu {gpu} XID {xid} seen since agent start"))
            elif (
                inc > 0
                and name == "epwatch_gpu_ecc_errors_total"
                and labels.get("kind") == "uncorrected"
            ):
                lines.append(
                    _Line(58, f"gpu {gpu} uncorrected ECC +{_sig(inc)} in {_duration(span)}")
                )
            elif inc > 0 and name == "epwatch_gpu_nvlink_errors_total":
                kind = labels.get("kind", "")
                lines.append(
                    _Line(45, f"gpu {gpu} NVLink {kind} errors +{_sig(inc)} in {_duration(span)}")
                )
        return lines

    # --- network -----------------------------------------------------------------
    def _rates(
        self, state: _Node, name: str
    ) -> dict[tuple[str, str, str], tuple[float, float, float]]:
        """(device, port, kind) -> (per-second rate, increase, seconds) of a NIC counter."""
        out = {}
        for key in state.history:
            if key[0] != name:
                continue
            labels = dict(key[1])
            inc, span = self._increase(state, key)
            if span > 0:
                where = (labels.get("device", ""), labels.get("port", ""), labels.get("kind", ""))
                out[where] = (inc / span, inc, span)
        return out

    def _peer_rates(self, node: str, name: str) -> list[float]:
        """That counter's per-port rates on every other node (the fleet's normal)."""
        return [
            rate
            for other, state in self._nodes.items()
            if other != node
            for rate, _, _ in self._rates(state, name).values()
        ]

    def _notable(self, rate: float, floor: float, peers: list[float]) -> bool:
        """Above an absolute floor and, when other nodes report it, well above theirs."""
        if rate < floor:
            return False
        return not peers or rate >= self.peer_ratio * statistics.median(peers)

    def _network(self, node: str, state: _Node) -> list[_Line]:
        lines: list[_Line] = list(self._link_lines(node, state))
        errors = self._rates(state, "epwatch_nic_errors_total")
        for (dev, port, kind), (_, inc, span) in errors.items():
            if inc > 0 and kind not in _NOISY_ERRORS:
                lines.append(_Line(90, f"{dev}/{port} {kind} +{_sig(inc)} in {_duration(span)}"))
        for name, label, unit, floor, severity in (
            ("epwatch_nic_transmit_wait_total", "port_xmit_wait", " ticks/s",
             self.min_wait_ticks_per_s, 60),
            ("epwatch_nic_cnp_handled_total", "CNP handled", "/s", self.min_cnp_per_s, 55),
            ("epwatch_nic_cnp_sent_total", "CNP sent", "/s", self.min_cnp_per_s, 50),
            ("epwatch_nic_ecn_marked_packets_total", "ECN-marked", "/s", self.min_cnp_per_s, 48),
        ):  # fmt: skip
            peers = self._peer_rates(node, name)
            for (dev, port, _), (rate, _, _) in self._rates(state, name).items():
                if self._notable(rate, floor, peers):
                    text = f"{dev}/{port} {label} +{_sig(rate)}{unit}"
                    lines.append(_Line(severity + math.log10(rate) / 10, text))
        retrans = "epwatch_nic_retransmissions_total"
        peers_by_kind: dict[str, list[float]] = {}
        for other, other_state in self._nodes.items():
            if other != node:
                for (_, _, kind), (rate, _, _) in self._rates(other_state, retrans).items():
                    peers_by_kind.setdefault(kind, []).append(rate)
        for (dev, port, kind), (rate, inc, span) in self._rates(state, retrans).items():
            if kind in _HARD_RETRANSMISSIONS:
                if inc > 0:
                    text = f"{dev}/{port} {kind} +{_sig(inc)} in {_duration(span)}"
                    lines.append(_Line(85, text))
            elif self._notable(rate, self.min_cnp_per_s, peers_by_kind.get(kind, [])):
                lines.append(_Line(40, f"{dev}/{port} {kind} +{_sig(rate)}/s"))
        return lines

    def _link_lines(self, node: str, state: _Node) -> list[_Line]:
        """Ports that went down, and up ports slower than the node's (or fleet's) best."""
        lines = []
        up = {
            (d["device"], d["port"]): v
            for d, v in (
                (dict(labels), v)
                for labels, v in self._gauges(state, "epwatch_nic_link_up").items()
            )
        }
        for port_key, value in up.items():
            if not value and port_key in state.ever_up:
                lines.append(_Line(100, f"{port_key[0]}/{port_key[1]} link down"))
        # compare only HCA ports (those with a phys_state): an Ethernet management NIC
        # is slower than the RDMA NICs by design
        hca = {
            (d["device"], d["port"])
            for d in (dict(labels) for labels in self._gauges(state, "epwatch_nic_physical_state"))
        }
        rates = {
            (d["device"], d["port"]): v
            for d, v in (
                (dict(labels), v)
                for labels, v in self._gauges(
                    state, "epwatch_nic_link_rate_bytes_per_second"
                ).items()
            )
            if (d["device"], d["port"]) in hca and up.get((d["device"], d["port"]))
        }
        if not rates:
            return lines
        best = max(rates.values())
        fleet = self._peer_best_rate(node)
        for (dev, port), rate in rates.items():
            ref, where = best, "node max"
            if rate >= best and fleet is not None:
                ref, where = fleet, "cluster median"
            if rate < ref * 0.99:
                lines.append(
                    _Line(
                        75,
                        f"{dev}/{port} link rate {rate * 8 / 1e9:g} Gb/s "
                        f"({where} {ref * 8 / 1e9:g} Gb/s)",
                    )
                )
        return lines

    def _peer_best_rate(self, node: str) -> float | None:
        bests = []
        for other, state in self._nodes.items():
            if other == node:
                continue
            hca = {labels for labels in self._gauges(state, "epwatch_nic_physical_state")}
            up = self._gauges(state, "epwatch_nic_link_up")
            rates = [
                v
                for labels, v in self._gauges(
                    state, "epwatch_nic_link_rate_bytes_per_second"
                ).items()
                if labels in hca and up.get(labels)
            ]
            if rates:
                bests.append(max(rates))
        return statistics.median(bests) if bests else None

    # --- hang --------------------------------------------------------------------
    def _hang(self, node: str, state: _Node, local_device: int | None) -> list[_Line]:
        lines: list[_Line] = []
        silent = self.clock() - state.updated_s
        if silent > self.stale_after_s:
            lines.append(_Line(110, f"no node sample for {_duration(silent)}"))
        targets = self._target_gpus(state, local_device)
        for gpu in targets:
            if gpu in state.lost_since:
                since = state.lost_since[gpu]
                lines.append(_Line(100, f"gpu {gpu} lost for {_duration(state.updated_s - since)}"))
            lines.extend(self._gpu_counter_lines(state, gpu, hang=True))
        if local_device is not None:  # a lost neighbour can hang the whole node's NVLink
            for gpu, since in state.lost_since.items():
                if gpu not in targets:
                    lines.append(
                        _Line(
                            70,
                            f"gpu {gpu} (another rank's) lost for "
                            f"{_duration(state.updated_s - since)}",
                        )
                    )
        lines.extend(line for line in self._link_lines(node, state) if line.severity >= 100)
        return lines


def _gpu_order(gpu: str) -> tuple[int, str]:
    return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)
