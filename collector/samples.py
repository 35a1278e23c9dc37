"""Node samples from the agents, kept per node and re-exposed with a ``node`` label.

Each ``NodeSample`` replaces its node's previous round (a sampler that failed leaves
its series out and reports ``epwatch_sampler_up 0``). Points are validated on ingest
(names, label names, kinds, collisions with the collector's own names) so that one
bad agent cannot make ``/metrics`` unparseable for everyone.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from epwatch.names import check_label_value
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RecordError

NAME_RE = re.compile(r"^epwatch_[a-zA-Z0-9_]+$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_POINTS = 4_096  # per message, and so per node (a round replaces the node's last)
MAX_TOTAL_POINTS = 500_000  # every node's together
MAX_LABELS = 16
MAX_NAMES = 2_000
MAX_NODES = 10_000
GAUGE = pb.MetricPoint.Kind.GAUGE
COUNTER = pb.MetricPoint.Kind.COUNTER


@dataclass(frozen=True, slots=True)
class _Point:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float
    counter: bool


@dataclass(slots=True)
class _NodeRound:
    received_s: float
    points: list[_Point]


def _family(name: str, kind: int) -> str:
    return name[: -len("_total")] if kind == COUNTER else name


class NodeSampleStore(Collector):
    """The newest sample round of every node; a prometheus-client custom collector."""

    def __init__(self, reserved_names: Iterable[str], stale_after_s: float = 300.0) -> None:
        self._reserved = frozenset(reserved_names)
        self._stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeRound] = {}
        self._total = 0  # points held over every node
        # family and sample names -> the (name, kind) that first used them
        self._owners: dict[str, tuple[str, int]] = {}
        self._help: dict[str, str] = {}

    def validate(self, sample: pb.NodeSample, node: str = "") -> None:
        """Raise RecordError(reason='bad_sample') naming the first bad point."""
        if len(sample.points) > MAX_POINTS:
            raise RecordError("bad_sample", f"{len(sample.points)} points > {MAX_POINTS}")
        with self._lock:
            full = node not in self._nodes and len(self._nodes) >= MAX_NODES
            previous = self._nodes.get(node)
            total = self._total - (len(previous.points) if previous else 0) + len(sample.points)
        if full:
            raise RecordError("bad_sample", f"already {MAX_NODES} nodes; {node!r} refused")
        if total > MAX_TOTAL_POINTS:
            raise RecordError(
                "bad_sample", f"the nodes' samples would hold {total} series > {MAX_TOTAL_POINTS}"
            )
        claimed: dict[str, tuple[str, int]] = {}
        for p in sample.points:
            name = p.name
            if not NAME_RE.match(name):
                raise RecordError("bad_sample", f"metric name {name!r} is not epwatch_[a-z0-9_]+")
            if p.kind not in (GAUGE, COUNTER):
                raise RecordError("bad_sample", f"metric {name!r} has unknown kind {p.kind}")
            if p.kind == COUNTER and not name.endswith("_total"):
                raise RecordError("bad_sample", f"counter {name!r} must end in _total")
            keys = {name, _family(name, p.kind)}
            if keys & self._reserved:
                raise RecordError("bad_sample", f"metric name {name!r} is the collector's own")
            for key in keys:
                with self._lock:
                    owner = self._owners.get(key)
                    full = len(self._owners) >= MAX_NAMES
                if owner is None and full:
                    raise RecordError("bad_sample", f"too many metric names; {name!r} refused")
                owner = claimed.setdefault(key, owner or (name, p.kind))
                if owner != (name, p.kind):
                    raise RecordError(
                        "bad_sample", f"metric {name!r} clashes with {owner[0]!r} (name or kind)"
                    )
            if len(p.labels) > MAX_LABELS:
                raise RecordError(
                    "bad_sample", f"metric {name!r} has more than {MAX_LABELS} labels"
                )
            for key, value in p.labels.items():
                if not LABEL_RE.match(key) or key.startswith("__"):
                    raise RecordError("bad_sample", f"label name {key!r} of {name!r} is invalid")
                check_label_value(f"label {key!r} of {name!r}", value)

    def update(self, node: str, sample: pb.NodeSample, now_s: float | None = None) -> None:
        """Replace ``node``'s round (call :meth:`validate` first)."""
        points = []
        with self._lock:
            for p in sample.points:
                for key in (p.name, _family(p.name, p.kind)):
                    self._owners.setdefault(key, (p.name, p.kind))
                if p.help and p.name not in self._help:
                    self._help[p.name] = p.help[:512]
                labels = {k: v for k, v in p.labels.items() if k != "node"}
                labels["node"] = node
                points.append(
                    _Point(p.name, tuple(sorted(labels.items())), p.value, p.kind == COUNTER)
                )
            previous = self._nodes.get(node)
            self._total += len(points) - (len(previous.points) if previous else 0)
            self._nodes[node] = _NodeRound(time.monotonic() if now_s is None else now_s, points)

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        with self._lock:
            for node in [
                n for n, r in self._nodes.items() if now - r.received_s > self._stale_after_s
            ]:
                self._total -= len(self._nodes.pop(node).points)
            rounds = list(self._nodes.values())
            helps = dict(self._help)
        series: dict[tuple[str, bool], dict[tuple[tuple[str, str], ...], float]] = {}
        for r in rounds:
            for p in r.points:
                series.setdefault((p.name, p.counter), {})[p.labels] = p.value
        for name, counter in sorted(series):
            family = name[: -len("_total")] if counter else name
            doc = helps.get(name) or f"{name} (node sample)"
            metric = Metric(family, doc, "counter" if counter else "gauge")
            for labels, value in series[(name, counter)].items():
                if counter and not (math.isfinite(value) and value >= 0):
                    continue  # a counter sample must be a finite non-negative number
                metric.add_sample(name, dict(labels), value)
            yield metric
