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
noise, step to step and over bursts of ``burst_steps`` (a contended host slows a rank
for a second or two at a time); so four ranks are judged as well as 256. A caller
may supply it instead.

A series flags when ``S`` reaches ``enter`` (and, if asked, has not fallen below the
midway level for ``hold_steps`` steps and ``hold_s`` seconds since); ``S`` is capped at
``enter + (enter - exit)``, and the flag clears only once ``S`` is below ``exit`` and
has stayed below the midway level for ``clear_steps`` steps *and* ``clear_s``
seconds. One heavy-tailed spike
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

from epwatch.collector.estimators.stats import _quiet_nanmedian

_MAD_TO_SD = 1.4826
_NOISE_EVERY = 8  # observations between noise estimates


@dataclass(frozen=True)
class SequentialParams:
    """The test's knobs; the collector's flags set them (``EstimatorConfig``)."""

    min_effect: float = 1.03  # smallest ratio worth a flag
    enter: float = 14.0  # evidence that opens a flag (standardised units)
    exit: float = 3.0  # evidence below which a flagged series counts as normal again
    clear_steps: int = 30  # ... for at least this many steps
    clear_s: float = 10.0  # ... and this many seconds
    window: int = 128  # observations behind each series' noise estimate
    allowance: float = 1.0  # an observation must exceed this many noise units to count
    clip: float = 2.0  # one observation moves the evidence by at most this much
    min_noise: float = 0.005  # noise floor (log units): no series is judged noiseless
    warmup: int = 8  # observations of a series before it is tested
    burst_steps: int = 8  # the group's noise is also measured over this many steps
    hold_steps: int = 30  # evidence must hold (above midway) this many steps ...
    hold_s: float = 0.0  # ... and seconds after reaching ``enter`` before a flag opens

    def __post_init__(self) -> None:
        if not self.min_effect > 1.0:
            raise ValueError(f"min_effect must be > 1, got {self.min_effect}")
        if not 0 <= self.exit < self.enter:
            raise ValueError(f"need 0 <= exit < enter, got exit {self.exit}, enter {self.enter}")
        for name in ("clear_steps", "window", "warmup", "burst_steps", "hold_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clear_s", "hold_s", "allowance", "min_noise"):
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
        self.pending_step = np.full(self.size, -1, dtype=np.int64)  # since S >= enter
        self.pending_s = np.full(self.size, np.nan)
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
        self.pending_step[index] = -1
        self.pending_s[index] = np.nan
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
        h = self._hist[order]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            own = _MAD_TO_SD / math.sqrt(2) * _quiet_nanmedian(np.abs(np.diff(h, axis=0)), axis=0)
            group = _quiet_nanmedian(own)
            b = self.p.burst_steps
            if b > 1 and rows >= 3 * b:
                # Bursts: the group's typical only. A rank's own would count its own
                # onset (a level shift) or its own wandering slowness as noise.
                group = np.fmax(group, _quiet_nanmedian(_burst_noise(h, b)))
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
        # Opening: at the enter level, and (when asked to hold) for hold_steps steps and
        # hold_s seconds since it first got there without falling below midway.
        mid = (self.p.enter + self.p.exit) / 2
        at_enter = ~self.flagged & (after >= self.p.enter)
        new = at_enter & (self.pending_step < 0)
        self.pending_step[new] = step
        self.pending_s[new] = time_s
        lapsed = self.flagged | (after < mid)
        self.pending_step[lapsed] = -1
        self.pending_s[lapsed] = np.nan
        with np.errstate(invalid="ignore"):
            held = (
                (self.pending_step >= 0)
                & (step - self.pending_step >= self.p.hold_steps - 1)
                & (time_s - self.pending_s >= self.p.hold_s)
            )
        opened = np.flatnonzero(at_enter & held)
        self.flagged[opened] = True
        self.pending_step[opened] = -1
        self.pending_s[opened] = np.nan
        after = np.minimum(after, self.p.cap)
        self.evidence = after
        # Clearing: below the exit level, and for long enough in steps and time without
        # climbing back half-way to the enter level (a burst's few units of evidence
        # do not restart the clock; a straggler coming back does).
        below = self.flagged & (after < self.p.exit)
        calm = self.flagged & (after < mid)
        starting = below & (self.quiet_step < 0)
        self.quiet_step[starting] = step
        self.quiet_s[starting] = time_s
        self.quiet_step[~calm] = -1
        self.quiet_s[~calm] = np.nan
        with np.errstate(invalid="ignore"):
            done = (
                below
                & (self.quiet_step >= 0)
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


def _burst_noise(h: np.ndarray, b: int) -> np.ndarray:
    """Noise at the scale of ``b`` steps: differences of consecutive ``b``-step means,
    scaled back to one step (``sqrt(b / 2)``). Equal to the step-to-step estimate for
    independent noise, larger when slow episodes come in bursts (a contended host), so
    that a burst of several slow steps is not taken for a straggler. A level shift
    touches only the differences that straddle it."""
    finite = np.isfinite(h)
    csum = np.vstack([np.zeros((1, h.shape[1])), np.cumsum(np.where(finite, h, 0.0), axis=0)])
    ccount = np.vstack([np.zeros((1, h.shape[1])), np.cumsum(finite, axis=0)])
    n = ccount[b:] - ccount[:-b]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n >= b / 2, (csum[b:] - csum[:-b]) / n, np.nan)
    d = np.abs(mean[b:] - mean[:-b])
    return _MAD_TO_SD * _quiet_nanmedian(d, axis=0) * math.sqrt(b / 2)


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
