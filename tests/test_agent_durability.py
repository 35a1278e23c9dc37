"""The spool's byte bound, --spool-dir (append-only, checksummed, survives a kill), the
crash-loss ledger, splitting messages a collector refuses as too large, and the
recorder's complete-files-only rule with replay skipping what a crash left."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from epwatch import wire
from epwatch.agent.daemon import Agent, AgentConfig
from epwatch.agent.ledger import LossLedger
from epwatch.agent.split import split_payload
from epwatch.agent.spool import Spool
from epwatch.agent.spool_disk import SpoolStore, SpoolStoreError
from epwatch.collector.recorder import Recorder, RecorderConfig, RecorderError
from epwatch.collector.replay import read_recording
from epwatch.frames import FrameSender, hook_frame
from epwatch.protos import epwatch_pb2 as pb
from tests.helpers import make_peer_rows, make_records, start_collector, value, wait_for

pytestmark = pytest.mark.timeout(60)


def payload(n: int, step0: int = 0) -> bytes:
    batch = wire.encode_records("g", 16, make_records(n, 16, step0=step0))
    return pb.AgentMessage(batch=batch).SerializeToString()


def test_spool_is_bounded_by_real_message_bytes() -> None:
    spool = Spool(max_records=1_000_000, max_bytes=1 << 20)
    rows = make_peer_rows(64, 512)
    big = pb.AgentMessage(
        batch=wire.encode_records("g", 512, make_records(0, 512), rows)
    ).SerializeToString()
    for _ in range(10):
        spool.put(big, 0)  # 263 KB each, no records: a message costs its real size
    assert len(big) > 256 << 10
    assert spool.bytes <= 1 << 20 and len(spool) == 3
    assert spool.counters.messages_dropped["spool_full"] == 7


def test_store_survives_a_kill_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "spool")
    spool = Spool(1_000_000, store=store)
    seqs = [spool.put(payload(8, i), 8) for i in range(5)]
    taken = spool.take(8, timeout=0)
    assert taken is not None
    spool.ack(taken.seq, ok=True)  # seq 1 done
    # No close(): the process "dies" here. A crash mid-write leaves half a record.
    seg = sorted((tmp_path / "spool").glob("seg-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"EPWS\x07\x00")
    again = Spool(1_000_000, store=SpoolStore(tmp_path / "spool"))
    assert again.recovered_messages == 4 and again.recovered_records == 32
    assert again._store.corrupt_tails == 1
    resent = [again.take(8, timeout=0) for _ in range(4)]
    assert [e.seq for e in resent] == seqs[1:]
    assert resent[0].payload == payload(8, 1)
    assert again.put(payload(1), 1) == seqs[-1] + 1  # seqs go on, never reused


def test_store_drops_a_corrupt_record_and_keeps_earlier_ones(tmp_path: Path) -> None:
    spool = Spool(1_000_000, store=SpoolStore(tmp_path))
    for i in range(3):
        spool.put(payload(4, i), 4)
    seg = next(tmp_path.glob("seg-*.log"))
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # a bit flip in the last record's payload
    seg.write_bytes(bytes(data))
    again = Spool(1_000_000, store=SpoolStore(tmp_path))
    assert again.recovered_messages == 2


def test_store_deletes_finished_segments_and_compacts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("epwatch.agent.spool_disk.SEGMENT_BYTES", 4096)
    spool = Spool(1_000_000, store=SpoolStore(tmp_path))
    for i in range(200):
        spool.put(payload(16, i), 16)
        entry = spool.take(8, timeout=0)
        spool.ack(entry.seq, ok=True)
    assert len(list(tmp_path.glob("seg-*.log"))) <= 2
    assert (tmp_path / "done.log").stat().st_size < 4 * 16 * 1024
    assert Spool(1_000_000, store=SpoolStore(tmp_path)).recovered_messages == 0


def test_unwritable_spool_folder_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolStoreError, match="not writable"):
        SpoolStore(blocker / "spool")


def test_loss_ledger_counts_what_a_crash_took(tmp_path: Path, caplog) -> None:
    path = str(tmp_path / "state")
    first = LossLedger(path, min_interval_s=0)
    first.update(1234)  # the process dies with 1234 records not durable
    with caplog.at_level(logging.WARNING):
        assert LossLedger(path).lost_at_start == 1234
    assert "did not stop cleanly" in caplog.text
    clean = LossLedger(path, min_interval_s=0)
    clean.update(0, clean=True, force=True)
    assert LossLedger(path).lost_at_start == 0


def test_agent_counts_a_previous_crash_and_resends_from_its_spool_dir(tmp_path: Path) -> None:
    svc = start_collector(metrics=False)
    spool_dir = tmp_path / "spool"
    sock = str(tmp_path / "a.sock")
    config = AgentConfig(
        node="n0",
        socket_path=sock,
        collector="127.0.0.1:1",
        spool_dir=str(spool_dir),
        flush_interval_s=0.05,
    )
    first = Agent(config)
    first.start()
    with FrameSender(sock) as s:
        s.send(hook_frame("g", 16, make_records(96, 16)))
    wait_for(lambda: first.spool.records == 96)
    first.receiver.stop()  # "killed": nothing else is shut down, nothing flushed
    first.shipper.stop()
    second = Agent(AgentConfig(**{**config.__dict__, "collector": f"127.0.0.1:{svc.grpc_port}"}))
    assert second.agent_id == first.agent_id  # same (agent_id, seq) space: resends dedupe
    second.start()
    try:
        wait_for(lambda: second.spool.counters.records_delivered == 96)
        total = value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group="g")
        assert total == 96
    finally:
        second.stop()
        svc.stop(grace_s=0.2)


def test_oversized_batches_are_split_to_fit() -> None:
    records = make_records(40_000, 16)
    raw = pb.AgentMessage(batch=wire.encode_records("g", 16, records)).SerializeToString()
    parts = split_payload(raw, 1 << 20)
    assert parts and all(len(p) <= 1 << 20 for p, _ in parts)
    assert sum(n for _, n in parts) == 40_000
    decoded = [wire.decode_batch(pb.AgentMessage.FromString(p).batch).records for p, _ in parts]
    assert np.array_equal(np.concatenate([r.step for r in decoded]), records.step)
    # One per-peer row larger than the limit cannot be split: the caller drops it.
    rows = make_peer_rows(1, 4096)
    one = pb.AgentMessage(batch=wire.encode_records("g", 4096, make_records(0, 4096), rows))
    assert split_payload(one.SerializeToString(), 16 << 10) is None


def test_agent_splits_what_the_collector_says_is_too_large(tmp_path: Path) -> None:
    svc = start_collector(max_message_bytes=256 << 10)
    sock = str(tmp_path / "a.sock")
    agent = Agent(
        AgentConfig(
            node="n0",
            socket_path=sock,
            flush_interval_s=0.05,
            collector=f"127.0.0.1:{svc.grpc_port}",
        )
    )
    agent.start()
    try:
        with FrameSender(sock) as s:
            s.send(hook_frame("g", 16, make_records(16_000, 16)))  # ~0.9 MB as one batch
        wait_for(lambda: agent.spool.counters.records_delivered == 16_000)
        assert agent.spool.counters.messages_split >= 1
        assert agent.shipper.reconnects == 0 and agent.spool.counters.records_rejected == 0
        assert value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group="g") == 16_000
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


# --- recorder and replay ----------------------------------------------------------------
def test_recorder_refuses_an_unwritable_folder_at_start(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecorderError, match="not writable"):
        Recorder(RecorderConfig(str(blocker / "rec")), lambda n: None)


def test_recorder_removes_stale_partials_and_never_names_a_broken_file(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    stale = tmp_path / "records-20260101T000000Z-999999999-0001.parquet.partial"
    stale.write_bytes(b"")
    dropped: list[int] = []
    rec = Recorder(RecorderConfig(str(tmp_path), flush_seconds=0.0), dropped.append)
    assert not stale.exists()
    rec.start()
    rec.put("g", "n0", 16, make_records(64, 16))
    wait_for(lambda: rec._writer is not None)

    class FullDisk:  # the writer's close (footer) fails as on a full disk
        def __init__(self, inner):
            self.inner = inner

        def write_table(self, table):
            raise OSError(28, "No space left on device")

        def close(self):
            self.inner.close()
            raise OSError(28, "No space left on device")

    rec._writer = FullDisk(rec._writer)
    rec.put("g", "n0", 16, make_records(32, 16))
    rec.stop()
    assert list(tmp_path.iterdir()) == []  # no final name, no partial left behind
    assert sum(dropped) == 96


def test_replay_skips_a_corrupt_file_and_reads_the_rest(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    rec = Recorder(RecorderConfig(str(tmp_path), flush_seconds=0.0), lambda n: None)
    rec.start()
    rec.put("g", "n0", 16, make_records(64, 16))
    rec.stop()
    good = next(tmp_path.glob("*.parquet"))
    truncated = tmp_path / "records-truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    skipped: list[tuple[Path, str]] = []
    table = read_recording(sorted(tmp_path.glob("*.parquet")), skipped)
    assert table.num_rows == 64
    assert [p.name for p, _ in skipped] == [truncated.name]
    assert os.path.exists(good)


def test_a_spool_below_four_batches_ships_smaller_batches(tmp_path: Path, caplog) -> None:
    """--spool-records below a flush's worth used to make one message larger than the
    whole spool, dropped at once even while connected; batches now fit four times."""
    config = AgentConfig(
        node="n0",
        socket_path=str(tmp_path / "a.sock"),
        spool_records=400,
        batch_records=16_384,
        collector="127.0.0.1:1",
    )
    with caplog.at_level(logging.WARNING):
        agent = Agent(config)
    assert "holds less than four batches" in caplog.text
    agent.batcher.add("g", 16, make_records(1000, 16), None, None)
    agent.batcher.flush()
    sizes = [e.records for e in agent.spool._entries.values()]
    assert sizes == [100] * 4  # the newest 400 records kept, not all 1000 dropped
    assert agent.spool.counters.records_dropped == 600
    agent.receiver._listener.close()  # never started: only the socket to release
