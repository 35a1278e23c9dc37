"""netdev sampler against a fixture copy of /sys/class/net (and the real one)."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest

from epwatch.agent.samplers.base import run_sampler
from epwatch.agent.samplers.netdev import DEFAULT_EXCLUDE, NetdevSampler
from epwatch.agent.samplers.sysfs import read_sysfs
from tests.sysfs_removal import removed_files_answer_enodev

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


def _index(points):
    return {(p.name, tuple(sorted(p.labels.items()))): p.value for p in points}


def _key(name: str, **labels: str):
    return (name, tuple(sorted(labels.items())))


def test_statistics_operstate_and_speed():
    idx = _index(NetdevSampler(SYSFS).collect())
    eth0 = {"device": "eth0", "port": "1"}
    assert idx[_key("epwatch_nic_receive_bytes_total", **eth0)] == 987654321012
    assert idx[_key("epwatch_nic_transmit_bytes_total", **eth0)] == 123456789012
    assert idx[_key("epwatch_nic_receive_packets_total", **eth0)] == 812345678
    assert idx[_key("epwatch_nic_errors_total", kind="rx_crc_errors", **eth0)] == 2
    assert idx[_key("epwatch_nic_errors_total", kind="rx_dropped", **eth0)] == 17
    assert idx[_key("epwatch_nic_link_up", **eth0)] == 1.0
    # speed is Mb/s: 100000 Mb/s = 100 Gb/s = 12.5e9 bytes/s
    assert idx[_key("epwatch_nic_link_rate_bytes_per_second", **eth0)] == 12.5e9
    roce = {"device": "ens1f0np0", "port": "1"}
    assert idx[_key("epwatch_nic_link_rate_bytes_per_second", **roce)] == 25e9


def test_down_link_has_no_rate_and_lo_is_excluded():
    idx = _index(NetdevSampler(SYSFS).collect())
    assert idx[_key("epwatch_nic_link_up", device="eth1", port="1")] == 0.0
    assert _key("epwatch_nic_link_rate_bytes_per_second", device="eth1", port="1") not in idx
    assert not any(dict(labels)["device"] == "lo" for _, labels in idx)
    with_lo = _index(NetdevSampler(SYSFS, device_exclude=None).collect())
    assert with_lo[_key("epwatch_nic_receive_bytes_total", device="lo", port="1")] == 4242
    # lo's operstate is "unknown": the carrier decides
    assert with_lo[_key("epwatch_nic_link_up", device="lo", port="1")] == 1.0


def test_one_bad_file_drops_only_its_series():
    def reader(path: Path) -> str:
        if path.name == "tx_errors" and path.parent.parent.name == "eth0":
            raise OSError(errno.EIO, "Input/output error")
        if path.name == "speed":
            raise OSError(errno.EINVAL, "Invalid argument")  # what a down link answers
        return read_sysfs(path)

    result = run_sampler(NetdevSampler(SYSFS, reader=reader))
    assert result.ok
    idx = _index(result.points)
    full = _index(NetdevSampler(SYSFS).collect())
    missing = set(full) - set(idx)
    assert _key("epwatch_nic_errors_total", kind="tx_errors", device="eth0", port="1") in missing
    assert all(
        name == "epwatch_nic_link_rate_bytes_per_second"
        for name, _ in missing
        - {_key("epwatch_nic_errors_total", kind="tx_errors", device="eth0", port="1")}
    )
    assert idx[_key("epwatch_nic_errors_total", kind="rx_errors", device="eth0", port="1")] == 3
    # EIO is worth a note; EINVAL on speed is the normal answer of a link without one
    assert any("tx_errors" in s and "EIO" in s for s in result.skipped)
    assert not any("speed" in s for s in result.skipped)


@pytest.mark.parametrize(
    ("name", "excluded"),
    [
        ("lo", True),
        ("veth3f2a1b", True),
        ("cali12ab34cd", True),
        ("docker0", True),
        ("ifb0", True),
        ("eth0", False),
        ("ens1f0np0", False),
        ("ib0", False),
        ("bond0", False),
    ],
)
def test_default_exclude_skips_virtual_interfaces(name, excluded):
    assert bool(re.search(DEFAULT_EXCLUDE, name)) is excluded


def test_missing_class_net_is_unavailable(tmp_path):
    result = run_sampler(NetdevSampler(tmp_path))
    assert not result.ok
    assert "cannot list" in result.error


def test_real_sys_class_net_reads():
    """Whatever this machine has: at least one interface, all counters non-negative."""
    points = NetdevSampler("/sys", device_exclude=None).collect()
    assert any(p.name == "epwatch_nic_receive_bytes_total" for p in points)
    assert all(p.value >= 0 for p in points)


def test_interfaces_are_listed_every_round_their_statistics_once(tmp_path, monkeypatch):
    removed_files_answer_enodev(monkeypatch)
    shutil.copytree(SYSFS / "class" / "net", tmp_path / "class" / "net")
    net = tmp_path / "class" / "net"
    sampler = NetdevSampler(tmp_path)
    first = _index(sampler.collect())
    listed: list[str] = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listed.append(str(p)) or real_listdir(p))
    (net / "eth0" / "statistics" / "rx_bytes").write_text("5\n")
    second = _index(sampler.collect())
    assert listed == [str(net)]
    assert second[_key("epwatch_nic_receive_bytes_total", device="eth0", port="1")] == 5
    assert second.keys() == first.keys()
    # a new interface shows up at once; a vanished statistics file only drops its series
    shutil.copytree(net / "eth0", net / "eth7")
    (net / "eth0" / "statistics" / "rx_dropped").unlink()
    third = _index(sampler.collect())
    assert third[_key("epwatch_nic_receive_bytes_total", device="eth7", port="1")] == 5
    gone = _key("epwatch_nic_errors_total", kind="rx_dropped", device="eth0", port="1")
    assert gone not in third and gone in second
    assert set(third) - {gone} >= set(second) - {gone}
