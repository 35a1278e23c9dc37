"""Network attribution from per-peer wait rows (docs/design.md §4).

``wait[i, j]`` is how long rank i waited, from entering, for rank j's data. Part of
that wait is only j arriving late (a compute straggler), which the clock-free arrival
lags tell us: ``enter_j - enter_i = lag_j - lag_i``. What remains is the link's
transfer time ``T[i, j] = wait[i, j] - (lag_j - lag_i)``; cells with no wait (the data
was there first) say nothing and are left out.

Senders are compared on dispatch and receivers on combine, so a hot expert (a big
receiver on dispatch, a big sender on combine) does not pass for a slow link.

A rank's links are compared on their bandwidth term: the link time less the fitted
latency L, per byte of the busier end of the link (the sender's total send, or the
receiver's total receive, whichever is larger). With small per-peer messages L is
most of a link's time, and a NIC at a third of its bandwidth would otherwise read as
a few percent slower; per byte, a rank whose own batch is larger does not pass for a
slow NIC. The ratio is that NIC's own slowdown.
"""

from __future__ import annotations

import numpy as np

from epwatch.collector.estimators.stats import C, D, _quiet_nanmedian, peer_ratio


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
    return peer_ratio(medians)


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


def less_latency(t: np.ndarray, latency_s: float) -> np.ndarray:
    """``T - L``, NaN where nothing is left. ``L`` is capped below the matrix's
    typical time, so that a poor fit cannot leave nothing to compare."""
    typical = float(_quiet_nanmedian(t))
    if not (np.isfinite(latency_s) and latency_s > 0 and np.isfinite(typical)):
        return t
    out = t - min(latency_s, 0.8 * typical)
    out[~(out > 0)] = np.nan
    return out


def bandwidth_term(
    t: np.ndarray, latency_s: float, send_bytes: np.ndarray, recv_bytes: np.ndarray
) -> np.ndarray:
    """``[P, P]`` seconds per byte of each link beyond the latency, ``(T - L) / V``,
    with ``V[i, j] = max(send_j, recv_i)``, the busier end of the link."""
    volume = np.maximum(send_bytes[None, :], recv_bytes[:, None]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return less_latency(t, latency_s) / np.where(volume > 0, volume, np.nan)


def link_slowdown(
    matrices: dict[int, np.ndarray],
    durations: dict[int, np.ndarray],
    latency_s: dict[int, float] | None = None,
    send_bytes: dict[int, np.ndarray] | None = None,
    recv_bytes: dict[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each rank's NIC slowdown, ``[P]``, and each link's time over what its two ends
    predict, ``[P, P]`` (receiver i, sender j); NaN where not measurable.

    ``matrices[phase]`` is the ``[P, P]`` wait matrix of one sampled layer,
    ``durations[phase]`` the ``[P]`` collective durations d of that layer, and, when
    known, ``latency_s[phase]`` the fitted L and ``send_bytes`` / ``recv_bytes`` the
    ``[P]`` bytes each rank sent and received in it (without them the whole link time
    is compared).
    """
    ranks: np.ndarray | None = None
    cells: np.ndarray | None = None
    for phase, wait in matrices.items():
        if phase not in (D, C):
            continue
        d = durations[phase]
        t = link_times(wait, d.max() - d)
        latency = (latency_s or {}).get(phase, 0.0)
        if send_bytes is not None and recv_bytes is not None:
            per_byte = bandwidth_term(t, latency, send_bytes[phase], recv_bytes[phase])
        else:
            per_byte = less_latency(t, latency)
        if phase == D:  # column j: everyone waiting for j's sends
            ratio = _relative(_covered_median(per_byte, axis=0))
        else:  # row i: i waiting for everyone's sends
            ratio = _relative(_covered_median(per_byte, axis=1))
        ranks = ratio if ranks is None else np.fmax(ranks, ratio)
        cell = cell_slowdown(less_latency(t, latency))
        cells = cell if cells is None else np.fmax(cells, cell)
    if ranks is None or cells is None:
        raise ValueError("no dispatch or combine matrix given")
    return ranks, cells
