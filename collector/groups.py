"""Per-EP-group state: the estimator (an injected dependency), its lock and the newest
report, plus the rules that tie a group to one world size.

The estimator is created by a factory so the service runs and is tested without the
real estimators (``NullEstimator``) and the real ones plug in unchanged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from epwatch.collector.estimators.report import GroupReport
from epwatch.schema import Entered, IntervalColumns, PeerRows, RecordColumns, RecordError

log = logging.getLogger(__name__)

EvidenceFn = Callable[[str, str, int], list[str]]


class Estimator(Protocol):
    """What the collector needs from ``collector.estimators.GroupEstimator``."""

    def ingest(self, records: RecordColumns, node: str) -> None: ...
    def ingest_peer_rows(self, rows: PeerRows) -> None: ...
    def ingest_entered(self, entered: Entered, node: str, now_s: float) -> None: ...
    def ingest_intervals(self, rows: IntervalColumns, node: str, now_s: float) -> None: ...
    def counter_bytes_needed(self, local_experts: int) -> int: ...
    def update(self, now_s: float, final: bool = False) -> None: ...
    def report(
        self, evidence: EvidenceFn | None = None, include_closed: bool = False
    ) -> GroupReport: ...


EstimatorFactory = Callable[[str, int], Estimator]


class NullEstimator:
    """Accepts everything, estimates nothing: for ingest tests and estimator-less runs."""

    def __init__(self, ep_group: str, world_size: int) -> None:
        self.ep_group, self.world_size = ep_group, world_size

    def ingest(self, records: RecordColumns, node: str) -> None:
        pass

    def ingest_peer_rows(self, rows: PeerRows) -> None:
        pass

    def ingest_entered(self, entered: Entered, node: str, now_s: float) -> None:
        pass

    def ingest_intervals(self, rows: IntervalColumns, node: str, now_s: float) -> None:
        pass

    def counter_bytes_needed(self, local_experts: int) -> int:
        return 0

    def update(self, now_s: float, final: bool = False) -> None:
        pass

    def report(
        self, evidence: EvidenceFn | None = None, include_closed: bool = False
    ) -> GroupReport:
        return GroupReport(self.ep_group, self.world_size, steps=0, last_step=-1)


def default_factory(config: Any = None) -> EstimatorFactory:
    """The real estimators (tuned by an ``EstimatorConfig``) when installed, else
    :class:`NullEstimator` (with a warning)."""
    try:
        from epwatch.collector.estimators import GroupEstimator
    except ImportError as exc:
        log.warning("estimators unavailable (%s): ingest and /metrics only", exc)
        return NullEstimator
    return lambda group, ws: GroupEstimator(group, ws, config)


@dataclass
class Group:
    ep_group: str
    world_size: int
    estimator: Estimator
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_ingest_s: float = field(default_factory=time.monotonic)
    created_s: float = field(default_factory=time.monotonic)
    report: GroupReport | None = None  # the newest, set by the analyzer

    @property
    def established(self) -> bool:
        """It has completed a step, or its kernel counters have reported (counter
        mode completes no step): real ranks are behind it, not a stray name."""
        r = self.report
        return r is not None and (r.steps > 0 or r.intervals > 0)

    @property
    def memory_bytes(self) -> int:
        return int(getattr(self.estimator, "memory_bytes", 0))


class GroupTable:
    """Groups by name, created on first use, within a slot count and a memory budget.

    A group that has not completed a step is provisional: provisional groups may hold
    at most ``max_provisional`` slots, one that completes no step within
    ``provisional_grace_s`` gives its slot to a newcomer, and one idle that long is
    forgotten. So names that never form a step cannot lock a real group out. An
    established group idle for ``expire_after_s`` is forgotten (its series vanish); one
    quiet for ``resize_after_s`` may come back with another world size (its engine
    restarted at another EP width). Every group's estimator reserves its
    ``memory_bytes`` from ``memory_budget`` for as long as it lives."""

    def __init__(
        self,
        factory: EstimatorFactory,
        max_groups: int = 64,
        expire_after_s: float = 600.0,
        resize_after_s: float = 30.0,
        *,
        memory_budget: int | None = None,
        provisional_grace_s: float = 30.0,
        max_provisional: int | None = None,
    ) -> None:
        self._factory = factory
        self._max_groups = max_groups
        self._expire_after_s = expire_after_s
        self._resize_after_s = resize_after_s
        self._memory_budget = memory_budget
        self._grace_s = provisional_grace_s
        self._max_provisional = max_provisional or max_groups
        self._groups: dict[str, Group] = {}
        self._lock = threading.Lock()

    def get(self, ep_group: str, world_size: int) -> Group:
        """The group for a batch; RecordError if its world size disagrees, or if there
        is no slot or memory for a new one."""
        g = self._groups.get(ep_group)
        if g is not None and g.world_size == world_size:
            return g
        with self._lock:
            g = self._groups.get(ep_group)
            if g is None:
                return self._create(ep_group, world_size, replacing=None)
            if g.world_size == world_size:
                return g
            idle = time.monotonic() - g.last_ingest_s
            if idle < self._resize_after_s:
                raise RecordError(
                    "world_size_changed",
                    f"EP group {ep_group!r} has world_size {g.world_size}, batch says "
                    f"{world_size} (accepted once the group has been quiet for "
                    f"{self._resize_after_s:.0f} s: an engine restarted at another size)",
                )
            g = self._create(ep_group, world_size, replacing=g)
        log.info("EP group %s restarted with world_size %d", ep_group, world_size)
        return g

    def _create(self, ep_group: str, world_size: int, replacing: Group | None) -> Group:
        """A new provisional group (caller holds the lock)."""
        others = [g for g in self._groups.values() if g is not replacing]
        provisional = [g for g in others if not g.established]
        if replacing is None and (
            len(others) >= self._max_groups or len(provisional) >= self._max_provisional
        ):
            now = time.monotonic()
            stale = [g for g in provisional if now - g.created_s > self._grace_s]
            if not stale:
                kind = "groups" if len(others) >= self._max_groups else "new groups"
                raise RecordError(
                    "too_many_groups",
                    f"already {len(others) if kind == 'groups' else len(provisional)} EP "
                    f"{kind}; {ep_group!r} refused (a new group's slot frees when one has "
                    f"completed no step for {self._grace_s:.0f} s)",
                )
            victim = min(stale, key=lambda g: g.last_ingest_s)
            del self._groups[victim.ep_group]
            others.remove(victim)
            log.warning(
                "EP group %s completed no step: its slot goes to %s", victim.ep_group, ep_group
            )
        try:
            estimator = self._factory(ep_group, world_size)
        except ValueError as exc:
            raise RecordError("over_budget", f"EP group {ep_group!r}: {exc}") from None
        g = Group(ep_group, world_size, estimator)
        if self._memory_budget is not None:
            used = sum(o.memory_bytes for o in others)
            if used + g.memory_bytes > self._memory_budget:
                raise RecordError(
                    "over_budget",
                    f"EP group {ep_group!r} (world_size {world_size}) needs "
                    f"{g.memory_bytes >> 20} MiB; {used >> 20} of the collector's "
                    f"{self._memory_budget >> 20} MiB are in use",
                )
        self._groups[ep_group] = g
        if replacing is None:
            log.info("new EP group %s with world_size %d", ep_group, world_size)
        return g

    def make_room(self, group: Group, extra: int) -> None:
        """Check that ``group`` may grow by ``extra`` bytes (counter mode starting)
        within the collector-wide budget; RecordError ``over_budget`` if not."""
        if self._memory_budget is None or extra <= 0:
            return
        with self._lock:
            used = sum(g.memory_bytes for g in self._groups.values())
        if used + extra > self._memory_budget:
            raise RecordError(
                "over_budget",
                f"EP group {group.ep_group!r}: counter mode needs {extra >> 20} MiB more; "
                f"{used >> 20} of the collector's {self._memory_budget >> 20} MiB are in use",
            )

    def groups(self) -> list[Group]:
        with self._lock:
            return list(self._groups.values())

    def expire(self, now_s: float) -> list[str]:
        with self._lock:
            gone = [
                name
                for name, g in self._groups.items()
                if now_s - g.last_ingest_s
                > (
                    self._expire_after_s
                    if g.established
                    else min(self._grace_s, self._expire_after_s)
                )
            ]
            for name in gone:
                del self._groups[name]
        for name in gone:
            log.info("EP group %s expired without data", name)
        return gone


def finite(value: Any) -> float | None:
    """A JSON number worth exposing, or None (unknown, NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
