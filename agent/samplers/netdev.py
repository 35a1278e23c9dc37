"""Ethernet (and any netdev) counters from ``/sys/class/net/<if>/``.

Like node_exporter's netdev collector it reads ``statistics/*`` plus ``operstate`` and
``speed``. A RoCE NIC shows up here too (its bytes include RDMA traffic on most
drivers); its RDMA-specific counters come from the infiniband sampler. One unreadable
file drops only its own series: ``speed`` of a down link answers EINVAL, for example.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from epwatch.agent.samplers.base import Sampler, SamplerUnavailable
from epwatch.agent.samplers.sysfs import (
    FileReader,
    SysfsCache,
    describe_os_error,
    read_sysfs,
    sysfs_reader,
)
from epwatch.catalogue import Point, metric

# statistics file -> metric (all counters); error files go to epwatch_nic_errors_total.
_TRAFFIC = {
    "tx_bytes": "epwatch_nic_transmit_bytes_total",
    "rx_bytes": "epwatch_nic_receive_bytes_total",
    "tx_packets": "epwatch_nic_transmit_packets_total",
    "rx_packets": "epwatch_nic_receive_packets_total",
}
_ERRORS = (
    "rx_errors",
    "tx_errors",
    "rx_dropped",
    "tx_dropped",
    "rx_crc_errors",
    "rx_frame_errors",
    "rx_length_errors",
    "rx_missed_errors",
    "rx_over_errors",
    "rx_fifo_errors",
    "tx_fifo_errors",
    "tx_carrier_errors",
    "tx_aborted_errors",
)
# Ethernet interfaces expose one "port" each; the label keeps NIC series uniform.
PORT = "1"
# Loopback and the per-container virtual interfaces of a Kubernetes/Docker host: they
# carry no EP traffic and can number in the hundreds (bounded cardinality).
DEFAULT_EXCLUDE = r"^(lo|veth.*|cali.*|flannel.*|cni.*|docker\d*|br-.*|virbr.*|ifb\d*|tunl\d*)$"


class NetdevSampler(Sampler):
    """Counters of every interface under ``<sysfs_root>/class/net``.

    The list of interfaces is read every round (virtual ones come and go); each
    interface's ``statistics`` listing is kept (:class:`~agent.samplers.base.SysfsCache`).
    """

    name = "netdev"

    def __init__(
        self,
        sysfs_root: str | Path = "/sys",
        device_exclude: str | None = DEFAULT_EXCLUDE,
        reader: FileReader = read_sysfs,
        rescan_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.base = Path(sysfs_root) / "class" / "net"
        self.exclude = re.compile(device_exclude) if device_exclude else None
        self.read = reader
        self._base = str(self.base)
        self._sysfs = SysfsCache(rescan_s, clock)
        self._read = sysfs_reader(reader, self._sysfs)
        self._devices: list[str] = []

    def collect(self) -> list[Point]:
        try:
            listed = sorted(os.listdir(self._base))
        except OSError as exc:
            raise SamplerUnavailable(f"cannot list {self.base}: {describe_os_error(exc)}") from exc
        devices = [d for d in listed if self.exclude is None or not self.exclude.search(d)]
        if devices != self._devices:
            self._devices = devices
            self._sysfs.invalidate()  # an interface came or went: list it again
        self._sysfs.start_round()
        points: list[Point] = []
        for dev in devices:
            points.extend(self._device(dev))
        return points

    def close(self) -> None:
        """Close the attribute files kept open between rounds."""
        self._sysfs.close()

    def _value(self, path: str, quiet: tuple[int, ...] = ()) -> str | None:
        """The file's text; None (and a note unless absent or expected) if unreadable."""
        try:
            return self._read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in quiet:
                self.skip(path, describe_os_error(exc))
            return None

    def _device(self, dev: str) -> list[Point]:
        root = f"{self._base}/{dev}"
        points: list[Point] = []
        stats = f"{root}/statistics"
        try:
            present = self._sysfs.listdir(stats)
        except OSError as exc:
            self.skip(stats, describe_os_error(exc))
            present = ()
        for filename in present:
            name = _TRAFFIC.get(filename)
            if name is None and filename not in _ERRORS:
                continue
            path = f"{stats}/{filename}"
            try:
                text: str | None = self._read(path)
            except FileNotFoundError:
                self._sysfs.invalidate()  # listed, now gone: the interface changed
                continue
            except OSError as exc:
                self.skip(path, describe_os_error(exc))
                continue
            value = _int(text)
            if value is None:
                self.skip(path, f"not a number: {text!r}")
                continue
            if name is not None:
                points.append(metric(name, value, device=dev, port=PORT))
            else:
                points.append(
                    metric("epwatch_nic_errors_total", value, device=dev, port=PORT, kind=filename)
                )
        state = self._value(f"{root}/operstate")
        if state is not None:
            up = state == "up"
            if state == "unknown":  # virtual and some tunnel devices: trust the carrier
                up = self._value(f"{root}/carrier") == "1"
            points.append(metric("epwatch_nic_link_up", 1.0 if up else 0.0, device=dev, port=PORT))
        speed = _int(self._value(f"{root}/speed", quiet=(errno.EINVAL,)))
        if speed is not None and speed > 0:  # Mb/s; -1 or EINVAL when unknown / down
            rate = speed * 1e6 / 8
            points.append(
                metric("epwatch_nic_link_rate_bytes_per_second", rate, device=dev, port=PORT)
            )
        return points


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 10)
    except ValueError:
        return None
