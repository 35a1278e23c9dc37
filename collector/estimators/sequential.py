"""Sequential evidence with hysteresis (design §5): when is a rank really slow, and
when is it really back to normal?

One :class:`SequentialTest` watches ``size`` series at once (the ranks of a group for
one cause, or the cells of a link matrix). Each observation is one log-ratio per
series, ``y = log(value / group reference)``, NaN where nothing was measured. The test
is a one-sided CUSUM of standardised excesses over the minimum effect:

    z = y / sigma,   k = max(log(min_effect) / sigma, allowance)
    S = max(0, S + clip(z - k, -clip, clip))

``sigma`` is the series' noise: from its own recent history (the spread of successive
differences, which a level shift barely moves) but never below the group's typical
noise, so four ranks are judged as well as 256; a caller may supply it instead. A
series flags when ``S`` reaches ``enter``; while flagged ``S`` is capped at
``enter + (enter - exit)``, and the flag clears only once ``S`` has stayed below
``exit`` for ``clear_steps`` steps *and* ``clear_s`` seconds. One heavy-tailed spike
moves ``S`` by at most ``clip``; a straggler that stays slow keeps ``S`` at the cap
and its flag open, one episode.

The class knows nothing of causes or estimators: it takes arrays and says which
series opened and which cleared, so any estimator can feed it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

_MAD_TO_SD = 1.4826
_NOISE_EVERY = 4  # observations between noise estimates


@dataclass(frozen=True)
class SequentialParams:
    """The test's knobs; the collector's flags set them (``EstimatorConfig``)."""

    min_effect: float = 1.03  # smallest ratio worth a flag
    enter: float = 10.0  # evidence that opens a flag (standardised units)
    exit: float = 3.0  # evidence below which a flagged series counts as normal again
    clear_steps: int = 30  # ... for at least this many steps
    clear_s: float = 10.0  # ... and this many seconds
    window: int = 64  # observations behind each series' noise estimate
    allowance: float = 1.0  # an observation must exceed this many noise units to count
    clip: float = 2.0  # one observation moves the evidence by at most this much
    min_noise: float = 0.005  # noise floor (log units): no series is judged noiseless
    warmup: int = 8  # observations of a series before it is tested

    def __post_init__(self) -> None:
        if not self.min_effect > 1.0:
            raise ValueError(f"min_effect must be > 1, got {self.min_effect}")
        if not 0 <= self.exit < self.enter:
            raise ValueError(f"need 0 <= exit < enter, got exit {self.exit}, enter {self.enter}")
        for name in ("clear_steps", "window", "warmup"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clear_s", "allowance", "min_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")

    @property
    def cap(self) -> float:
        return self.enter + (self.enter - self.exit)


class SequentialTest:
    """CUSUM with hysteresis over ``size`` series; see the module docstring."""

    def __init__(self, size: int, params: SequentialParams, history: bool = True) -> None:
        self.size = size
        self.p = params
        self.log_floor = math.log(params.min_effect)
        # Each series' recent observations, for its own noise (off for link matrices,
        # whose noise the caller gives).
        self._hist = np.full((params.window if history else 0, size), np.nan)
        self.reset()

    def reset(self) -> None:
        self.evidence = np.zeros(self.size)  # S
        self.flagged = np.zeros(self.size, dtype=bool)
        self.count = np.zeros(self.size, dtype=np.int64)  # observations seen
        self.run_start = np.full(self.size, -1, dtype=np.int64)  # step S last left 0
        self._run_start_obs = np.zeros(self.size, dtype=np.int64)  # ... as observation no.
        self.quiet_step = np.full(self.size, -1, dtype=np.int64)  # since S < exit (flagged)
        self.quiet_s = np.full(self.size, np.nan)
        self._hist[:] = np.nan
        self._n = 0
        self._noise: np.ndarray | None = None
        self._noise_at = 0

    def forget(self, index: np.ndarray | int) -> None:
        """Start some series afresh (a slot that now follows another series)."""
        self.evidence[index] = 0.0
        self.flagged[index] = False
        self.count[index] = 0
        self.run_start[index] = -1
        self._run_start_obs[index] = 0
        self.quiet_step[index] = -1
        self.quiet_s[index] = np.nan
        if len(self._hist):
            self._hist[:, index] = np.nan

    def excess(self, y: np.ndarray, sigma: np.ndarray | float) -> np.ndarray:
        """``y / sigma - k``: what an observation would add before clipping."""
        sigma = np.fmax(sigma, self.p.min_noise)
        with np.errstate(invalid="ignore", divide="ignore"):
            return y / sigma - np.maximum(self.log_floor / sigma, self.p.allowance)

    # -- noise -----------------------------------------------------------------------
    def noise(self) -> np.ndarray:
        """Each series' noise sd (log units): its own, at least the group's typical.
        Recomputed every few observations (it moves slowly; a median over the window
        per observation would dominate the estimators' time at P = 1024)."""
        if self._noise is None or self._n - self._noise_at >= _NOISE_EVERY:
            self._noise, self._noise_at = self._estimate_noise(), self._n
        return self._noise

    def _estimate_noise(self) -> np.ndarray:
        if not len(self._hist) or self._n < 3:
            return np.full(self.size, np.nan)
        rows = min(self._n, len(self._hist))
        order = (np.arange(rows) + (self._n - rows)) % len(self._hist)
        diffs = np.abs(np.diff(self._hist[order], axis=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            own = _MAD_TO_SD / math.sqrt(2) * np.nanmedian(diffs, axis=0)
            group = np.nanmedian(own)
        own = np.where(np.isfinite(own), own, group)
        return np.fmax(np.fmax(own, group), self.p.min_noise)

    # -- one observation -------------------------------------------------------------
    def observe(
        self, step: int, time_s: float, y: np.ndarray, noise: np.ndarray | float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feed log-ratios ``y`` (NaN: not observed) of ``step`` at run time ``time_s``;
        return the indices of series that opened a flag and that cleared one."""
        y = np.asarray(y, dtype=np.float64)
        if len(self._hist):
            self._hist[self._n % len(self._hist)] = y
            self._n += 1
        sigma = self.noise() if noise is None else np.broadcast_to(noise, y.shape)
        sigma = np.fmax(sigma, self.p.min_noise)
        seen = np.isfinite(y) & np.isfinite(sigma)
        self.count[seen] += 1
        tested = seen & (self.count >= self.p.warmup)
        inc = np.clip(self.excess(y, sigma), -self.p.clip, self.p.clip)
        before = self.evidence
        after = np.where(tested, np.maximum(0.0, before + np.where(tested, inc, 0.0)), before)
        starts = tested & (before <= 0) & (after > 0)
        self.run_start[starts] = step
        self._run_start_obs[starts] = self._n - 1
        opened = np.flatnonzero(~self.flagged & (after >= self.p.enter))
        self.flagged[opened] = True
        after = np.where(self.flagged, np.minimum(after, self.p.cap), after)
        self.evidence = after
        # Clearing: below the exit level, continuously, for long enough in steps and time.
        quiet = self.flagged & (after < self.p.exit)
        starting = quiet & (self.quiet_step < 0)
        self.quiet_step[starting] = step
        self.quiet_s[starting] = time_s
        self.quiet_step[~quiet] = -1
        self.quiet_s[~quiet] = np.nan
        with np.errstate(invalid="ignore"):
            done = (
                quiet
                & (step - self.quiet_step >= self.p.clear_steps)
                & (time_s - self.quiet_s >= self.p.clear_s)
            )
        cleared = np.flatnonzero(done)
        self.flagged[cleared] = False
        self.quiet_step[cleared] = -1
        self.quiet_s[cleared] = np.nan
        return opened, cleared

    def since_run_start(self, index: int) -> np.ndarray:
        """The series' finite observations since its evidence began (at most a
        window's), oldest first: what an episode's slowdown starts from."""
        if not len(self._hist):
            return np.empty(0)
        first = max(int(self._run_start_obs[index]), self._n - len(self._hist), 0)
        values = self._hist[np.arange(first, self._n) % len(self._hist), index]
        return values[np.isfinite(values)]


def slowdown_interval(log_values: np.ndarray, blocks: int = 10) -> tuple[float, float, float]:
    """The episode's slowdown and an approximate 95% interval, as ratios.

    The centre is the median; the interval comes from the spread of the medians of
    ``blocks`` consecutive blocks, so that slow wander within the episode (which makes
    neighbouring steps alike) widens it as it should. Short episodes use the values
    themselves."""
    v = np.asarray(log_values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, math.nan
    centre = float(np.median(v))
    n_blocks = min(blocks, len(v) // 4)
    if n_blocks >= 3:
        medians = np.array([np.median(b) for b in np.array_split(v, n_blocks)])
        spread = _MAD_TO_SD * float(np.median(np.abs(medians - np.median(medians))))
        se = spread / math.sqrt(n_blocks)
    else:
        spread = _MAD_TO_SD * float(np.median(np.abs(v - centre)))
        se = 1.2533 * spread / math.sqrt(len(v))  # the median's standard error
    return math.exp(centre), math.exp(centre - 2 * se), math.exp(centre + 2 * se)
