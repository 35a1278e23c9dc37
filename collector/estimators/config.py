"""Tunables of the estimators, with the defaults an operator starts from.

The diagnosis knobs are those of the sequential test (design §5,
``estimators/sequential.py``): how much standardised evidence opens a flag
(``enter_level``), how little lets it clear (``exit_level``) and for how long
(``clear_steps`` and ``clear_seconds``, both), how many observations a rank's noise is
estimated from (``noise_window``), and per cause the smallest effect worth a flag.
The defaults were tuned on ``bench/diagnosis_suite.py`` (simulated clusters of 4 to
256 ranks with heavy-tailed, shared and drifting noise) and on real gloo recordings
(``tests/data/recordings``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from epwatch import hockney
from epwatch.collector.estimators.sequential import SequentialParams

CAUSES = ("compute", "routing", "network", "batch", "link")


@dataclass(frozen=True)
class EstimatorConfig:
    window_steps: int = 120  # steps behind the window statistics and the Hockney fits
    # The sequential test (design §5).
    noise_window: int = 128  # observations behind each rank's noise estimate
    enter_level: float = 14.0  # evidence (noise units) that opens a flag
    exit_level: float = 3.0  # evidence below which a flagged rank counts as normal
    clear_steps: int = 30  # ... continuously for this many steps
    clear_seconds: float = 10.0  # ... and this many seconds, before the flag clears
    burst_steps: int = 8  # the group's noise is also measured over bursts this long
    hold_steps: int = 30  # a flag opens this many steps (and ...
    hold_seconds: float = 0.0  # ... seconds) after reaching enter_level; 1, 0: at once
    # Minimum effect sizes: what a rank (or link) must reach, over its group, to flag.
    compute_min_effect: float = 1.03  # per-token expert compute over the group median
    routing_min_effect: float = 1.2  # routed load over the mean load
    network_min_effect: float = 1.15  # time per byte of a rank's links over the group's
    link_min_effect: float = 1.25  # one link's time over what its two ends predict
    batch_min_effect: float = 1.1  # a rank's own (data-parallel) batch over the median
    hang_after_s: float = 5.0  # no collective completes this long while a rank lags
    buffer_bytes: int = 128 << 20  # memory for steps still being assembled
    max_slots: int = 32  # steps assembled at once (at most)
    max_fit_points: int = 4096  # per phase; the newest points of the window
    fit_min_size_spread: float = hockney.MIN_SIZE_SPREAD  # publish L, BW_eff only above
    fit_min_r2: float = hockney.MIN_R2  # ... and only when the fit explains this much
    max_layers: int = 128  # MoE layers per step; records of higher layers are ignored

    def __post_init__(self) -> None:
        for name in (
            "window_steps", "noise_window", "clear_steps", "burst_steps",
            "max_slots", "max_layers",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for cause in CAUSES:
            effect = getattr(self, f"{cause}_min_effect")
            if not effect > 1.0:
                raise ValueError(f"{cause}_min_effect must be > 1, got {effect}")
        if not 0 <= self.exit_level < self.enter_level:
            raise ValueError(
                f"exit_level must be in [0, enter_level), got {self.exit_level} "
                f"(enter_level {self.enter_level})"
            )
        for name in ("clear_seconds", "hold_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hang_after_s <= 0:
            raise ValueError(f"hang_after_s must be > 0, got {self.hang_after_s}")

    def sequential(self, cause: str) -> SequentialParams:
        """The sequential test's parameters for one cause."""
        params = SequentialParams(
            min_effect=getattr(self, f"{cause}_min_effect"),
            enter=self.enter_level,
            exit=self.exit_level,
            clear_steps=self.clear_steps,
            clear_s=self.clear_seconds,
            window=self.noise_window,
            burst_steps=self.burst_steps,
            hold_steps=self.hold_steps,
            hold_s=self.hold_seconds,
        )
        if cause == "network":  # sampled every few steps: fewer observations to wait for
            params = dataclasses.replace(params, warmup=4)
        if cause == "link":  # a link's noise comes from the sample's other cells
            params = dataclasses.replace(params, warmup=1)
        return params
