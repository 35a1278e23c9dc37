"""What one complete step says (design §4), computed from its dense arrays.

No estimator compares clocks across ranks: every quantity is a difference of two
times on the same rank (durations, expert compute) or a ratio across ranks of such
differences.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from epwatch.schema import Phase

D, C = int(Phase.DISPATCH), int(Phase.COMBINE)


def _quiet_nanmedian(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def expected_compute(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The group's expert compute for each rank's load, ``a + b n``, fitted over every
    (layer, rank) of the step; NaN where the rank received nothing.

    With no fixed cost (a = 0) ``x / expected`` is design §4's per-token cost ``x / n``
    up to a constant. Grouped GEMMs do have a fixed cost per call, and then ``x / n``
    would call every lightly loaded rank slow; the ratio to the fitted line does not.
    One straggler among P ranks barely moves the line, and the ratios are compared
    with their median across ranks anyway.
    """
    ok = (n > 0) & np.isfinite(x)
    xs, ns = x[ok], n[ok]
    a = 0.0
    if len(ns) > 2 and np.ptp(ns) > 0:
        nm, xm = ns.mean(), xs.mean()
        b = ((ns - nm) * (xs - xm)).sum() / ((ns - nm) ** 2).sum()
        a = xm - b * nm if b > 0 else 0.0
    if a <= 0:  # proportional: the per-token cost itself
        return np.where(n > 0, n, np.nan)
    return np.where(n > 0, a / b + n, np.nan)


@dataclass(frozen=True, slots=True)
class StepStats:
    step: int
    gamma: np.ndarray  # [L] max_r x / mean_r x
    skew: np.ndarray  # [L] max_r n / mean_r n
    transfer_s: np.ndarray  # [L, 2] t_xfer = min_r d
    volume_bytes: np.ndarray  # [L, 2] max_r max(send, recv): the busiest NIC direction
    send_bytes: np.ndarray  # [L, 2] V = max_r send: what sets the per-peer message
    compute_ratio: np.ndarray  # [P] median_l c_r / median_r' (median_l c_r')
    load_ratio: np.ndarray  # [P] median_l n_r / mean_r n
    arrival_lag_s: np.ndarray  # [P] median over layers and phases of max d - d_r
    lost_s: float  # sum_l (max_r x - mean_r x)
    compute_max_s: float  # median over layers of max_r x: what a layer's compute costs
    step_s: float  # median over ranks of the step's span on the rank's own clock
    dropped: np.ndarray  # [P] routed slots capacity dropped, summed over layers
    routed: np.ndarray  # [P] routed slots (kept + dropped), summed over layers
    capacity: np.ndarray  # [P] most slots kept in a layer that dropped some (NaN: none)


def durations(a: dict[str, np.ndarray]) -> np.ndarray:
    """d = exit - enter in seconds, ``[layer, phase, rank]``."""
    return (a["exit_ns"] - a["enter_ns"]) * 1e-9


def step_stats(step: int, a: dict[str, np.ndarray], d: np.ndarray) -> StepStats:
    """Estimator inputs of one step from its ``[layer, phase, rank]`` arrays and their
    durations ``d``.

    The Hockney fit pairs t_xfer with the busiest NIC direction, max(send, recv): on
    dispatch a hot expert's rank receives far more than anyone sends, and that is what
    the transfer waits for. The per-peer message size (the regime) stays design §4's
    ``max_r send_bytes / (P - 1)``.
    """
    enter, exit_ = a["enter_ns"], a["exit_ns"]
    x = (enter[:, C, :] - exit_[:, D, :]) * 1e-9
    x = np.where(x >= 0, x, np.nan)  # a negative gap is bad data, not fast compute
    kept = a["recv_tokens"][:, D, :]
    dropped = a["dropped_tokens"][:, D, :] if "dropped_tokens" in a else np.zeros_like(kept)
    # Per-token cost counts the slots a rank computed; the load is what the gates routed
    # to it, dropped slots included: a capacity-capped hot expert keeps only C per
    # source, and only its drops show how hot it is.
    n = kept.astype(np.float64)
    routed = (kept + dropped).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x_mean = np.nanmean(x, axis=1)
        gamma = np.nanmax(x, axis=1) / x_mean
        routed_mean = routed.mean(axis=1)
        skew = routed.max(axis=1) / routed_mean
        cost = x / expected_compute(x, n)
        cost_rank = _quiet_nanmedian(cost, axis=0)
        compute_ratio = cost_rank / _quiet_nanmedian(cost_rank)
        load_ratio = np.median(routed / routed_mean[:, None], axis=0)
        capacity = np.nanmax(np.where(dropped > 0, kept, np.nan), axis=0)
        x_max = np.nanmax(x, axis=1)
        lost = float(np.nansum(x_max - x_mean))
        compute_max = float(np.nanmedian(x_max))
    lag = d.max(axis=2, keepdims=True) - d
    span = (exit_[-1, C, :] - enter[0, D, :]) * 1e-9
    return StepStats(
        step=step,
        gamma=gamma,
        skew=skew,
        transfer_s=d.min(axis=2),
        volume_bytes=np.maximum(a["send_bytes"], a["recv_bytes"]).max(axis=2).astype(np.float64),
        send_bytes=a["send_bytes"].max(axis=2).astype(np.float64),
        compute_ratio=compute_ratio,
        load_ratio=load_ratio,
        arrival_lag_s=np.median(lag.reshape(-1, lag.shape[-1]), axis=0),
        lost_s=lost,
        compute_max_s=compute_max,
        step_s=float(np.median(span)),
        dropped=dropped.sum(axis=0),
        routed=routed.sum(axis=0),
        capacity=capacity,
    )
