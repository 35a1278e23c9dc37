"""Robust fit of the Hockney model t = L + V / BW_eff.

Stragglers and retries produce points far above the line; an ordinary least-squares
fit would bend towards them and report a worse latency and bandwidth than the fabric
delivers. We start from Theil-Sen (median of pairwise slopes, on a bounded
deterministic subsample) and refine with Tukey-bisquare iteratively reweighted least
squares, which gives outliers zero weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from epwatch import costmodel

_MAX_THEIL_SEN_POINTS = 400
_BISQUARE_C = 4.685  # 95% efficiency under normal noise
_IRLS_ITERATIONS = 10


# When a fit is trustworthy enough to publish L and BW_eff (docs/design.md §4). Below
# 10% spread in message size the intercept and slope trade off against each other
# within the timing noise; below R^2 0.5 the line explains less than half of the
# variance of the transfer times (other jobs on the fabric, stragglers the robust
# weights did not remove), and L and BW_eff are numbers without a meaning.
MIN_SIZE_SPREAD = 0.1  # (p90 - p10) / median of the message sizes
MIN_R2 = 0.5
TOO_UNIFORM = "message sizes too uniform to separate L from BW"


class FitError(ValueError):
    """The points cannot support a fit (too few, or no spread in bytes)."""


@dataclass(frozen=True, slots=True)
class HockneyFit:
    latency_s: float  # L
    bandwidth_Bps: float  # BW_eff, bytes per second
    r2: float  # weighted coefficient of determination
    n: int  # points given
    inliers: int  # points with non-zero final weight

    @property
    def crossover_bytes(self) -> float:
        return costmodel.crossover_bytes(self.latency_s, self.bandwidth_Bps)

    def to_json(self) -> dict[str, float | int]:
        return {
            "latency_s": self.latency_s,
            "bandwidth_Bps": self.bandwidth_Bps,
            "r2": self.r2,
            "n": self.n,
            "inliers": self.inliers,
            "crossover_bytes": self.crossover_bytes,
        }


def _theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) > _MAX_THEIL_SEN_POINTS:
        pick = np.random.default_rng(0).choice(len(x), _MAX_THEIL_SEN_POINTS, replace=False)
        x, y = x[pick], y[pick]
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    slope = float(np.median((y[j] - y[i])[ok] / dx[ok]))
    intercept = float(np.median(y - slope * x))
    return intercept, slope


def _weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    sw = w.sum()
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = (w * (x - mx) ** 2).sum()
    slope = (w * (x - mx) * (y - my)).sum() / sxx
    return float(my - slope * mx), float(slope)


def fit(volume_bytes: np.ndarray, seconds: np.ndarray) -> HockneyFit:
    """Fit t = L + V / BW_eff to (bytes, seconds) pairs, ignoring outliers.

    Raises :class:`FitError` for fewer than 3 finite points, no spread in bytes, or a
    non-positive fitted slope (time that does not grow with bytes has no bandwidth).
    """
    x = np.asarray(volume_bytes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        raise FitError(f"need at least 3 points, got {len(x)}")
    if np.ptp(x) <= 0:
        raise FitError(f"{TOO_UNIFORM}: every point has the same byte count")
    # Work in scaled units so the normal equations stay well conditioned.
    xs, ys = x.max(), np.median(np.abs(y)) or 1.0
    xn, yn = x / xs, y / ys
    intercept, slope = _theil_sen(xn, yn)
    w = np.ones_like(xn)
    for _ in range(_IRLS_ITERATIONS):
        resid = yn - (intercept + slope * xn)
        scale = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        if scale <= 0:
            break
        u = resid / (_BISQUARE_C * scale)
        w = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
        if w.sum() <= 0 or np.ptp(xn[w > 0]) <= 0:
            break
        new = _weighted_line(xn, yn, w)
        converged = abs(new[0] - intercept) + abs(new[1] - slope) < 1e-10
        intercept, slope = new
        if converged:
            break
    if slope <= 0:
        raise FitError("transfer time does not grow with message size: no bandwidth to report")
    pred = intercept + slope * xn
    wm = (w * yn).sum() / w.sum() if w.sum() > 0 else yn.mean()
    ss_res = (w * (yn - pred) ** 2).sum()
    ss_tot = (w * (yn - wm) ** 2).sum()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return HockneyFit(
        latency_s=float(intercept * ys),
        bandwidth_Bps=float(xs / (slope * ys)),
        r2=float(r2),
        n=len(x),
        inliers=int((w > 0).sum()),
    )


def size_spread(volume_bytes: np.ndarray) -> float:
    """(p90 - p10) / median of the finite message sizes; 0 when there are none."""
    x = np.asarray(volume_bytes, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return 0.0
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return float((p90 - p10) / p50) if p50 > 0 else 0.0


def untrustworthy(
    volume_bytes: np.ndarray,
    result: HockneyFit,
    min_spread: float = MIN_SIZE_SPREAD,
    min_r2: float = MIN_R2,
) -> str | None:
    """Why L and BW_eff of ``result`` should not be published, or None when they can."""
    spread = size_spread(volume_bytes)
    if spread < min_spread:
        return f"{TOO_UNIFORM}: spread {spread:.0%}, need {min_spread:.0%}"
    if not math.isfinite(result.r2) or result.r2 < min_r2:
        return f"fit too poor to trust: R^2 {result.r2:.2f}, need {min_r2:.2f}"
    return None
