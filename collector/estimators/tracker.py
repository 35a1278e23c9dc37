"""Turning per-step evidence into straggler flags.

A rank is flagged once its windowed evidence has held for ``confirm`` consecutive
updates, and unflagged once it has failed for as many; one noisy step neither raises
nor clears a page. The flag keeps the first step its evidence held and the raw values
since, whose median is the reported slowdown.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from epwatch.collector.estimators.stats import _quiet_nanmedian

_KEEP_VALUES = 4096
CLOSED_FLAGS_KEPT = 64  # cleared flags remembered for the post-mortem report


@dataclass
class Flag:
    rank: int
    cause: str
    first_step: int
    last_step: int
    active: bool = True
    values: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP_VALUES))

    @property
    def slowdown(self) -> float:
        return float(np.median(np.fromiter(self.values, float))) if self.values else float("nan")


class CauseTracker:
    """Flags for one cause over ``P`` ranks from a stream of per-rank values."""

    def __init__(
        self,
        cause: str,
        world_size: int,
        threshold: float,
        window: int,
        confirm: int,
        noise_z: float = 0.0,
    ) -> None:
        self.cause = cause
        self.threshold = threshold
        self.noise_z = noise_z
        self.confirm = confirm
        self._hist = np.full((window, world_size), np.nan)
        self._n = 0
        self._above = np.zeros(world_size, dtype=np.int64)
        self._below = np.zeros(world_size, dtype=np.int64)
        self._run_start = np.zeros(world_size, dtype=np.int64)
        self.active: dict[int, Flag] = {}
        self.closed: deque[Flag] = deque(maxlen=CLOSED_FLAGS_KEPT)
        self.evidence = np.full(world_size, np.nan)

    def reset(self) -> None:
        """A new run: active flags close, the evidence window empties."""
        for rank in list(self.active):
            self._close(rank)
        self._hist[:] = np.nan
        self._n = 0
        self._above[:] = self._below[:] = 0
        self.evidence[:] = np.nan

    def _close(self, rank: int) -> None:
        flag = self.active.pop(rank)
        flag.active = False
        self.closed.append(flag)

    def effective_threshold(self, evidence: np.ndarray) -> float:
        """The fixed threshold, or ``noise_z`` robust spreads above 1 when the group's
        evidence is noisier than the threshold allows for."""
        if self.noise_z <= 0:
            return self.threshold
        finite = evidence[np.isfinite(evidence)]
        if len(finite) < 3:
            return self.threshold
        spread = 1.4826 * np.median(np.abs(finite - np.median(finite)))
        return max(self.threshold, 1.0 + self.noise_z * spread)

    def push(self, step: int, values: np.ndarray) -> None:
        i = self._n % len(self._hist)
        self._hist[i] = values
        self._n += 1
        self.evidence = _quiet_nanmedian(self._hist[: min(self._n, len(self._hist))], axis=0)
        above = self.evidence > self.effective_threshold(self.evidence)
        starting = above & (self._above == 0)
        self._run_start[starting] = step
        self._above = np.where(above, self._above + 1, 0)
        self._below = np.where(above, 0, self._below + 1)
        for rank in np.flatnonzero(self._above >= self.confirm):
            rank = int(rank)
            if rank not in self.active:
                self.active[rank] = Flag(rank, self.cause, int(self._run_start[rank]), step)
        for rank, flag in list(self.active.items()):
            if np.isfinite(values[rank]):
                flag.values.append(float(values[rank]))
            flag.last_step = step
            if self._below[rank] >= self.confirm:
                self._close(rank)

    def flags(self, include_closed: bool) -> list[Flag]:
        flags = list(self.active.values())
        return flags + list(self.closed) if include_closed else flags


@dataclass
class LinkFlag:
    src: int  # the sender whose data was slow to arrive
    dst: int  # the receiver that waited
    first_step: int
    last_step: int
    streak: int = 0
    ever_active: bool = False
    values: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    @property
    def slowdown(self) -> float:
        return float(np.median(np.fromiter(self.values, float))) if self.values else float("nan")


class LinkTracker:
    """Suspect links (design §4: a single cell of the wait matrix): a cell of the link-time
    matrix above ``threshold`` times what its row and column predict, in ``confirm``
    consecutive samples. Bounded: the ``per_sample`` worst cells of a sample are
    followed, and a link not seen for ``forget_after`` samples is dropped."""

    def __init__(
        self, threshold: float, confirm: int, per_sample: int = 16, forget_after: int = 8
    ) -> None:
        self.threshold = threshold
        self.confirm = confirm
        self.per_sample = per_sample
        self.forget_after = forget_after
        self._links: dict[tuple[int, int], LinkFlag] = {}
        self._seen: dict[tuple[int, int], int] = {}
        self._samples = 0

    def push(self, step: int, cells: np.ndarray) -> None:
        self._samples += 1
        finite = np.where(np.isfinite(cells), cells, 0.0)
        worst = np.argsort(finite, axis=None)[::-1][: self.per_sample]
        hits = set()
        for flat in worst.tolist():
            dst, src = divmod(flat, cells.shape[1])
            if finite[dst, src] <= self.threshold:
                break
            hits.add((src, dst))
            flag = self._links.setdefault((src, dst), LinkFlag(src, dst, step, step))
            flag.streak += 1
            flag.last_step = step
            flag.values.append(float(cells[dst, src]))
            flag.ever_active |= flag.streak >= self.confirm
            self._seen[(src, dst)] = self._samples
        for key, flag in list(self._links.items()):
            if key not in hits:
                flag.streak = 0
                if not flag.ever_active and self._samples - self._seen[key] > self.forget_after:
                    del self._links[key], self._seen[key]

    def flags(self, include_closed: bool, top: int = 5) -> list[LinkFlag]:
        """The worst active (or, with ``include_closed``, ever confirmed) links."""
        chosen = [
            f for f in self._links.values()
            if f.streak >= self.confirm or (include_closed and f.ever_active)
        ]  # fmt: skip
        return sorted(chosen, key=lambda f: -f.slowdown)[:top]

    def reset(self) -> None:
        self._links.clear()
        self._seen.clear()
