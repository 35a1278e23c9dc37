"""Network attribution from per-peer wait rows (DESIGN section 4).

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

from collector.estimators.stats import C, D, _quiet_nanmedian


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


def rank_link_slowdown(
    matrices: dict[int, np.ndarray], durations: dict[int, np.ndarray]
) -> np.ndarray:
    """[P] each rank's links over the group's (NaN where not measurable).

    ``matrices[phase]`` is the ``[P, P]`` wait matrix of one sampled layer and
    ``durations[phase]`` the ``[P]`` collective durations d of that layer.
    """
    out: np.ndarray | None = None
    for phase, wait in matrices.items():
        d = durations[phase]
        t = link_times(wait, d.max() - d)
        if phase == D:  # column j: everyone waiting for j's sends
            ratio = _relative(_covered_median(t, axis=0))
        elif phase == C:  # row i: i waiting for everyone's sends
            ratio = _relative(_covered_median(t, axis=1))
        else:
            continue
        out = ratio if out is None else np.fmax(out, ratio)
    if out is None:
        raise ValueError("no dispatch or combine matrix given")
    return out
