"""Counter mode without torch: cumulative kernel counters -> interval records -> frames.

Under CUDA graphs no Python runs per collective, but DeepEP's low-latency kernels keep
cumulative counters in device memory that go on growing inside every graph replay:
cycles waited per source rank (dispatch and combine) and tokens received per local
expert. A side thread snapshots them every few hundred milliseconds
(:class:`epwatch.hooks.deepep.CounterProbe`); this module turns consecutive snapshots
into interval records (the deltas) and keeps them, bounded, until the flusher ships
them. Counters are never reset (a reset races the kernels' atomic adds): snapshots are
diffed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from epwatch.frames import interval_frame
from epwatch.schema import IntervalColumns, RecordError

log = logging.getLogger("epwatch.hooks")

TOKEN_WRAP = 1 << 32  # DeepEP's per-expert token counters are int32
FRAME_INTERVALS = 256  # interval records per frame


@dataclass(frozen=True, slots=True)
class CounterSnapshot:
    """The cumulative counters as read at ``time_ns`` (host monotonic clock).

    ``step`` is the engine's forward-step counter at that time (its ``probe.step()``
    calls, made as each step starts), or -1 when the engine does not report one."""

    time_ns: int
    dispatch_cycles: np.ndarray  # int64 [P]
    combine_cycles: np.ndarray  # int64 [P]
    expert_tokens: np.ndarray  # int [E_local], may wrap at 2**32
    step: int = -1


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
        if prev is None or snap.time_ns <= prev.time_ns:
            return
        d_disp = snap.dispatch_cycles.astype(np.int64) - prev.dispatch_cycles.astype(np.int64)
        d_comb = snap.combine_cycles.astype(np.int64) - prev.combine_cycles.astype(np.int64)
        if d_disp.min(initial=0) < 0 or d_comb.min(initial=0) < 0:
            self.restarts += 1
            return
        tokens = (snap.expert_tokens.astype(np.int64) - prev.expert_tokens.astype(np.int64)) % (
            TOKEN_WRAP
        )
        row = IntervalColumns(
            rank=np.array([self.rank], np.int32),
            start_ns=np.array([prev.time_ns], np.int64),
            end_ns=np.array([snap.time_ns], np.int64),
            step=np.array([max(snap.step, -1)], np.int64),
            dispatch_wait_s=(d_disp / sm_clock_hz)[None, :],
            combine_wait_s=(d_comb / sm_clock_hz)[None, :],
            expert_tokens=tokens[None, :],
        )
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

