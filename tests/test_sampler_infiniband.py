"""InfiniBand/RoCE sampler against a fixture copy of the kernel's sysfs layout.

The tree under tests/fixtures/sysfs/class/infiniband holds: a ConnectX-style NDR port
(mlx5_0) with port-level hw_counters, a RoCE device in switchdev mode (mlx5_1) whose
hw_counters exist only at device level and whose VL15_dropped cannot be read, an EFA
device with no counters/ directory, and a port that is down (mlx5_3).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from epwatch.agent.samplers.base import run_sampler
from epwatch.agent.samplers.infiniband import InfinibandSampler, parse_rate, parse_state
from epwatch.agent.samplers.sysfs import read_sysfs
from epwatch.catalogue import Kind, Point
from tests.sysfs_removal import removed_files_answer_enodev

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


def _index(points: list[Point]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for p in points:
        key = (p.name, tuple(sorted(p.labels.items())))
        assert key not in out, f"duplicate series {key}"
        out[key] = p.value
    return out


def _get(index, name: str, **labels: str) -> float:
    return index[(name, tuple(sorted(labels.items())))]


def _has(index, name: str, **labels: str) -> bool:
    return (name, tuple(sorted(labels.items()))) in index


@pytest.fixture
def points() -> list[Point]:
    sampler = InfinibandSampler(SYSFS)
    return sampler.collect()


def test_data_counters_are_4_byte_words(points):
    idx = _index(points)
    port = {"device": "mlx5_0", "port": "1"}
    assert _get(idx, "epwatch_nic_transmit_bytes_total", **port) == 123456789 * 4
    assert _get(idx, "epwatch_nic_receive_bytes_total", **port) == 987654321 * 4
    # packets and wait ticks are plain counts
    assert _get(idx, "epwatch_nic_transmit_packets_total", **port) == 11111111
    assert _get(idx, "epwatch_nic_receive_packets_total", **port) == 22222222
    assert _get(idx, "epwatch_nic_transmit_wait_total", **port) == 3141592


def test_state_phys_state_and_rate(points):
    idx = _index(points)
    port = {"device": "mlx5_0", "port": "1"}
    assert _get(idx, "epwatch_nic_link_up", **port) == 1.0
    assert _get(idx, "epwatch_nic_physical_state", **port) == 5
    assert _get(idx, "epwatch_nic_link_rate_bytes_per_second", **port) == 400e9 / 8
    assert _get(idx, "epwatch_nic_link_rate_bytes_per_second", device="mlx5_1", port="1") == 25e9
    down = {"device": "mlx5_3", "port": "1"}
    assert _get(idx, "epwatch_nic_link_up", **down) == 0.0
    assert _get(idx, "epwatch_nic_physical_state", **down) == 3


def test_error_counters_by_kind(points):
    idx = _index(points)
    port = {"device": "mlx5_0", "port": "1"}
    assert _get(idx, "epwatch_nic_errors_total", kind="symbol_error", **port) == 7
    assert _get(idx, "epwatch_nic_errors_total", kind="link_downed", **port) == 1
    assert _get(idx, "epwatch_nic_errors_total", kind="port_rcv_errors", **port) == 5
    assert _get(idx, "epwatch_nic_errors_total", kind="port_xmit_discards", **port) == 9
    assert _get(idx, "epwatch_nic_errors_total", kind="vl15_dropped", **port) == 0
    # unicast/multicast counters are not errors and are not exported
    assert not any("multicast" in p.labels.get("kind", "") for p in points)


def test_port_level_hw_counters(points):
    idx = _index(points)
    port = {"device": "mlx5_0", "port": "1"}
    assert _get(idx, "epwatch_nic_cnp_sent_total", **port) == 4000
    assert _get(idx, "epwatch_nic_cnp_handled_total", **port) == 12000
    assert _get(idx, "epwatch_nic_ecn_marked_packets_total", **port) == 3900
    retrans = "epwatch_nic_retransmissions_total"
    assert _get(idx, retrans, kind="out_of_sequence", **port) == 31
    assert _get(idx, retrans, kind="packet_seq_err", **port) == 4
    assert _get(idx, retrans, kind="local_ack_timeout_err", **port) == 6
    assert _get(idx, retrans, kind="roce_slow_restart", **port) == 8
    assert _get(idx, retrans, kind="rnr_nak_retry_err", **port) == 0
    # driver counters we do not know (lifespan, rx_write_requests) stay out
    assert not any(p.labels.get("kind") in ("lifespan", "rx_write_requests") for p in points)


def test_device_level_hw_counters_use_port_0(points):
    idx = _index(points)
    dev = {"device": "mlx5_1", "port": "0"}
    assert _get(idx, "epwatch_nic_cnp_sent_total", **dev) == 10
    assert _get(idx, "epwatch_nic_cnp_handled_total", **dev) == 20
    assert _get(idx, "epwatch_nic_ecn_marked_packets_total", **dev) == 30
    assert _get(idx, "epwatch_nic_retransmissions_total", kind="out_of_sequence", **dev) == 1
    assert not _has(idx, "epwatch_nic_cnp_sent_total", device="mlx5_1", port="1")


def test_unreadable_entry_drops_only_its_series():
    """mlx5_1's VL15_dropped is a directory in the fixture: reading fails with EISDIR."""
    sampler = InfinibandSampler(SYSFS)
    result = run_sampler(sampler)
    assert result.ok
    idx = _index(result.points)
    port = {"device": "mlx5_1", "port": "1"}
    assert not _has(idx, "epwatch_nic_errors_total", kind="vl15_dropped", **port)
    # every sibling in the same directory is still there
    assert _get(idx, "epwatch_nic_transmit_bytes_total", **port) == 4000
    assert _get(idx, "epwatch_nic_errors_total", kind="symbol_error", **port) == 0
    assert any("VL15_dropped" in s and "EISDIR" in s for s in result.skipped)


def test_einval_on_a_counter_drops_only_that_series():
    """ConnectX-7 answers EINVAL for VL15_dropped; a regular file cannot, so inject it."""
    calls: list[Path] = []

    def reader(path: Path) -> str:
        calls.append(path)
        if path.name == "VL15_dropped" and path.parent.parent.parent.parent.name == "mlx5_0":
            raise OSError(errno.EINVAL, "Invalid argument")
        return read_sysfs(path)

    sampler = InfinibandSampler(SYSFS, reader=reader)
    result = run_sampler(sampler)
    assert result.ok
    idx = _index(result.points)
    port = {"device": "mlx5_0", "port": "1"}
    assert not _has(idx, "epwatch_nic_errors_total", kind="vl15_dropped", **port)
    assert _get(idx, "epwatch_nic_errors_total", kind="symbol_error", **port) == 7
    assert _get(idx, "epwatch_nic_transmit_bytes_total", **port) == 123456789 * 4
    assert any("EINVAL" in s for s in result.skipped)
    clean = _index(InfinibandSampler(SYSFS).collect())
    assert len(clean) - len(idx) == 1  # exactly one series gone


def test_device_without_counters_directory():
    """EFA has only hw_counters: traffic comes from there, nothing is invented."""
    idx = _index(InfinibandSampler(SYSFS).collect())
    port = {"device": "efa_0", "port": "1"}
    assert _get(idx, "epwatch_nic_link_up", **port) == 1.0
    assert _get(idx, "epwatch_nic_transmit_bytes_total", **port) == 700000  # bytes, not words
    assert _get(idx, "epwatch_nic_receive_bytes_total", **port) == 800000
    assert _get(idx, "epwatch_nic_retransmissions_total", kind="retrans_pkts", **port) == 4
    assert _get(idx, "epwatch_nic_errors_total", kind="rx_drops", **port) == 3
    assert not _has(idx, "epwatch_nic_transmit_wait_total", **port)


def test_kinds_follow_the_catalogue(points):
    kinds = {p.name: p.kind for p in points}
    assert kinds["epwatch_nic_transmit_bytes_total"] is Kind.COUNTER
    assert kinds["epwatch_nic_link_up"] is Kind.GAUGE
    assert kinds["epwatch_nic_link_rate_bytes_per_second"] is Kind.GAUGE


def test_no_infiniband_class_is_unavailable(tmp_path):
    result = run_sampler(InfinibandSampler(tmp_path))
    assert not result.ok
    assert "no InfiniBand" in result.error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("400 Gb/sec (4X NDR)", 50e9),
        ("200 Gb/sec (2X NDR)", 25e9),
        ("2.5 Gb/sec (1X SDR)", 2.5e9 / 8),
        ("53.125 Gb/sec (1X HDR)", 53.125e9 / 8),
        ("garbage", None),
    ],
)
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


def test_parse_state():
    assert parse_state("4: ACTIVE") == (4, "ACTIVE")
    assert parse_state("5: LinkUp") == (5, "LinkUp")
    assert parse_state("ACTIVE") == (None, "ACTIVE")


def _copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(SYSFS / "class" / "infiniband", tmp_path / "class" / "infiniband")
    return tmp_path


def test_tree_is_listed_once_and_values_are_read_every_round(tmp_path, monkeypatch):
    root = _copy_tree(tmp_path)
    sampler = InfinibandSampler(root)
    first = _index(sampler.collect())
    listed: list[str] = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listed.append(str(p)) or real_listdir(p))
    data = root / "class/infiniband/mlx5_0/ports/1/counters/port_xmit_data"
    data.write_text("1000\n")
    second = _index(sampler.collect())
    assert listed == [str(root / "class" / "infiniband")]  # the HCA list only
    port = {"device": "mlx5_0", "port": "1"}
    assert _get(second, "epwatch_nic_transmit_bytes_total", **port) == 4000
    assert second.keys() == first.keys()


def test_new_hca_is_seen_in_the_next_round(tmp_path):
    root = _copy_tree(tmp_path)
    sampler = InfinibandSampler(root)
    sampler.collect()
    ib = root / "class" / "infiniband"
    shutil.copytree(ib / "mlx5_0", ib / "mlx5_9")
    idx = _index(sampler.collect())
    assert _get(idx, "epwatch_nic_transmit_bytes_total", device="mlx5_9", port="1") == 123456789 * 4
    shutil.rmtree(ib / "mlx5_9")
    assert not _has(_index(sampler.collect()), "epwatch_nic_link_up", device="mlx5_9", port="1")


def test_vanished_counter_drops_its_series_and_the_tree_is_listed_again(tmp_path, monkeypatch):
    removed_files_answer_enodev(monkeypatch)
    root = _copy_tree(tmp_path)
    sampler = InfinibandSampler(root)
    sampler.collect()
    counters = root / "class/infiniband/mlx5_0/ports/1/counters"
    (counters / "symbol_error").unlink()
    port = {"device": "mlx5_0", "port": "1"}
    result = run_sampler(sampler)
    assert result.ok
    assert not _has(_index(result.points), "epwatch_nic_errors_total", kind="symbol_error", **port)
    (counters / "symbol_error").write_text("9\n")  # back: listed again at once
    idx = _index(sampler.collect())
    assert _get(idx, "epwatch_nic_errors_total", kind="symbol_error", **port) == 9


def test_new_counter_file_is_seen_after_the_rescan_interval(tmp_path):
    root = _copy_tree(tmp_path)
    now = [0.0]
    sampler = InfinibandSampler(root, rescan_s=60.0, clock=lambda: now[0])
    sampler.collect()
    hw = root / "class/infiniband/mlx5_3/ports/1/hw_counters"
    hw.mkdir()
    (hw / "np_cnp_sent").write_text("5\n")
    port = {"device": "mlx5_3", "port": "1"}
    now[0] = 59.0
    assert not _has(_index(sampler.collect()), "epwatch_nic_cnp_sent_total", **port)
    now[0] = 60.0
    assert _get(_index(sampler.collect()), "epwatch_nic_cnp_sent_total", **port) == 5


def test_attribute_files_stay_open_between_rounds_and_close_with_the_sampler(tmp_path):
    root = _copy_tree(tmp_path)
    sampler = InfinibandSampler(root)
    opened = sampler.collect()
    kept = sampler._sysfs.open_files
    assert kept >= len(opened) - 10  # every value read, less unreadable files
    data = root / "class/infiniband/mlx5_0/ports/1/counters/port_xmit_data"
    data.write_text("2\n")  # rewritten in place, as sysfs values change
    idx = _index(sampler.collect())
    assert _get(idx, "epwatch_nic_transmit_bytes_total", device="mlx5_0", port="1") == 8
    assert sampler._sysfs.open_files == kept
    sampler.close()
    assert sampler._sysfs.open_files == 0


def test_unlistable_directory_is_noted_and_retried_every_round(tmp_path, monkeypatch):
    root = _copy_tree(tmp_path)
    counters = str(root / "class/infiniband/mlx5_0/ports/1/counters")
    real_listdir = os.listdir

    def listdir(path):
        if str(path) == counters:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    sampler = InfinibandSampler(root)
    port = {"device": "mlx5_0", "port": "1"}
    for _ in range(2):
        result = run_sampler(sampler)
        assert result.ok and any("EACCES" in s for s in result.skipped)
        assert not _has(_index(result.points), "epwatch_nic_transmit_bytes_total", **port)
    monkeypatch.setattr(os, "listdir", real_listdir)
    idx = _index(sampler.collect())
    assert _get(idx, "epwatch_nic_transmit_bytes_total", **port) == 123456789 * 4
