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
    """``np.nanmedian`` without its warnings, and without its cost when nothing is NaN
    (for small arrays it goes through masked arrays, 10x slower than ``np.median``)."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or not np.isnan(a).any():
        return np.median(a, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


_PEER_MEDIAN_UP_TO = 32  # ranks; beyond, one rank moves the group median by nothing


def peer_median(v: np.ndarray) -> np.ndarray:
    """``[P]`` the median of the *other* ranks' values, per rank (NaN ignored).

    With four ranks the plain median is the mean of the middle two, and a 1.3x
    straggler's own value pulls it up: it would read as 1.28x. Compared with its
    peers only, it reads 1.3x. Large groups use the plain median."""
    P = len(v)
    if P > _PEER_MEDIAN_UP_TO:
        return np.full(P, _quiet_nanmedian(v))
    others = np.where(np.eye(P, dtype=bool), np.nan, np.broadcast_to(v, (P, P)))
    return _quiet_nanmedian(others, axis=1)


def peer_ratio(v: np.ndarray) -> np.ndarray:
    """``v`` over :func:`peer_median`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return v / peer_median(v)


def expected_compute(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The group's expert compute for each rank's load, ``a + b n``, fitted over every
    (layer, rank) of the step, up to a constant; NaN where the rank received nothing.

    With no fixed cost (a = 0) ``x / expected`` is design §4's per-token cost ``x / n``
    up to a constant. Grouped GEMMs do have a fixed cost per call, and then ``x / n``
    would call every lightly loaded rank slow; the ratio to the fitted line does not.
    Capacity-padded layers (fairscale's ``Top2Gate``, GShard) compute the whole padded
    slab whatever the router filled: the time does not grow with the load (b <= 0),
    and the times themselves are compared. One straggler among P ranks barely moves
    the line, and the ratios are compared with their peers' median anyway.
    """
    ok = (n > 0) & np.isfinite(x)
    xs, ns = x[ok], n[ok]
    if len(ns) > 2 and np.ptp(ns) > 0:
        nm, xm = ns.mean(), xs.mean()
        b = ((ns - nm) * (xs - xm)).sum() / ((ns - nm) ** 2).sum()
        if b <= 0:  # padded: the load does not drive the time
            return np.where(n > 0, 1.0, np.nan)
        a = xm - b * nm
        if a > 0:
            return np.where(n > 0, a / b + n, np.nan)
    return np.where(n > 0, n, np.nan)  # proportional: the per-token cost itself


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
    batch_ratio: np.ndarray  # [P] bytes the rank dispatches (its own batch) / median
    pre_dispatch_ratio: np.ndarray  # [P] median_l time before dispatch / median rank's
    pre_dispatch_cost: np.ndarray  # [P] ... per token of the rank's batch, / median
    arrival_lag_s: np.ndarray  # [P] median over layers and phases of max d - d_r
    lost_s: float  # sum_l (max_r x - mean_r x)
    compute_max_s: float  # median over layers of max_r x: what a layer's compute costs
    step_s: float  # median over ranks of the step's span on the rank's own clock
    start_ns: np.ndarray  # [P] each rank's first dispatch enter (its own clock)
    end_ns: np.ndarray  # [P] each rank's last combine exit (its own clock)
    dropped: np.ndarray  # [P] routed slots capacity dropped, summed over layers
    routed: np.ndarray  # [P] routed slots (kept + dropped), summed over layers
    capacity: np.ndarray  # [P] most slots kept in a layer that dropped some (NaN: none)


def durations(a: dict[str, np.ndarray]) -> np.ndarray:
    """d = exit - enter in seconds, ``[layer, phase, rank]``."""
    return (a["exit_ns"] - a["enter_ns"]) * 1e-9


def pre_dispatch(
    a: dict[str, np.ndarray], prev_end_ns: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each rank's time before dispatch (attention and friends, design §4) over its
    median peer's, that time per token of the rank's own batch over the median's, and
    the batch itself (the bytes it dispatches) over the median's; ``[P]`` each.

    The time is from the end of a layer's combine to the next layer's dispatch, and
    from the previous step's last combine (``prev_end_ns``, when that step is the one
    just before) to the first dispatch; the median over layers shrugs off one spike.
    """
    enter, exit_ = a["enter_ns"], a["exit_ns"]
    gaps = (enter[1:, D, :] - exit_[:-1, C, :]) * 1e-9
    if prev_end_ns is not None:
        gaps = np.vstack([(enter[0, D, :] - prev_end_ns)[None, :] * 1e-9, gaps])
    sent = np.median(a["send_bytes"][:, D, :], axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batch = peer_ratio(np.where(sent > 0, sent, np.nan))
        if not len(gaps):
            nan = np.full(enter.shape[-1], np.nan)
            return nan, nan.copy(), batch
        gaps = np.where(gaps >= 0, gaps, np.nan)
        pre_ratio = peer_ratio(_quiet_nanmedian(gaps, axis=0))
        tokens = np.broadcast_to(sent, gaps.shape)
        cost_ratio = peer_ratio(_quiet_nanmedian(gaps / expected_compute(gaps, tokens), axis=0))
    return pre_ratio, cost_ratio, batch


def step_stats(
    step: int, a: dict[str, np.ndarray], d: np.ndarray, prev_end_ns: np.ndarray | None = None
) -> StepStats:
    """Estimator inputs of one step from its ``[layer, phase, rank]`` arrays and their
    durations ``d`` (and the previous step's last combine exits, when it is the step
    just before).

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
        compute_ratio = peer_ratio(_quiet_nanmedian(cost, axis=0))
        load_ratio = np.median(routed / routed_mean[:, None], axis=0)
        x_max = np.nanmax(x, axis=1)
        lost = float(np.nansum(x_max - x_mean))
        compute_max = float(np.nanmedian(x_max))
    # The most slots kept in a layer that dropped some (no all-NaN reduction: the
    # warnings filter is process-wide, and other threads run beside the estimators).
    most_kept = np.where(dropped > 0, kept, -1).max(axis=0)
    capacity = np.where(most_kept >= 0, most_kept, np.nan).astype(np.float64)
    lag = d.max(axis=2, keepdims=True) - d
    pre_ratio, pre_cost, batch = pre_dispatch(a, prev_end_ns)
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
        batch_ratio=batch,
        pre_dispatch_ratio=pre_ratio,
        pre_dispatch_cost=pre_cost,
        arrival_lag_s=np.median(lag.reshape(-1, lag.shape[-1]), axis=0),
        lost_s=lost,
        compute_max_s=compute_max,
        step_s=float(np.median(span)),
        start_ns=enter[0, D, :].copy(),
        end_ns=exit_[-1, C, :].copy(),
        dropped=dropped.sum(axis=0),
        routed=routed.sum(axis=0),
        capacity=capacity,
    )


def batch_evidence(recent: list[StepStats]) -> np.ndarray:
    """``[P]`` the ``batch`` cause's evidence for the newest of ``recent`` steps: a
    rank's own batch over its peers' while it also spends longer before dispatch than
    they do (the median over the recent steps: with a fixed cost before dispatch a
    1.2x batch makes a rank only a few percent later, within one step's noise), else
    at most 1 (a large batch that costs nothing is no straggler)."""
    pre = _quiet_nanmedian(np.stack([s.pre_dispatch_ratio for s in recent]), axis=0)
    batch = recent[-1].batch_ratio
    return np.where(pre > 1.0, batch, np.fmin(batch, 1.0))
