"""InfiniBand / RoCE HCA counters from ``/sys/class/infiniband``.

Layout (kernel rdma core)::

    <dev>/ports/<port>/state          "4: ACTIVE"
    <dev>/ports/<port>/phys_state     "5: LinkUp"
    <dev>/ports/<port>/rate           "400 Gb/sec (4X NDR)"
    <dev>/ports/<port>/counters/*     IBA PortCounters(Ext); *_data count 4-byte words
    <dev>/ports/<port>/hw_counters/*  driver counters (mlx5: CNP, ECN, retransmissions)
    <dev>/hw_counters/*               the same kind, device-wide, reported as port "0"
                                      (mlx5 in switchdev mode has only these)

Some files cannot be read on some HCAs (ConnectX-7 answers EINVAL for
``VL15_dropped``) and some devices have no ``counters`` at all: each unreadable file
drops only its own series. AWS EFA devices have only ``hw_counters`` (tx_bytes,
rx_bytes, retrans_pkts...); those fill the same series.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from epwatch.agent.samplers.base import Sampler, SamplerUnavailable
from epwatch.agent.samplers.sysfs import (
    FileReader,
    SysfsCache,
    describe_os_error,
    read_sysfs,
    sysfs_reader,
)
from epwatch.catalogue import METRICS, Kind, Point, metric

# counters/ file -> (metric, multiplier)
_COUNTERS: dict[str, tuple[str, int]] = {
    "port_xmit_data": ("epwatch_nic_transmit_bytes_total", 4),  # 4-byte words
    "port_rcv_data": ("epwatch_nic_receive_bytes_total", 4),
    "port_xmit_packets": ("epwatch_nic_transmit_packets_total", 1),
    "port_rcv_packets": ("epwatch_nic_receive_packets_total", 1),
    "port_xmit_wait": ("epwatch_nic_transmit_wait_total", 1),
}
# counters/ files that count errors (kind label = lower-cased file name)
_COUNTER_ERRORS = frozenset(
    {
        "symbol_error",
        "link_downed",
        "link_error_recovery",
        "port_rcv_errors",
        "port_rcv_remote_physical_errors",
        "port_rcv_switch_relay_errors",
        "port_xmit_discards",
        "port_xmit_constraint_errors",
        "port_rcv_constraint_errors",
        "local_link_integrity_errors",
        "excessive_buffer_overrun_errors",
        "VL15_dropped",
    }
)
# hw_counters/ files
_HW_SINGLE = {
    "np_cnp_sent": "epwatch_nic_cnp_sent_total",
    "rp_cnp_handled": "epwatch_nic_cnp_handled_total",
    "np_ecn_marked_roce_packets": "epwatch_nic_ecn_marked_packets_total",
}
_HW_RETRANSMISSIONS = frozenset(
    {
        "out_of_sequence",
        "packet_seq_err",
        "duplicate_request",
        "implied_nak_seq_err",
        "local_ack_timeout_err",
        "rnr_nak_retry_err",
        "roce_adp_retrans",
        "roce_adp_retrans_to",
        "roce_slow_restart",
        "req_rnr_retries_exceeded",
        "req_transport_retries_exceeded",
        "retrans_pkts",  # EFA (SRD)
        "retrans_timeout_events",  # EFA
        "unresponsive_remote_events",  # EFA
    }
)
# Traffic in hw_counters/ (EFA has no counters/ directory); used only when counters/
# did not already give the same series, so nothing is counted twice.
_HW_TRAFFIC = {
    "tx_bytes": "epwatch_nic_transmit_bytes_total",
    "rx_bytes": "epwatch_nic_receive_bytes_total",
    "tx_pkts": "epwatch_nic_transmit_packets_total",
    "rx_pkts": "epwatch_nic_receive_packets_total",
}
_HW_ERRORS = frozenset(
    {
        "out_of_buffer",  # receive WQEs exhausted: the receiver drops (slow consumer)
        "rx_drops",  # EFA
        "req_cqe_error",
        "resp_cqe_error",
        "req_remote_access_errors",
        "req_remote_invalid_request",
        "resp_remote_access_errors",
        "resp_local_length_error",
        "rx_icrc_encapsulated",
    }
)

_ACTIVE = 4  # IB PortState ACTIVE
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")
DEVICE_PORT = "0"


def parse_state(text: str) -> tuple[int | None, str]:
    """``"4: ACTIVE"`` -> ``(4, "ACTIVE")``; tolerant of a missing code."""
    code, _, name = text.partition(":")
    if not name:
        return None, text.strip()
    try:
        return int(code.strip()), name.strip()
    except ValueError:
        return None, name.strip()


def parse_rate(text: str) -> float | None:
    """``"400 Gb/sec (4X NDR)"`` -> 5e10 bytes/s."""
    match = _RATE.match(text)
    return float(match.group(1)) * 1e9 / 8 if match else None


class _Series(NamedTuple):
    """One counter file and the point it becomes (``unless``: skip if that name was read)."""

    path: str
    name: str
    labels: dict[str, str]
    kind: Kind
    help: str
    scale: int = 1
    unless: str | None = None


def _series(
    path: str, name: str, labels: dict[str, str], scale: int = 1, unless: str | None = None
) -> _Series:
    kind, help_text = METRICS[name]
    return _Series(path, name, labels, kind, help_text, scale, unless)


def _counter_series(directory: str, files: Iterable[str], port: dict[str, str]) -> list[_Series]:
    """``counters/``: IBA PortCounters; data counters in 4-byte words."""
    out = []
    for filename in files:
        path = f"{directory}/{filename}"
        if filename in _COUNTERS:
            name, scale = _COUNTERS[filename]
            out.append(_series(path, name, port, scale))
        elif filename in _COUNTER_ERRORS:
            labels = {"kind": filename.lower(), **port}
            out.append(_series(path, "epwatch_nic_errors_total", labels))
    return out


def _hw_series(directory: str, files: Iterable[str], port: dict[str, str]) -> list[_Series]:
    """``hw_counters/``: driver counters; unknown ones stay out (bounded cardinality)."""
    out = []
    for filename in files:
        path = f"{directory}/{filename}"
        if filename in _HW_TRAFFIC:
            name = _HW_TRAFFIC[filename]
            out.append(_series(path, name, port, unless=name))
        elif filename in _HW_SINGLE:
            out.append(_series(path, _HW_SINGLE[filename], port))
        elif filename in _HW_RETRANSMISSIONS:
            labels = {"kind": filename, **port}
            out.append(_series(path, "epwatch_nic_retransmissions_total", labels))
        elif filename in _HW_ERRORS:
            out.append(_series(path, "epwatch_nic_errors_total", {"kind": filename, **port}))
    return out


class InfinibandSampler(Sampler):
    """Every HCA port under ``<sysfs_root>/class/infiniband``.

    The list of HCAs is read every round; each HCA's ports and counter files are
    listed once and kept (:class:`~agent.samplers.base.SysfsCache`, ``rescan_s``).
    """

    name = "infiniband"

    def __init__(
        self,
        sysfs_root: str | Path = "/sys",
        reader: FileReader = read_sysfs,
        rescan_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.base = Path(sysfs_root) / "class" / "infiniband"
        self.read = reader
        self._base = str(self.base)
        self._sysfs = SysfsCache(rescan_s, clock)
        self._read = sysfs_reader(reader, self._sysfs)
        self._devices: list[str] = []
        self._plans: dict[str, list[_Series]] = {}
        self._plans_generation = -1

    def collect(self) -> list[Point]:
        try:
            devices = sorted(os.listdir(self._base))
        except FileNotFoundError as exc:
            raise SamplerUnavailable(f"no InfiniBand/RoCE devices ({self.base} absent)") from exc
        except OSError as exc:
            raise SamplerUnavailable(f"cannot list {self.base}: {describe_os_error(exc)}") from exc
        if devices != self._devices:
            self._devices = devices
            self._sysfs.invalidate()  # an HCA came or went: list its tree again
        self._sysfs.start_round()
        points: list[Point] = []
        for dev in devices:
            ports_dir = f"{self._base}/{dev}/ports"
            for port in self._listdir(ports_dir):
                points.extend(self._port(dev, port, f"{ports_dir}/{port}"))
            points.extend(self._hw_counters(dev, DEVICE_PORT, f"{self._base}/{dev}/hw_counters"))
        return points

    def close(self) -> None:
        """Close the attribute files kept open between rounds."""
        self._sysfs.close()

    def _listdir(self, path: str) -> tuple[str, ...]:
        try:
            return self._sysfs.listdir(path)
        except OSError as exc:
            self.skip(path, describe_os_error(exc))
            return ()

    def _value(self, path: str) -> str | None:
        try:
            return self._read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:  # EINVAL, EISDIR, EACCES...: drop this series only
            self.skip(path, describe_os_error(exc))
            return None

    def _port(self, dev: str, port: str, root: str) -> list[Point]:
        labels = {"device": dev, "port": port}
        points: list[Point] = []
        state = self._value(f"{root}/state")
        if state is not None:
            code, name = parse_state(state)
            active = code == _ACTIVE if code is not None else name.upper() == "ACTIVE"
            points.append(metric("epwatch_nic_link_up", 1.0 if active else 0.0, **labels))
        phys = self._value(f"{root}/phys_state")
        if phys is not None:
            code, _ = parse_state(phys)
            if code is not None:
                points.append(metric("epwatch_nic_physical_state", code, **labels))
        rate_text = self._value(f"{root}/rate")
        if rate_text is not None:
            rate = parse_rate(rate_text)
            if rate is None:
                self.skip(f"{root}/rate", f"unparsable rate {rate_text!r}")
            else:
                points.append(metric("epwatch_nic_link_rate_bytes_per_second", rate, **labels))
        self._read_series(self._plan(f"{root}/counters", dev, port, _counter_series), points)
        have = {p.name for p in points}
        hw = self._plan(f"{root}/hw_counters", dev, port, _hw_series)
        self._read_series(hw, points, have)
        return points

    def _hw_counters(self, dev: str, port: str, root: str) -> list[Point]:
        points: list[Point] = []
        self._read_series(self._plan(root, dev, port, _hw_series), points)
        return points

    def _plan(
        self, directory: str, dev: str, port: str, classify: Callable[..., list[_Series]]
    ) -> list[_Series]:
        """The series to read from ``directory`` each round, built from its listing once."""
        if self._plans_generation != self._sysfs.generation:
            self._plans.clear()
            self._plans_generation = self._sysfs.generation
        plan = self._plans.get(directory)
        if plan is None:
            try:
                files = self._sysfs.listdir(directory)
            except OSError as exc:  # not kept: tried (and noted) again next round
                self.skip(directory, describe_os_error(exc))
                return []
            plan = self._plans[directory] = classify(
                directory, files, {"device": dev, "port": port}
            )
        return plan

    def _read_series(
        self, series: list[_Series], points: list[Point], have: set[str] | None = None
    ) -> None:
        """Read each listed counter into a point; a bad file drops only its series."""
        read = self._read
        for s in series:
            if s.unless is not None and have is not None and s.unless in have:
                continue  # traffic already counted from counters/
            try:
                text = read(s.path)
            except FileNotFoundError:  # listed, now gone: the tree changed
                self._sysfs.invalidate()
                continue
            except OSError as exc:  # EINVAL, EISDIR, EACCES...
                self.skip(s.path, describe_os_error(exc))
                continue
            try:
                value = int(text, 10)
            except ValueError:
                self.skip(s.path, f"not a number: {text!r}")
                continue
            points.append(Point(s.name, s.labels, float(value * s.scale), s.kind, s.help))
