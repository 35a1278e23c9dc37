"""Counter mode of the simulator: what a counter probe on every rank would ship.

Under CUDA graphs there are no per-collective records, only each rank's cumulative
kernel counters (wait cycles per source rank in dispatch and combine, tokens per local
expert), read every ``counter_interval_steps`` steps on the rank's own clock. Interval
records are the differences of consecutive snapshots, made by the same function the
hooks use (:func:`epwatch.counters.interval_between`), so the estimators see what a
real probe would send: int32 token counters that wrap, cycles over an SM clock.

A hang: the collective nobody finishes adds no wait (the kernel adds a wait when the
data arrives). A rank hung before the step (``layer = 0``: it never started the step)
keeps reporting with its step counter behind; a rank hung inside the step (its GPU
stuck) goes silent, since its probe's copy never completes. The others keep
reporting counters that no longer move.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from epwatch.counters import TOKEN_WRAP, CounterSnapshot, interval_between
from epwatch.schema import IntervalColumns
from epwatch.simulator.engine import Simulation, StepChunk

SM_CLOCK_HZ = 1.98e9  # H100/H200 boost clock: cycles per second of wait
PROBE_INTERVAL_S = 0.25  # the counter probe's default read period


class CounterStream:
    """Cumulative counters of every rank of a simulation, and their interval records."""

    def __init__(self, sim: Simulation, sm_clock_hz: float = SM_CLOCK_HZ) -> None:
        self.sim = sim
        self.every = sim.s.probe.counter_interval_steps
        self.sm_clock_hz = sm_clock_hz
        P = sim.P
        self.cycles = np.zeros((2, P, P), dtype=np.int64)  # [phase, rank i, source j]
        self.tokens = np.zeros((P, sim.E // P), dtype=np.int64)
        self.steps_started = np.zeros(P, dtype=np.int64)
        self.last: list[CounterSnapshot | None] = [None] * P
        self.last_time_s = 0.0  # true time of the newest snapshot
        self.interval_s = 0.0  # true time between snapshots (the newest)
        self.silent = np.zeros(P, dtype=bool)  # ranks whose probes stopped reporting

    def _snapshot(self, rank: int, true_s: float) -> CounterSnapshot:
        local_ns = round((true_s + self.sim.clock_offset_s[rank]) * 1e9)
        return CounterSnapshot(
            time_ns=local_ns,
            dispatch_cycles=self.cycles[0, rank].copy(),
            combine_cycles=self.cycles[1, rank].copy(),
            expert_tokens=(self.tokens[rank] % TOKEN_WRAP).astype(np.uint32),
            step=int(self.steps_started[rank]),
        )

    def _read_all(self, true_s: np.ndarray) -> IntervalColumns | None:
        """Every reporting rank snapshots its counters (at its own ``true_s``)."""
        rows = []
        for rank in np.flatnonzero(~self.silent).tolist():
            snap = self._snapshot(rank, float(true_s[rank]))
            prev, self.last[rank] = self.last[rank], snap
            if prev is not None:
                row = interval_between(rank, prev, snap, self.sm_clock_hz)
                if row is not None:
                    rows.append(row)
        return IntervalColumns.concat(rows) if rows else None

    def intervals(self, chunk: StepChunk) -> Iterator[tuple[float, IntervalColumns]]:
        """The interval records the chunk's steps produce, in time order, each with the
        true time they were read."""
        if chunk.counter_waits_s is None or chunk.expert_tokens is None:
            raise ValueError("the scenario's [probe] mode is not 'counters'")
        hang = self.sim.hang
        for si, step in enumerate(chunk.steps.tolist()):
            started = np.ones(self.sim.P, dtype=bool)
            if chunk.hung and si == len(chunk.steps) - 1 and hang is not None:
                if hang.layer == 0:
                    started[hang.rank] = False  # stuck on the host before the step
                else:
                    self.silent[hang.rank] = True  # stuck on its GPU: no more reads
            self.steps_started += started
            cycles = np.round(chunk.counter_waits_s[si] * self.sm_clock_hz).astype(np.int64)
            self.cycles += cycles
            self.tokens += chunk.expert_tokens[si].astype(np.int64)
            valid = chunk.valid[si, :, 1].all(axis=1)  # layers whose combine completed
            hung_now = chunk.hung and si == len(chunk.steps) - 1
            if (step + 1) % self.every and not hung_now:
                continue
            if not valid.any():
                continue
            done = chunk.exit_s[si, np.flatnonzero(valid)[-1], 1]  # [P]
            self.interval_s = float(np.median(done)) - self.last_time_s
            self.last_time_s = float(np.median(done))
            rows = self._read_all(done)
            if rows is not None:
                yield self.last_time_s, rows

    def frozen(self, seconds: float) -> Iterator[tuple[float, IntervalColumns]]:
        """After a hang: the probes that still run keep reading counters that no longer
        move, for ``seconds`` more; yields (true time, records)."""
        every = max(self.interval_s, PROBE_INTERVAL_S)
        t = self.last_time_s
        while t < self.last_time_s + seconds:
            t += every
            rows = self._read_all(np.full(self.sim.P, t))
            if rows is not None:
                yield t, rows
