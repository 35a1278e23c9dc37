"""What the agents report about themselves, mirrored for /metrics.

Every message carries the sending agent's ``AgentStats`` (running totals). The table
keeps the newest per agent and sums them per node at scrape time; a restarted agent is
a new ``agent_id`` and its predecessor's totals stay in the sum, so the per-node
counters keep increasing. Agents with no open stream are forgotten LRU past a bound,
their totals folded into their node's until the node itself has been gone an hour.
Only messages that passed validation reach this table.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epwatch.protos import epwatch_pb2 as pb

SPOOL_STALE_S = 300.0
RETIRED_KEEP_S = 3600.0

_CONNECTED = ("epwatch_agents_connected", "Agents with an open stream")
_PER_NODE = (
    (CounterMetricFamily, "epwatch_agent_records_dropped_total",
     "Records agents dropped beyond their spool bound (as reported)"),
    (CounterMetricFamily, "epwatch_agent_hook_records_dropped_total",
     "Records hooks dropped (agent absent or slow), as agents report"),
    (GaugeMetricFamily, "epwatch_agent_spool_records", "Records waiting for an ack in the agents"),
)  # fmt: skip


@dataclass(slots=True)
class _Agent:
    node: str
    records_dropped: int = 0
    hook_records_dropped: int = 0
    spool_records: int = 0
    streams: int = 0
    seen_s: float = 0.0


class AgentTable(Collector):
    """Agent stats and open streams; a prometheus-client custom collector."""

    def __init__(self, max_agents: int = 10_000) -> None:
        self._max_agents = max_agents
        self._agents: OrderedDict[str, _Agent] = OrderedDict()
        self._retired: OrderedDict[str, _Agent] = OrderedDict()  # per node
        self._lock = threading.Lock()

    def _get(self, agent_id: str, node: str) -> _Agent:
        a = self._agents.get(agent_id)
        if a is None:
            a = self._agents[agent_id] = _Agent(node)
            self._evict()
        else:
            self._agents.move_to_end(agent_id)
            if node:
                a.node = node
        return a

    def _evict(self) -> None:
        if len(self._agents) <= self._max_agents:
            return
        for agent_id in [k for k, a in self._agents.items() if a.streams == 0]:
            self._retire(self._agents.pop(agent_id))
            if len(self._agents) <= self._max_agents:
                return

    def _retire(self, a: _Agent) -> None:
        """An evicted agent's totals stay in its node's counters (a counter that went
        down would read as a reset), until the node has been silent for
        ``RETIRED_KEEP_S``."""
        if not a.node:
            return
        r = self._retired.setdefault(a.node, _Agent(a.node))
        self._retired.move_to_end(a.node)
        r.records_dropped += a.records_dropped
        r.hook_records_dropped += a.hook_records_dropped
        r.seen_s = max(r.seen_s, a.seen_s)
        while len(self._retired) > self._max_agents:
            self._retired.popitem(last=False)

    def _forget_retired(self, now: float) -> None:
        live = {a.node for a in self._agents.values()}
        for node in [
            n for n, r in self._retired.items() if n not in live and now - r.seen_s > RETIRED_KEEP_S
        ]:
            del self._retired[node]

    def observe(self, agent_id: str, node: str, stats: pb.AgentStats | None) -> None:
        """Record the stats a message carried."""
        with self._lock:
            a = self._get(agent_id, node)
            a.seen_s = time.monotonic()
            if stats is not None:
                a.records_dropped = max(a.records_dropped, stats.records_dropped)
                a.hook_records_dropped = max(a.hook_records_dropped, stats.hook_records_dropped)
                a.spool_records = stats.spool_records

    def stream_opened(self, agent_id: str, node: str) -> None:
        with self._lock:
            self._get(agent_id, node).streams += 1

    def stream_closed(self, agent_id: str) -> None:
        with self._lock:
            a = self._agents.get(agent_id)
            if a is not None:
                a.streams = max(0, a.streams - 1)

    def connected(self) -> int:
        with self._lock:
            return sum(1 for a in self._agents.values() if a.streams > 0)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily(*_CONNECTED)
        for family, name, doc in _PER_NODE:
            yield family(name, doc, labels=["node"])

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        now = time.monotonic()
        dropped: dict[str, int] = {}
        hook_dropped: dict[str, int] = {}
        spool: dict[str, int] = {}
        with self._lock:
            self._forget_retired(now)
            agents = list(self._agents.values())
            retired = list(self._retired.values())
        for a in retired:
            dropped[a.node] = dropped.get(a.node, 0) + a.records_dropped
            hook_dropped[a.node] = hook_dropped.get(a.node, 0) + a.hook_records_dropped
        for a in agents:
            if not a.node:
                continue
            dropped[a.node] = dropped.get(a.node, 0) + a.records_dropped
            hook_dropped[a.node] = hook_dropped.get(a.node, 0) + a.hook_records_dropped
            if a.streams > 0 or now - a.seen_s < SPOOL_STALE_S:
                spool[a.node] = spool.get(a.node, 0) + a.spool_records
        connected = GaugeMetricFamily(*_CONNECTED)
        connected.add_metric([], sum(1 for a in agents if a.streams > 0))
        yield connected
        for (family, name, doc), values in zip(
            _PER_NODE, (dropped, hook_dropped, spool), strict=True
        ):
            fam = family(name, doc, labels=["node"])
            for node in sorted(values):
                fam.add_metric([node], values[node])
            yield fam
