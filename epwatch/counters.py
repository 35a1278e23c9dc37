"""Cumulative kernel counters -> interval records: the one place that diffs them.

DeepEP's low-latency kernels only ever add to their statistics (wait cycles per source
rank, int64; tokens per local expert, int32 that may wrap). A counter-mode interval
record is the difference of two snapshots of one rank. The hooks' counter probe and
the simulator's counter mode both make their records here, so the simulator emits
exactly what a real probe would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epwatch.schema import IntervalColumns

TOKEN_WRAP = 1 << 32  # DeepEP's per-expert token counters are int32


@dataclass(frozen=True, slots=True)
class CounterSnapshot:
    """One rank's cumulative counters as read at ``time_ns`` (its host monotonic clock).

    ``step`` is the engine's forward-step counter then (its ``probe.step()`` calls, made
    as each step starts), or -1 when the engine does not report one."""

    time_ns: int
    dispatch_cycles: np.ndarray  # int64 [P]
    combine_cycles: np.ndarray  # int64 [P]
    expert_tokens: np.ndarray  # int [E_local], may wrap at 2**32
    step: int = -1


def interval_between(
    rank: int, prev: CounterSnapshot, snap: CounterSnapshot, sm_clock_hz: float
) -> IntervalColumns | None:
    """The interval record from ``prev`` to ``snap``; None when there is none to make:
    the clock did not advance, or a wait counter went backwards (the engine gave DeepEP
    fresh tensors, or restarted), which makes ``snap`` a new baseline."""
    if snap.time_ns <= prev.time_ns:
        return None
    d_disp = snap.dispatch_cycles.astype(np.int64) - prev.dispatch_cycles.astype(np.int64)
    d_comb = snap.combine_cycles.astype(np.int64) - prev.combine_cycles.astype(np.int64)
    if d_disp.min(initial=0) < 0 or d_comb.min(initial=0) < 0:
        return None
    tokens = (snap.expert_tokens.astype(np.int64) - prev.expert_tokens.astype(np.int64)) % (
        TOKEN_WRAP
    )
    return IntervalColumns(
        rank=np.array([rank], np.int32),
        start_ns=np.array([prev.time_ns], np.int64),
        end_ns=np.array([snap.time_ns], np.int64),
        step=np.array([max(snap.step, -1)], np.int64),
        dispatch_wait_s=(d_disp / sm_clock_hz)[None, :],
        combine_wait_s=(d_comb / sm_clock_hz)[None, :],
        expert_tokens=tokens[None, :],
    )
