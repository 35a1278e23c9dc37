"""Merge hook frames from the node's ranks into few, large messages per EP group.

Each rank sends small frames; the collector's ingest is cheap per message and per
column, not per record, so the agent concatenates columns until ``batch_records`` (or
the flush interval) and serializes the batch once, straight into the spool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from epwatch import wire
from epwatch.agent.spool import Spool
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import (
    INTERVAL_KEY_DTYPES,
    INTERVAL_TOKENS_DTYPE,
    INTERVAL_WAIT_DTYPE,
    RECORD_DTYPES,
    Entered,
    IntervalColumns,
    PeerRows,
    RecordColumns,
)

# A message must stay well below the collector's size limit whatever the peer rows add.
MAX_PENDING_BYTES = 8 << 20
RECORD_BYTES = sum(np.dtype(d).itemsize for d in RECORD_DTYPES.values())
INTERVAL_KEY_BYTES = sum(np.dtype(d).itemsize for d in INTERVAL_KEY_DTYPES.values())
# Counter-mode interval records per message (a few per rank per second arrive), and
# fewer where their rows are wide: a message's interval rows stay within the same byte
# bound as records (``max_bytes``; a row is 16 bytes per rank of the group, so at 4096
# ranks 1024 rows would be 64 MiB).
MAX_PENDING_INTERVALS = 1024


def _interval_row_bytes(rows: IntervalColumns) -> int:
    """Encoded bytes of one interval row (every column is fixed-width on the wire)."""
    world_size = rows.dispatch_wait_s.shape[1] if rows.dispatch_wait_s.ndim == 2 else 0
    return (
        INTERVAL_KEY_BYTES
        + 2 * world_size * np.dtype(INTERVAL_WAIT_DTYPE).itemsize
        + rows.local_experts * np.dtype(INTERVAL_TOKENS_DTYPE).itemsize
    )


@dataclass
class _Pending:
    records: list[RecordColumns] = field(default_factory=list)
    peer_rows: list[PeerRows] = field(default_factory=list)
    entered: list[Entered] = field(default_factory=list)
    n_records: int = 0
    n_bytes: int = 0

    def empty(self) -> bool:
        return not (self.records or self.peer_rows or self.entered)


def _concat_peer_rows(parts: list[PeerRows]) -> list[PeerRows]:
    """Parts merged per kind (wait and/or send matrices), so that DeepEP's normal mode
    (send rows) and low-latency mode (wait rows) on one node both travel."""
    kinds: dict[tuple[bool, bool], list[PeerRows]] = {}
    for part in parts:
        kinds.setdefault((bool(part.wait_s.size), bool(part.send_bytes.size)), []).append(part)
    merged = []
    for same in kinds.values():
        cols = {
            name: np.concatenate([getattr(p, name) for p in same])
            for name in ("rank", "step", "layer", "phase", "wait_s", "send_bytes")
        }
        merged.append(PeerRows(**cols))
    return merged


def _latest_entered(parts: list[Entered]) -> Entered | None:
    """Only the newest heartbeat per rank matters."""
    if not parts:
        return None
    cols = {
        n: np.concatenate([getattr(p, n) for p in parts])
        for n in ("rank", "step", "layer", "phase")
    }
    rev = cols["rank"][::-1]
    _, first = np.unique(rev, return_index=True)
    keep = np.sort(len(rev) - 1 - first)
    return Entered(**{n: a[keep] for n, a in cols.items()})


class Batcher:
    """Pending hook data per (ep_group, world_size); thread-safe."""

    def __init__(
        self, spool: Spool, batch_records: int, max_bytes: int = MAX_PENDING_BYTES
    ) -> None:
        if batch_records < 1:
            raise ValueError(f"batch_records must be >= 1, got {batch_records}")
        self._spool = spool
        self._max_bytes = max_bytes
        self._batch_records = max(1, min(batch_records, max_bytes // RECORD_BYTES))
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], _Pending] = {}
        # (ep_group, world_size, local experts) -> counter-mode interval records
        self._intervals: dict[tuple[str, int, int], list[IntervalColumns]] = {}
        self._has_pending = threading.Event()  # set by add(), cleared by flush()

    def add(
        self,
        ep_group: str,
        world_size: int,
        records: RecordColumns,
        peer_rows: PeerRows | None,
        entered: Entered | None,
    ) -> None:
        with self._lock:
            p = self._pending.setdefault((ep_group, world_size), _Pending())
            if len(records):
                p.records.append(records)
                p.n_records += len(records)
                p.n_bytes += len(records) * RECORD_BYTES
            if peer_rows is not None and len(peer_rows):
                p.peer_rows.append(peer_rows)
                p.n_bytes += peer_rows.wait_s.nbytes + peer_rows.send_bytes.nbytes
            if entered is not None and len(entered):
                p.entered.append(entered)
            if p.n_records >= self._batch_records:
                self._emit(ep_group, world_size, p, keep_remainder=True)
            elif p.n_bytes >= self._max_bytes:
                self._emit(ep_group, world_size, p, keep_remainder=False)
            if not p.empty():
                self._has_pending.set()

    def add_intervals(self, ep_group: str, world_size: int, rows: IntervalColumns) -> None:
        """Counter-mode interval records of one rank (validated by the receiver).
        Pending rows of a group stay under :meth:`intervals_per_message`: full
        messages go to the spool at once, the rest waits for :meth:`flush`."""
        if not len(rows):
            return
        with self._lock:
            key = (ep_group, world_size, rows.local_experts)
            per_msg = self.intervals_per_message(rows)
            parts = self._intervals.setdefault(key, [])
            parts.append(rows)
            if sum(len(r) for r in parts) >= per_msg:
                merged = IntervalColumns.concat(self._intervals.pop(key))
                full = len(merged) // per_msg
                for i in range(full):
                    self._emit_intervals(key, [merged.take(slice(i * per_msg, (i + 1) * per_msg))])
                rest = merged.take(slice(full * per_msg, None))
                if len(rest):
                    self._intervals[key] = [rest]
            if self._intervals.get(key):
                self._has_pending.set()

    def intervals_per_message(self, rows: IntervalColumns) -> int:
        """Interval rows one message carries: :data:`MAX_PENDING_INTERVALS`, fewer
        where that many rows of this width would pass ``max_bytes`` (at least one)."""
        return max(1, min(MAX_PENDING_INTERVALS, self._max_bytes // _interval_row_bytes(rows)))

    def flush(self) -> None:
        """Ship everything pending (a flush interval after data came, and at shutdown)."""
        with self._lock:
            self._has_pending.clear()
            for (group, ws), p in self._pending.items():
                if not p.empty():
                    self._emit(group, ws, p, keep_remainder=False)
            intervals, self._intervals = self._intervals, {}
            for key, parts in intervals.items():
                self._emit_intervals(key, parts)

    def _emit_intervals(self, key: tuple[str, int, int], parts: list[IntervalColumns]) -> None:
        group, ws, _ = key
        rows = IntervalColumns.concat(parts)
        msg = pb.AgentMessage(
            intervals=wire.encode_intervals(group, ws, rows), schema=wire.INTERVALS_SCHEMA
        )
        self._spool.put(msg.SerializeToString(), len(rows))

    def wait_pending(self, timeout: float | None = None) -> bool:
        """Block until something is pending (or :meth:`wake`); the flush loop sleeps
        here while no hook sends anything instead of waking every flush interval."""
        return self._has_pending.wait(timeout)

    def wake(self) -> None:
        """Release :meth:`wait_pending` (at shutdown)."""
        self._has_pending.set()

    def pending_records(self) -> int:
        with self._lock:
            return sum(p.n_records for p in self._pending.values()) + sum(
                len(r) for parts in self._intervals.values() for r in parts
            )

    def _emit(self, group: str, ws: int, p: _Pending, keep_remainder: bool) -> None:
        records = RecordColumns.concat(p.records)
        peer_rows = _concat_peer_rows(p.peer_rows)
        entered = _latest_entered(p.entered)
        size = self._batch_records
        n_full = len(records) // size if keep_remainder else -(-len(records) // size)
        chunks = [records.take(slice(i * size, (i + 1) * size)) for i in range(n_full)]
        # Peer rows of a second kind ride on messages of their own.
        chunks += [records.take(slice(0, 0))] * max(1 - len(chunks), len(peer_rows) - len(chunks))
        for i, chunk in enumerate(chunks):
            batch = wire.encode_records(
                group,
                ws,
                chunk,
                peer_rows[i] if i < len(peer_rows) else None,
                entered if i == 0 else None,
            )
            payload = pb.AgentMessage(batch=batch).SerializeToString()
            self._spool.put(payload, len(chunk))
        rest = records.take(slice(n_full * size, None)) if keep_remainder else None
        p.records = [rest] if rest is not None and len(rest) else []
        p.n_records = len(rest) if rest is not None else 0
        p.n_bytes = p.n_records * RECORD_BYTES
        p.peer_rows, p.entered = [], []
