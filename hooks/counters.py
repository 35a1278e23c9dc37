"""Counter mode without torch: counter snapshots -> interval records -> frames.

Under CUDA graphs no Python runs per collective, but DeepEP's low-latency kernels keep
cumulative counters in device memory that go on growing inside every graph replay:
cycles waited per source rank (dispatch and combine) and tokens received per local
expert. A side thread snapshots them every few hundred milliseconds
(:class:`epwatch.hooks.deepep.CounterProbe`); this module turns consecutive snapshots
into interval records (:func:`epwatch.counters.interval_between`) and keeps them,
bounded, until the flusher ships them. Counters are never reset (a reset races the
kernels' atomic adds): snapshots are diffed.
"""

from __future__ import annotations

import logging
from collections import deque

from epwatch.counters import CounterSnapshot, interval_between
from epwatch.frames import interval_frame
from epwatch.schema import IntervalColumns, RecordError

log = logging.getLogger("epwatch.hooks")

FRAME_INTERVALS = 256  # interval records per frame


class IntervalMaker:
    """One rank's interval records, from consecutive snapshots; a bounded queue.

    A snapshot whose wait counters went backwards means the engine gave DeepEP fresh
    tensors (or restarted): that interval is skipped and the snapshot becomes the new
    baseline. While nothing ships (no agent) at most ``max_intervals`` are kept, the
    oldest dropped first and counted."""

    def __init__(
        self,
        ep_group: str,
        rank: int,
        world_size: int,
        local_experts: int,
        max_intervals: int = 1024,
    ) -> None:
        self.ep_group = ep_group
        self.rank = rank
        self.world_size = world_size
        self.local_experts = local_experts
        self._prev: CounterSnapshot | None = None
        self._rows: deque[IntervalColumns] = deque(maxlen=max_intervals)
        self.intervals = 0  # made
        self.dropped = 0  # queued, then pushed out by newer ones before shipping
        self.restarts = 0  # counters went backwards

    def push(self, snap: CounterSnapshot, sm_clock_hz: float) -> None:
        """Take one snapshot; the interval since the previous one is queued."""
        prev, self._prev = self._prev, snap
        if prev is None:
            return
        row = interval_between(self.rank, prev, snap, sm_clock_hz)
        if row is None:
            if snap.time_ns > prev.time_ns:  # counters went backwards
                self.restarts += 1
            return
        if len(self._rows) == self._rows.maxlen:
            self.dropped += 1
        self._rows.append(row)
        self.intervals += 1

    def __len__(self) -> int:
        return len(self._rows)

    def frames(self) -> list[tuple[bytes, list[IntervalColumns]]]:
        """Everything queued, as frames (with what each carries, to put back)."""
        out = []
        while self._rows:
            take = [self._rows.popleft() for _ in range(min(FRAME_INTERVALS, len(self._rows)))]
            rows = IntervalColumns.concat(take)
            try:
                rows.validate(self.world_size)
            except RecordError as err:  # a bug or a corrupt read: never ship, never raise
                log.warning("epwatch counter probe: dropping %d intervals: %s", len(take), err)
                continue
            out.append((interval_frame(self.ep_group, self.world_size, rows), take))
        return out

    def put_back(self, rows: list[IntervalColumns]) -> None:
        """Rows of a frame that could not be sent go back to the front, in order."""
        for row in reversed(rows):
            if len(self._rows) == self._rows.maxlen:
                self.dropped += 1
                return
            self._rows.appendleft(row)

