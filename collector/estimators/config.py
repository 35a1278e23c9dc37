"""Tunables of the estimators, with the defaults an operator starts from."""

from __future__ import annotations

from dataclasses import dataclass

from epwatch import hockney


@dataclass(frozen=True)
class EstimatorConfig:
    window_steps: int = 120  # steps behind the window statistics and the Hockney fits
    evidence_steps: int = 8  # rolling window of per-step evidence behind a flag
    confirm_steps: int = 5  # consecutive steps evidence must hold to flag (and to clear)
    compute_threshold: float = 1.02  # per-token cost over the group median
    compute_noise_z: float = 5.0  # ... or this many robust spreads above 1, if larger
    routing_threshold: float = 1.5  # routed load over the mean load
    network_threshold: float = 1.25  # a rank's link times over the group's
    link_threshold: float = 1.5  # one link's time over what its two ends predict
    network_evidence_samples: int = 3  # sampled steps behind a network flag
    network_confirm_samples: int = 2
    hang_after_s: float = 5.0  # no collective completes this long while a rank lags
    buffer_bytes: int = 128 << 20  # memory for steps still being assembled
    max_slots: int = 32  # steps assembled at once (at most)
    max_fit_points: int = 4096  # per phase; the newest points of the window
    fit_min_size_spread: float = hockney.MIN_SIZE_SPREAD  # publish L, BW_eff only above
    fit_min_r2: float = hockney.MIN_R2  # ... and only when the fit explains this much
    max_layers: int = 128  # MoE layers per step; records of higher layers are ignored

    def __post_init__(self) -> None:
        for name in ("window_steps", "evidence_steps", "confirm_steps", "max_slots", "max_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in (
            "compute_threshold", "routing_threshold", "network_threshold", "link_threshold"
        ):  # fmt: skip
            if getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be > 1, got {getattr(self, name)}")
        if self.hang_after_s <= 0:
            raise ValueError(f"hang_after_s must be > 0, got {self.hang_after_s}")
