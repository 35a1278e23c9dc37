"""The diagnosis of one EP group, as the ``simulate`` / ``demo`` JSON and for /metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _num(v: float | None) -> float | None:
    """JSON has no NaN: unknown values are null."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _clean(value: Any) -> Any:
    """Nested JSON with unknown numbers as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, bool | str) or value is None:
        return value
    return _num(value)


@dataclass(frozen=True)
class PhaseReport:
    latency_s: float = math.nan
    bandwidth_Bps: float = math.nan
    r2: float = math.nan
    n: int = 0
    regime: str = "unknown"
    crossover_bytes: float = math.nan
    per_peer_message_bytes: float = math.nan
    transfer_s: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "latency_s": _num(self.latency_s),
            "bandwidth_Bps": _num(self.bandwidth_Bps),
            "r2": _num(self.r2),
            "regime": self.regime,
            "n": self.n,
            "crossover_bytes": _num(self.crossover_bytes),
            "per_peer_message_bytes": _num(self.per_peer_message_bytes),
            "transfer_s": _num(self.transfer_s),
        }


@dataclass(frozen=True)
class StragglerReport:
    rank: int
    node: str
    cause: str
    slowdown: float
    first_step: int
    last_step: int
    active: bool
    local_device: int = -1
    evidence: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "node": self.node,
            "cause": self.cause,
            "slowdown": _num(self.slowdown),
            "first_step": self.first_step,
            "last_step": self.last_step,
            "active": self.active,
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True)
class SuspectLink:
    src: int  # sender whose data arrived late
    dst: int  # receiver that waited
    slowdown: float
    first_step: int
    last_step: int
    active: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "slowdown": _num(self.slowdown),
            "first_step": self.first_step,
            "last_step": self.last_step,
            "active": self.active,
        }


@dataclass(frozen=True)
class GroupReport:
    ep_group: str
    ranks: int
    steps: int
    last_step: int
    gamma_median: float = math.nan
    gamma_p99: float = math.nan
    skew_median: float = math.nan
    skew_max: float = math.nan
    phases: dict[str, PhaseReport] = field(default_factory=dict)
    stragglers: tuple[StragglerReport, ...] = ()
    time_lost_per_step_s: float = math.nan
    stalled_s: float = 0.0
    nodes: tuple[str, ...] = ()
    compute_slowdown: tuple[float, ...] = ()
    load_ratio: tuple[float, ...] = ()
    arrival_lag_s: tuple[float, ...] = ()
    incomplete_steps: int = 0
    late_records: int = 0
    ignored_records: int = 0
    suspect_links: tuple[SuspectLink, ...] = ()
    restarts: int = 0
    whatif: dict[str, Any] = field(default_factory=dict)
    mode: str = "records"  # "records", "counters" (CUDA graphs) or "mixed"

    @property
    def balancedness(self) -> float:
        return 1.0 / self.skew_median if self.skew_median and self.skew_median > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ep_group": self.ep_group,
            "ranks": self.ranks,
            "mode": self.mode,
            "steps": self.steps,
            "last_step": self.last_step,
            "gamma": {"median": _num(self.gamma_median), "p99": _num(self.gamma_p99)},
            "skew": {"median": _num(self.skew_median), "max": _num(self.skew_max)},
            "balancedness": _num(self.balancedness),
        }
        for name in ("dispatch", "combine"):
            out[name] = self.phases.get(name, PhaseReport()).to_json()
        out["stragglers"] = [s.to_json() for s in self.stragglers]
        out["suspect_links"] = [link.to_json() for link in self.suspect_links]
        out["time_lost_per_step_s"] = _num(self.time_lost_per_step_s)
        out["whatif"] = _clean(self.whatif)
        out["stalled_s"] = _num(self.stalled_s)
        out["per_rank"] = {
            "node": list(self.nodes),
            "compute_slowdown": [_num(v) for v in self.compute_slowdown],
            "load_ratio": [_num(v) for v in self.load_ratio],
            "arrival_lag_s": [_num(v) for v in self.arrival_lag_s],
        }
        out["incomplete_steps"] = self.incomplete_steps
        out["late_records"] = self.late_records
        out["ignored_records"] = self.ignored_records
        out["restarts"] = self.restarts
        return out
