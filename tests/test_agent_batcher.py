"""The agent's batcher: frames of many ranks merged into few messages, nothing lost."""

from __future__ import annotations

import numpy as np

from epwatch import wire
from epwatch.agent.batcher import Batcher
from epwatch.agent.spool import Spool
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import PeerRows, RecordColumns

P = 4


def records(rank: int, n: int = 6) -> RecordColumns:
    i = np.arange(n)
    return RecordColumns.from_arrays(
        rank=np.full(n, rank), local_device=np.full(n, rank), step=i // 2, layer=np.zeros(n),
        phase=i % 2, enter_ns=i * 10, exit_ns=i * 10 + 5, send_bytes=np.full(n, 100),
        recv_bytes=np.full(n, 100), recv_tokens=np.full(n, 3),
    )  # fmt: skip


def rows(rank: int, wait: bool, send: bool) -> PeerRows:
    one = np.array([rank])
    return PeerRows(
        rank=one, step=np.array([0]), layer=np.array([0]), phase=np.array([0], dtype="<u1"),
        wait_s=np.full((1, P), 1e-4) if wait else np.empty((1, 0)),
        send_bytes=np.full((1, P), 64, dtype="<i8") if send else np.empty((1, 0), dtype="<i8"),
    )  # fmt: skip


def shipped(spool: Spool) -> list[pb.RecordBatch]:
    out = []
    while (entry := spool.take(max_inflight=1000, timeout=0)) is not None:
        out.append(pb.AgentMessage.FromString(entry.payload).batch)
    return out


def test_peer_rows_of_both_kinds_travel_with_every_record() -> None:
    """DeepEP's normal mode sends per-destination bytes, low-latency mode per-source
    waits; a node running both must not lose either."""
    spool = Spool(10_000)
    batcher = Batcher(spool, batch_records=1000)
    batcher.add("ep0", P, records(0), rows(0, wait=True, send=False), None)
    batcher.add("ep0", P, records(1), rows(1, wait=False, send=True), None)
    batcher.add("ep0", P, records(2), rows(2, wait=True, send=False), None)
    batcher.flush()
    batches = shipped(spool)
    assert sum(b.count for b in batches) == 18
    peer = [wire.decode_peer_rows(b) for b in batches if b.HasField("peer_rows")]
    waits = sorted(int(r) for p in peer if p.wait_s.size for r in p.rank)
    sends = sorted(int(r) for p in peer if p.send_bytes.size for r in p.rank)
    assert (waits, sends) == ([0, 2], [1])
    for b in batches:
        wire.decode_records(b).validate(P)
