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
import os
from collections import deque
from collections.abc import Callable

from epwatch import wire
from epwatch.counters import CounterSnapshot, interval_between
from epwatch.frames import encode_frame
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import IntervalColumns, RecordError

log = logging.getLogger("epwatch.hooks")

FRAME_INTERVALS = 256  # interval records per frame


def interval_frame_with_stats(
    ep_group: str, world_size: int, rows: IntervalColumns, hook_records_dropped: int
) -> bytes:
    """:func:`epwatch.frames.interval_frame` plus the process's running drop count in
    ``stats`` (the field hook frames already carry; the agent keys it by
    ``hook:<pid>`` and forwards it as ``hook_records_dropped``)."""
    msg = pb.AgentMessage(
        agent_id=f"hook:{os.getpid()}",
        seq=0,
        intervals=wire.encode_intervals(ep_group, world_size, rows),
        schema=wire.INTERVALS_SCHEMA,
        stats=pb.AgentStats(hook_records_dropped=hook_records_dropped),
    )
    return encode_frame(msg.SerializeToString())


class IntervalMaker:
    """One rank's interval records, from consecutive snapshots; a bounded queue.

    A snapshot whose wait counters went backwards means the engine gave DeepEP fresh
    tensors (or restarted): that interval is skipped and the snapshot becomes the new
    baseline (as after :meth:`rebaseline`). While nothing ships (no agent) at most
    ``max_intervals`` are kept, the oldest dropped first and counted; rows that fail
    the schema's checks are dropped one by one and counted too (:attr:`lost`)."""

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
        self.dropped = 0  # made, then lost before shipping (queue full)
        self.rejected = 0  # made, then refused by the schema's checks
        self.restarts = 0  # counters went backwards

    @property
    def lost(self) -> int:
        """Interval records made and never shipped."""
        return self.dropped + self.rejected

    def rebaseline(self) -> None:
        """Forget the previous snapshot: the next one is a new baseline, so no interval
        spans the time in between (a pause)."""
        self._prev = None

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
            self.dropped += len(self._rows[0])
        self._rows.append(row)
        self.intervals += 1

    def __len__(self) -> int:
        return len(self._rows)

    def frames(
        self, dropped_total: Callable[[], int] | None = None
    ) -> list[tuple[bytes, list[IntervalColumns]]]:
        """Everything queued, as frames (with what each carries, to put back). Rows
        that fail validation are dropped one by one, never the rows framed with them.
        ``dropped_total`` gives the process's running drop count for the frames'
        ``stats`` (asked once, after this call's own rejections are counted)."""
        chunks = []
        while self._rows:
            take = [self._rows.popleft() for _ in range(min(FRAME_INTERVALS, len(self._rows)))]
            take = self._valid(take)
            if take:
                chunks.append(take)
        if not chunks:
            return []
        total = dropped_total() if dropped_total is not None else 0
        return [
            (
                interval_frame_with_stats(
                    self.ep_group, self.world_size, IntervalColumns.concat(take), total
                ),
                take,
            )
            for take in chunks
        ]

    def _valid(self, take: list[IntervalColumns]) -> list[IntervalColumns]:
        """``take`` less the rows the schema refuses (a bug, a corrupt read, or an
        interval past the schema's bounds): never ship them, never raise."""
        try:
            IntervalColumns.concat(take).validate(self.world_size)
            return take
        except RecordError:
            pass
        good = []
        for row in take:
            try:
                row.validate(self.world_size)
            except RecordError as err:
                self.rejected += len(row)
                if self.rejected == len(row):  # the first time only
                    log.warning("epwatch counter probe: dropping an interval: %s", err)
                continue
            good.append(row)
        return good

    def put_back(self, rows: list[IntervalColumns]) -> None:
        """Rows of a frame that could not be sent go back to the front, in order; what
        no longer fits (newer rows filled the queue) is dropped and counted, every row."""
        for i in range(len(rows) - 1, -1, -1):
            if len(self._rows) == self._rows.maxlen:
                self.dropped += sum(len(r) for r in rows[: i + 1])
                return
            self._rows.appendleft(rows[i])
