"""Network attribution from per-peer wait rows (docs/design.md §4).

``wait[i, j]`` is how long rank i waited, from entering, for rank j's data. Part of
that wait is only j arriving late (a compute straggler), which the clock-free arrival
lags tell us: ``enter_j - enter_i = lag_j - lag_i``. What remains is the link's
transfer time ``T[i, j] = wait[i, j] - (lag_j - lag_i)``; cells with no wait (the data
was there first) say nothing and are left out.

Senders are compared on dispatch, where every rank sends the same volume, and
receivers on combine, where every rank gets its own slots back, so a hot expert (a big
receiver on dispatch, a big sender on combine) does not pass for a slow link.
"""

from __future__ import annotations

import numpy as np

from epwatch.collector.estimators.stats import C, D, _quiet_nanmedian


def link_times(wait_s: np.ndarray, lag_s: np.ndarray) -> np.ndarray:
    """``T[i, j]`` from a ``[P, P]`` wait matrix (NaN rows for missing ranks)."""
    t = wait_s - (lag_s[None, :] - lag_s[:, None])
    t[~(wait_s > 0)] = np.nan
    np.fill_diagonal(t, np.nan)
    return t


_MIN_COVERAGE = 0.5


def _covered_median(t: np.ndarray, axis: int) -> np.ndarray:
    """Median link time per row or column, NaN where fewer than half of the cells
    carry a wait. A rank that entered late sees only the latest senders' data still
    in flight; the median of those few cells would call it a slow receiver."""
    med = _quiet_nanmedian(t, axis=axis)
    count = np.isfinite(t).sum(axis=axis)
    med[count < max(2, _MIN_COVERAGE * (t.shape[axis] - 1))] = np.nan
    return med


def _relative(medians: np.ndarray) -> np.ndarray:
    ref = _quiet_nanmedian(medians)
    return medians / ref if ref and np.isfinite(ref) else np.full_like(medians, np.nan)


def cell_slowdown(t: np.ndarray) -> np.ndarray:
    """``[P, P]`` each link's time over what its receiver's row and sender's column
    predict (``row_i * col_j / overall``): one slow cable or switch port between two
    ranks stands out here while every row and column median stays normal."""
    row = _quiet_nanmedian(t, axis=1)
    col = _quiet_nanmedian(t, axis=0)
    overall = _quiet_nanmedian(t)
    if not overall or not np.isfinite(overall):
        return np.full_like(t, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return t / (np.outer(row, col) / overall)


def link_slowdown(
    matrices: dict[int, np.ndarray], durations: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Each rank's links over the group's, ``[P]``, and each link's over what its two
    ends predict, ``[P, P]`` (receiver i, sender j); NaN where not measurable.

    ``matrices[phase]`` is the ``[P, P]`` wait matrix of one sampled layer and
    ``durations[phase]`` the ``[P]`` collective durations d of that layer.
    """
    ranks: np.ndarray | None = None
    cells: np.ndarray | None = None
    for phase, wait in matrices.items():
        d = durations[phase]
        t = link_times(wait, d.max() - d)
        if phase == D:  # column j: everyone waiting for j's sends
            ratio = _relative(_covered_median(t, axis=0))
        elif phase == C:  # row i: i waiting for everyone's sends
            ratio = _relative(_covered_median(t, axis=1))
        else:
            continue
        ranks = ratio if ranks is None else np.fmax(ranks, ratio)
        cell = cell_slowdown(t)
        cells = cell if cells is None else np.fmax(cells, cell)
    if ranks is None or cells is None:
        raise ValueError("no dispatch or combine matrix given")
    return ranks, cells
