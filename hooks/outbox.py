"""Resolved columns waiting for the agent, bounded, and cut into frames.

While the agent is absent the outbox keeps at most ``max_records`` records and drops
the oldest (counted): for a live view the newest evidence is worth the most. Frames
stay far below the contract's 64 MiB whatever ``world_size`` the peer rows carry.
"""

from __future__ import annotations

import logging
import os
from collections import deque

import numpy as np

from epwatch.frames import hook_frame
from epwatch.hooks.probe import Probe
from epwatch.schema import MAX_LAYER, MAX_STEP, Entered, PeerRows, RecordColumns, RecordError

log = logging.getLogger("epwatch.hooks")

FRAME_RECORDS = 16384
FRAME_PEER_BYTES = 4 << 20


class Outbox:
    """One probe's unsent columns."""

    def __init__(self, probe: Probe, max_records: int) -> None:
        self.probe = probe
        self.max_records = max_records
        self._records: deque[RecordColumns] = deque()
        self._peers: deque[PeerRows] = deque()
        self._n = 0
        self.rejected = 0  # records that failed the schema's checks (should stay 0)

    def __len__(self) -> int:
        return self._n

    def add(self, records: RecordColumns, peer_rows: list[PeerRows]) -> None:
        if len(records):
            self._records.append(records)
            self._n += len(records)
        self._peers.extend(p for p in peer_rows if len(p))
        while self._n > self.max_records and self._records:  # drop the oldest records
            excess, oldest = self._n - self.max_records, self._records[0]
            if len(oldest) <= excess:
                self._records.popleft()
                excess = len(oldest)
            else:
                self._records[0] = oldest.take(slice(excess, None))
            self._n -= excess
            self.probe.dropped_unsent += excess
        max_peer_rows = max(1, self.max_records // 16)
        while sum(len(p) for p in self._peers) > max_peer_rows:
            self._peers.popleft()  # sampled extras: dropped, not counted as records

    def has_data(self) -> bool:
        return bool(self._records or self._peers)

    def take(self) -> tuple[list[RecordColumns], list[PeerRows]]:
        records, peers = list(self._records), list(self._peers)
        self._records.clear()
        self._peers.clear()
        self._n = 0
        return records, peers

    def frames(
        self, entered: tuple[int, int, int] | None, dropped_total: int
    ) -> list[tuple[bytes, RecordColumns]]:
        """Take everything as ``(frame, its records)``; the heartbeat rides on each.
        ``dropped_total`` is the process's running drop count (the agent keys it by
        ``hook:<pid>``, so it must cover every probe of the process)."""
        records, peers = self.take()
        cols = self._checked(RecordColumns.concat(records))
        hb = self._heartbeat(entered)
        peer_parts = [part for p in peers for part in _split_peer_rows(p) if self._peer_ok(part)]
        n_frames = max(1, -(-len(cols) // FRAME_RECORDS), len(peer_parts))
        out = []
        for i in range(n_frames):
            chunk = cols.take(slice(i * FRAME_RECORDS, (i + 1) * FRAME_RECORDS))
            frame = hook_frame(
                self.probe.ep_group,
                self.probe.world_size,
                chunk,
                peer_parts[i] if i < len(peer_parts) else None,
                hb,
                pid=os.getpid(),
                hook_records_dropped=dropped_total,
            )
            out.append((frame, chunk))
        return out

    # The resolver already keeps records within epwatch.schema's bounds; these checks
    # are the last line: a frame the agent rejects would lose every record in it.

    def _checked(self, cols: RecordColumns) -> RecordColumns:
        try:
            cols.validate(self.probe.world_size)
        except RecordError as e:
            self.rejected += len(cols)
            log.warning("epwatch hooks: dropping %d records: %s", len(cols), e)
            return RecordColumns.empty()
        return cols

    def _peer_ok(self, rows: PeerRows) -> bool:
        try:
            rows.validate(self.probe.world_size)
        except RecordError:
            return False
        return True

    def _heartbeat(self, entered: tuple[int, int, int] | None) -> Entered | None:
        if entered is None:
            return None
        try:
            step, layer, phase = (int(v) for v in entered)
            if not (0 <= step < MAX_STEP and 0 <= layer < MAX_LAYER and phase in (0, 1)):
                return None
            return Entered(
                rank=np.array([self.probe.rank], dtype="<i4"),
                step=np.array([step], dtype="<i8"),
                layer=np.array([layer], dtype="<i4"),
                phase=np.array([phase], dtype="<u1"),
            )
        except (TypeError, ValueError):
            return None

    def put_back(self, records: RecordColumns) -> None:
        """Records of frames that could not be sent go back in front (still bounded)."""
        if len(records):
            self._records.appendleft(records)
            self._n += len(records)
            self.add(RecordColumns.empty(), [])


def _split_peer_rows(p: PeerRows) -> list[PeerRows]:
    row_bytes = max(1, (p.wait_s.shape[1] * 8 + p.send_bytes.shape[1] * 8))
    per = max(1, FRAME_PEER_BYTES // row_bytes)
    return [
        PeerRows(
            rank=p.rank[i : i + per],
            step=p.step[i : i + per],
            layer=p.layer[i : i + per],
            phase=p.phase[i : i + per],
            wait_s=p.wait_s[i : i + per],
            send_bytes=p.send_bytes[i : i + per],
        )
        for i in range(0, len(p), per)
    ]
