"""The Parquet recorder: what goes in comes out (records and per-peer rows), files
rotate, overload is counted."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from epwatch import wire
from epwatch.collector.recorder import Recorder, RecorderConfig, Recording
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import PeerRows
from tests.helpers import make_records, start_collector, stub

pq = pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.timeout(60)


def test_round_trip_and_rotation_by_size(tmp_path: Path) -> None:
    dropped: list[int] = []
    cfg = RecorderConfig(
        str(tmp_path), max_file_bytes=1, row_group_records=1000, flush_seconds=0.01
    )
    rec = Recorder(cfg, dropped.append)
    rec.start()
    batches = [make_records(1000, 16, step0=i * 100) for i in range(5)]
    for i, batch in enumerate(batches):
        rec.put("g", f"n{i % 2}", 16, batch)
    rec.stop()
    files = sorted(tmp_path.glob("*.parquet"))
    assert len(files) >= 2 and not list(tmp_path.glob("*.partial"))
    table = pq.read_table(files)
    assert table.num_rows == 5000 and not dropped
    assert set(table.column("node").to_pylist()) == {"n0", "n1"}
    for name in ("step", "rank", "exit_ns"):
        got = np.sort(table.column(name).to_numpy())
        want = np.sort(np.concatenate([getattr(b, name) for b in batches]))
        np.testing.assert_array_equal(got, want)


def test_rotation_by_age(tmp_path: Path) -> None:
    cfg = RecorderConfig(str(tmp_path), max_file_seconds=0.0, row_group_records=1, flush_seconds=0)
    rec = Recorder(cfg, lambda n: None)
    rec.start()
    rec.put("g", "n", 16, make_records(10))
    rec.put("g", "n", 16, make_records(10))
    rec.stop()
    assert len(list(tmp_path.glob("*.parquet"))) == 2


def test_overload_is_counted_not_blocking(tmp_path: Path) -> None:
    dropped: list[int] = []
    rec = Recorder(RecorderConfig(str(tmp_path), queue_records=100), dropped.append)
    rec.put("g", "n", 16, make_records(80))  # not started: nothing drains the queue
    rec.put("g", "n", 16, make_records(80))
    assert dropped == [80]
    rec.start()
    rec.stop()
    assert pq.read_table(sorted(tmp_path.glob("*.parquet"))).num_rows == 80


def _peer_rows(n: int, world_size: int, step0: int = 0) -> PeerRows:
    rng = np.random.default_rng(n)
    return PeerRows(
        rank=(np.arange(n) % world_size).astype("<i4"),
        step=np.full(n, step0, dtype="<i8"),
        layer=np.full(n, 3, dtype="<i4"),
        phase=(np.arange(n) % 2).astype("<u1"),
        wait_s=rng.uniform(0, 1e-3, (n, world_size)),
        send_bytes=rng.integers(0, 1 << 20, (n, world_size)),
    )


def test_the_collector_records_peer_rows_beside_their_records(tmp_path: Path) -> None:
    """Through the real ingest path: a batch with per-peer rows lands in a peers-*
    file, stamped with the same receive time as its records."""
    svc = start_collector(record=RecorderConfig(str(tmp_path), flush_seconds=0.01))
    rows = _peer_rows(6, 16)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as channel:
            batch = wire.encode_records("g", 16, make_records(64), rows)
            ack = stub(channel).Push(pb.AgentMessage(agent_id="a", node="n1", seq=1, batch=batch))
            assert ack.code == 0, ack.message
    finally:
        svc.stop(grace_s=0.2)
    (records_file,) = tmp_path.glob("records-*.parquet")
    (peers_file,) = tmp_path.glob("peers-*.parquet")
    records, peers = pq.read_table(records_file), pq.read_table(peers_file)
    assert records.num_rows == 64 and peers.num_rows == 6
    assert set(peers.column("received_unix_ns").to_pylist()) == set(
        records.column("received_unix_ns").to_pylist()
    )
    assert peers.column("node").to_pylist() == ["n1"] * 6
    np.testing.assert_array_equal(np.array(peers.column("wait_s").to_pylist()), rows.wait_s)
    np.testing.assert_array_equal(
        np.array(peers.column("send_bytes").to_pylist()), rows.send_bytes
    )
    np.testing.assert_array_equal(peers.column("phase").to_numpy(), rows.phase)


def test_peer_rows_count_against_the_queue_by_their_size(tmp_path: Path) -> None:
    """A per-peer row of P ranks holds 2 P values: it takes about P / 4 records' worth
    of the queue, so wide rows cannot grow memory past the bound."""
    dropped: list[int] = []
    rec = Recording(RecorderConfig(str(tmp_path), queue_records=1000), dropped.append)
    rec.put("g", "n", 256, make_records(10, 256), _peer_rows(10, 256))  # 10 * 65 = 650
    rec.put("g", "n", 256, make_records(10, 256), _peer_rows(10, 256))  # would be 1300
    assert dropped == [10]  # the second batch's peer rows; its records fit
    rec.start()
    rec.stop()
    assert pq.read_table(sorted(tmp_path.glob("records-*.parquet"))).num_rows == 20
    assert pq.read_table(sorted(tmp_path.glob("peers-*.parquet"))).num_rows == 10


def test_a_failed_folder_sync_after_the_rename_keeps_the_file_and_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The file has its final name once renamed: a failing fsync of the folder after
    that is logged, but the rows are not counted as dropped and the file is listed."""
    from epwatch.collector import recorder as recorder_module

    real = recorder_module.fsync_path

    def no_folder_sync(path: str) -> None:
        if Path(path) == tmp_path:
            raise OSError(5, "Input/output error")
        real(path)

    dropped: list[int] = []
    rec = Recorder(RecorderConfig(str(tmp_path), flush_seconds=0.01), dropped.append)
    monkeypatch.setattr(recorder_module, "fsync_path", no_folder_sync)
    rec.start()
    rec.put("g", "n", 16, make_records(50))
    rec.stop()
    (final,) = tmp_path.glob("records-*.parquet")
    assert not list(tmp_path.glob("*.partial"))
    assert dropped == [] and rec.files == [str(final)]
    assert pq.read_table(final).num_rows == 50
    assert "syncing the folder" in caplog.text
