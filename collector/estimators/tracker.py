"""Turning per-step evidence into straggler flags (design §5).

A :class:`CauseTracker` feeds one cause's per-rank ratios, as log-ratios, to a
:class:`~epwatch.collector.estimators.sequential.SequentialTest` and keeps a
:class:`Flag` per episode: the step its evidence began (the CUSUM's change point), the
step it opened, the last step it held, and the ratios since, whose median and
interval are the reported slowdown. :class:`LinkTracker` does the same for the cells
of the link matrix (suspect links).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from epwatch.collector.estimators.sequential import (
    SequentialParams,
    SequentialTest,
    slowdown_interval,
)
from epwatch.collector.estimators.stats import _quiet_nanmedian

_KEEP_VALUES = 4096  # ratios behind an episode's slowdown (its newest)
CLOSED_FLAGS_KEPT = 64  # cleared flags remembered for the post-mortem report
_CANDIDATES_KEPT = 4096  # cells with excess evidence remembered for the next sample


@dataclass
class Flag:
    rank: int
    cause: str
    first_step: int  # where the evidence began
    last_step: int
    active: bool = True
    opened_step: int = -1  # when the evidence was enough
    values: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP_VALUES))

    def interval(self) -> tuple[float, float, float]:
        """Slowdown, low, high over the episode; never below 1 (a flagged rank is the
        slow one: a figure under 1 would only be noise)."""
        if not self.values:
            return math.nan, math.nan, math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.fromiter(self.values, float))
        mid, low, high = slowdown_interval(logs)
        return max(mid, 1.0), max(low, 1.0), max(high, 1.0)

    @property
    def slowdown(self) -> float:
        return self.interval()[0]


class CauseTracker:
    """Flags for one cause over ``P`` ranks from a stream of per-rank ratios."""

    def __init__(
        self, cause: str, world_size: int, params: SequentialParams, summary_window: int = 8
    ) -> None:
        self.cause = cause
        self.test = SequentialTest(world_size, params)
        self._summary = summary_window
        # The sizes behind a flag's slowdown, as long as the test's own history.
        self._recent = np.full((max(params.window, summary_window), world_size), np.nan)
        self._n = 0
        self.active: dict[int, Flag] = {}
        self.closed: deque[Flag] = deque(maxlen=CLOSED_FLAGS_KEPT)
        self.evidence = np.full(world_size, np.nan)  # recent median ratio per rank
        self.opened: list[Flag] = []  # since the caller last looked (for logging)
        self.cleared: list[Flag] = []

    def reset(self) -> None:
        """A new run: active flags close, the evidence starts afresh."""
        for rank in list(self.active):
            self._close(rank)
        self.test.reset()
        self._recent[:] = np.nan
        self._n = 0
        self.evidence[:] = np.nan

    def _close(self, rank: int) -> None:
        flag = self.active.pop(rank)
        flag.active = False
        self.closed.append(flag)
        self.cleared.append(flag)

    def push(
        self, step: int, time_s: float, ratios: np.ndarray, sizes: np.ndarray | None = None
    ) -> None:
        """One step's per-rank ratios (the evidence) and, when the size to report differs
        from the evidence, the per-rank ``sizes`` behind a flag's slowdown."""
        sizes = ratios if sizes is None else sizes
        self._recent[self._n % len(self._recent)] = sizes
        self._n += 1
        last = np.arange(self._n - min(self._n, self._summary), self._n) % len(self._recent)
        self.evidence = _quiet_nanmedian(self._recent[last], 0)
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logs = np.log(np.where(ratios > 0, ratios, np.nan))
        opened, cleared = self.test.observe(step, time_s, logs)
        for rank in opened.tolist():
            start = int(self.test.run_start[rank])
            start = step if start < 0 else start
            flag = Flag(rank, self.cause, start, step, opened_step=step)
            # The slowdown covers the evidence since its change point.
            since = len(self.test.since_run_start(rank))
            flag.values.extend(self._recent_sizes(rank, since))
            self.active[rank] = flag
            self.opened.append(flag)
        for rank, flag in self.active.items():
            if rank in opened:
                continue
            if np.isfinite(sizes[rank]) and sizes[rank] > 0:
                flag.values.append(float(sizes[rank]))
            flag.last_step = step
        for rank in cleared.tolist():
            self._close(rank)

    def _recent_sizes(self, rank: int, count: int) -> list[float]:
        """The rank's last ``count`` sizes (at most the summary window's)."""
        rows = min(self._n, len(self._recent), max(count, 1))
        values = self._recent[np.arange(self._n - rows, self._n) % len(self._recent), rank]
        return [float(v) for v in values if np.isfinite(v) and v > 0]

    def flags(self, include_closed: bool) -> list[Flag]:
        flags = list(self.active.values())
        return flags + list(self.closed) if include_closed else flags

    def take_changes(self) -> tuple[list[Flag], list[Flag]]:
        """Flags opened and cleared since the last call."""
        opened, cleared = self.opened, self.cleared
        self.opened, self.cleared = [], []
        return opened, cleared


@dataclass
class LinkFlag:
    src: int  # the sender whose data was slow to arrive
    dst: int  # the receiver that waited
    first_step: int
    last_step: int
    active: bool = True
    values: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP_VALUES))

    @property
    def slowdown(self) -> float:
        if not self.values:
            return math.nan
        return max(1.0, float(np.median(np.fromiter(self.values, float))))


class LinkTracker:
    """Suspect links (design §5): one cell of the link-time matrix, receiver i and
    sender j, above what its row and column predict, tested sequentially like a rank.
    The noise of a sample is the spread of all its cells (a link has no history of
    its own worth keeping at P x P). Bounded: at most ``slots`` links are followed
    at once; the ``per_sample`` with the most excess evidence in two samples running
    take the slots of links whose evidence fell back to nothing."""

    def __init__(
        self, world_size: int, params: SequentialParams, slots: int = 64, per_sample: int = 16
    ) -> None:
        self.P = world_size
        self.per_sample = per_sample
        self.test = SequentialTest(slots, params, history=False)
        self.slot_cell = np.full(slots, -1, dtype=np.int64)  # flat cell dst * P + src
        self._last_positive = np.empty(0, dtype=np.int64)
        self.active: dict[tuple[int, int], LinkFlag] = {}
        self.closed: deque[LinkFlag] = deque(maxlen=CLOSED_FLAGS_KEPT)

    def _follow(self, logs: np.ndarray, noise: float) -> None:
        """Free the slots of links with no evidence; give them to the new cells with
        the most excess evidence in this sample *and* the one before. At P = 256 a
        sample has some 100 cells with a 2-5x spike; they rarely repeat, a slow
        link always does."""
        idle = (self.slot_cell >= 0) & (self.test.evidence <= 0) & ~self.test.flagged
        self.slot_cell[idle] = -1
        excess = np.nan_to_num(self.test.excess(logs, noise), nan=-np.inf)
        positive = np.flatnonzero(excess > 0)
        if len(positive) > _CANDIDATES_KEPT:
            positive = positive[np.argsort(excess[positive])[-_CANDIDATES_KEPT:]]
        positive.sort()
        fresh = np.intersect1d(positive, self._last_positive, assume_unique=True)
        self._last_positive = positive
        fresh = np.setdiff1d(fresh, self.slot_cell[self.slot_cell >= 0], assume_unique=True)
        empty = np.flatnonzero(self.slot_cell < 0)
        take = fresh[np.argsort(excess[fresh])[::-1][: min(self.per_sample, len(empty))]]
        self.slot_cell[empty[: len(take)]] = take
        self.test.forget(empty[: len(take)])

    def push(self, step: int, time_s: float, cells: np.ndarray) -> None:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logs = np.log(np.where(cells > 0, cells, np.nan)).ravel()
            finite = logs[np.isfinite(logs)]
        if len(finite) < 3:
            return
        noise = 1.4826 * float(np.median(np.abs(finite - np.median(finite))))
        self._follow(logs, noise)
        followed = self.slot_cell >= 0
        y = np.full(len(self.slot_cell), np.nan)
        y[followed] = logs[self.slot_cell[followed]]
        opened, cleared = self.test.observe(step, time_s, y, noise)
        for slot in opened.tolist():
            dst, src = divmod(int(self.slot_cell[slot]), self.P)
            start = int(self.test.run_start[slot])
            self.active[(src, dst)] = LinkFlag(src, dst, step if start < 0 else start, step)
        for (src, dst), flag in self.active.items():
            value = cells[dst, src]
            if np.isfinite(value):
                flag.values.append(float(value))
            flag.last_step = step
        for slot in cleared.tolist():
            dst, src = divmod(int(self.slot_cell[slot]), self.P)
            flag = self.active.pop((src, dst))
            flag.active = False
            self.closed.append(flag)

    def flags(self, include_closed: bool, top: int = 5) -> list[LinkFlag]:
        """The worst active links (and, with ``include_closed``, cleared ones)."""
        chosen = list(self.active.values())
        if include_closed:
            chosen += list(self.closed)
        return sorted(chosen, key=lambda f: (not f.active, -f.slowdown))[:top]

    def reset(self) -> None:
        for key in list(self.active):
            flag = self.active.pop(key)
            flag.active = False
            self.closed.append(flag)
        self.test.reset()
        self.slot_cell[:] = -1
        self._last_positive = np.empty(0, dtype=np.int64)
