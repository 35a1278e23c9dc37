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


def _float(v: Any) -> float:
    """A JSON number back to a float; null (unknown) is NaN."""
    return math.nan if v is None else float(v)


def _unclean(value: Any) -> Any:
    """Nested JSON with null numbers back to NaN (the inverse of :func:`_clean`)."""
    if isinstance(value, dict):
        return {k: _unclean(v) for k, v in value.items()}
    return math.nan if value is None else value


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
    fit_problem: str = ""  # why L and BW_eff are not published ("" when they are)

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
            "fit_problem": self.fit_problem or None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PhaseReport:
        return cls(
            latency_s=_float(d.get("latency_s")),
            bandwidth_Bps=_float(d.get("bandwidth_Bps")),
            r2=_float(d.get("r2")),
            n=int(d.get("n") or 0),
            regime=str(d.get("regime") or "unknown"),
            crossover_bytes=_float(d.get("crossover_bytes")),
            per_peer_message_bytes=_float(d.get("per_peer_message_bytes")),
            transfer_s=_float(d.get("transfer_s")),
            fit_problem=str(d.get("fit_problem") or ""),
        )


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
    slowdown_low: float = math.nan  # approximate 95% interval of the slowdown
    slowdown_high: float = math.nan
    opened_step: int = -1  # the step at which the evidence was enough to flag
    source: str = "records"  # what raised it: "records" (hooks) or "counters" (CUDA graphs)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "node": self.node,
            "cause": self.cause,
            "slowdown": _num(self.slowdown),
            "slowdown_low": _num(self.slowdown_low),
            "slowdown_high": _num(self.slowdown_high),
            "first_step": self.first_step,
            "opened_step": self.opened_step,
            "last_step": self.last_step,
            "active": self.active,
            "local_device": self.local_device,
            "source": self.source,
            "evidence": list(self.evidence),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StragglerReport:
        return cls(
            rank=int(d["rank"]),
            node=str(d.get("node") or ""),
            cause=str(d["cause"]),
            slowdown=_float(d.get("slowdown")),
            first_step=int(d["first_step"]),
            last_step=int(d["last_step"]),
            active=bool(d["active"]),
            local_device=int(d.get("local_device", -1)),
            evidence=tuple(str(e) for e in d.get("evidence") or ()),
            slowdown_low=_float(d.get("slowdown_low")),
            slowdown_high=_float(d.get("slowdown_high")),
            opened_step=int(d.get("opened_step", -1)),
            source=str(d.get("source") or "records"),
        )


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

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SuspectLink:
        return cls(
            int(d["src"]), int(d["dst"]), _float(d.get("slowdown")), int(d["first_step"]),
            int(d["last_step"]), bool(d["active"]),
        )  # fmt: skip


@dataclass(frozen=True)
class DropStats:
    """Per rank: the share of routed slots a capacity limit dropped, and the most slots
    it kept in a layer that dropped some (the capacity it ran into)."""

    fraction: Any  # np.ndarray [P]
    capacity: Any  # np.ndarray [P], NaN where nothing was dropped

    def line(self, rank: int) -> str:
        """"rank 1 dropped 33% of its routed tokens (capacity 256)"."""
        cap = self.capacity[rank]
        where = f" (capacity {int(cap)})" if math.isfinite(cap) else ""
        return f"rank {rank} dropped {self.fraction[rank]:.0%} of its routed tokens{where}"


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
    batch_ratio: tuple[float, ...] = ()
    arrival_lag_s: tuple[float, ...] = ()
    incomplete_steps: int = 0
    late_records: int = 0
    ignored_records: int = 0
    suspect_links: tuple[SuspectLink, ...] = ()
    restarts: int = 0
    whatif: dict[str, Any] = field(default_factory=dict)
    dropped_tokens_total: tuple[int, ...] = ()  # per rank, since the collector started
    dropped_fraction: tuple[float, ...] = ()  # per rank, over the window
    drop_capacity: tuple[float, ...] = ()  # per rank: slots kept where some were dropped
    mode: str = "records"  # "records", "counters" (CUDA graphs) or "mixed"
    intervals: int = 0  # counter-mode interval records received

    @property
    def balancedness(self) -> float:
        return 1.0 / self.skew_median if self.skew_median and self.skew_median > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ep_group": self.ep_group,
            "ranks": self.ranks,
            "mode": self.mode,
            "intervals": self.intervals,
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
            "batch_ratio": [_num(v) for v in self.batch_ratio],
            "arrival_lag_s": [_num(v) for v in self.arrival_lag_s],
            "dropped_fraction": [_num(v) for v in self.dropped_fraction],
            "dropped_tokens_total": list(self.dropped_tokens_total),
            "drop_capacity": [_num(v) for v in self.drop_capacity],
        }
        out["incomplete_steps"] = self.incomplete_steps
        out["late_records"] = self.late_records
        out["ignored_records"] = self.ignored_records
        out["restarts"] = self.restarts
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GroupReport:
        """A report from its JSON (the live API's, ``simulate --json``'s): what
        ``epwatch status`` renders. Raises KeyError, TypeError or ValueError on a
        document that is not one."""
        per_rank = d.get("per_rank") or {}

        def floats(key: str) -> tuple[float, ...]:
            return tuple(_float(v) for v in per_rank.get(key) or ())

        return cls(
            ep_group=str(d["ep_group"]),
            ranks=int(d["ranks"]),
            steps=int(d["steps"]),
            last_step=int(d["last_step"]),
            gamma_median=_float((d.get("gamma") or {}).get("median")),
            gamma_p99=_float((d.get("gamma") or {}).get("p99")),
            skew_median=_float((d.get("skew") or {}).get("median")),
            skew_max=_float((d.get("skew") or {}).get("max")),
            phases={
                name: PhaseReport.from_json(d[name])
                for name in ("dispatch", "combine")
                if isinstance(d.get(name), dict)
            },
            stragglers=tuple(StragglerReport.from_json(x) for x in d.get("stragglers") or ()),
            time_lost_per_step_s=_float(d.get("time_lost_per_step_s")),
            stalled_s=_float(d.get("stalled_s") or 0.0),
            nodes=tuple(str(n) for n in per_rank.get("node") or ()),
            compute_slowdown=floats("compute_slowdown"),
            load_ratio=floats("load_ratio"),
            arrival_lag_s=floats("arrival_lag_s"),
            batch_ratio=floats("batch_ratio"),
            incomplete_steps=int(d.get("incomplete_steps") or 0),
            late_records=int(d.get("late_records") or 0),
            ignored_records=int(d.get("ignored_records") or 0),
            suspect_links=tuple(SuspectLink.from_json(x) for x in d.get("suspect_links") or ()),
            restarts=int(d.get("restarts") or 0),
            whatif=_unclean(d.get("whatif") or {}),
            mode=str(d.get("mode") or "records"),
            intervals=int(d.get("intervals") or 0),
            dropped_tokens_total=tuple(int(v) for v in per_rank.get("dropped_tokens_total") or ()),
            dropped_fraction=floats("dropped_fraction"),
            drop_capacity=floats("drop_capacity"),
        )
