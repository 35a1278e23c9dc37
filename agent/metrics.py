"""The agent's own optional /metrics: what it received, delivered, dropped, spooled.

Values live in the agent's parts; a custom collector reads them at scrape time, so the
hot path never touches prometheus-client. The names that the collector also mirrors
(``epwatch_agent_records_dropped_total`` ...) mean the same here, with ``node``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epwatch.agent.daemon import Agent
from epwatch.webserver import WebSecurity, WebServer


class AgentMetrics(Collector):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        a = self._agent
        node = a.config.node
        rc = a.receiver_counters
        sc = a.spool.counters

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=["node"])
            fam.add_metric([node], value)
            return fam

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=["node"])
            fam.add_metric([node], value)
            return fam

        yield counter(
            "epwatch_agent_records_received_total",
            "Hook records accepted from local ranks",
            rc.records_received,
        )
        yield counter(
            "epwatch_agent_records_delivered_total",
            "Hook records acknowledged by the collector",
            sc.records_delivered,
        )
        yield counter(
            "epwatch_agent_records_dropped_total",
            "Hook records dropped beyond the spool bound",
            sc.records_dropped,
        )
        yield counter(
            "epwatch_agent_records_rejected_total",
            "Hook records the collector rejected (not retried)",
            sc.records_rejected,
        )
        yield counter(
            "epwatch_agent_hook_records_dropped_total",
            "Records hooks dropped (agent absent or slow), as they report",
            rc.hook_records_dropped,
        )
        yield gauge(
            "epwatch_agent_spool_records",
            "Hook records waiting for an ack (spooled or being batched)",
            a.spool.records + a.batcher.pending_records(),
        )
        yield gauge(
            "epwatch_agent_collector_connected",
            "1 while the stream to the collector is open",
            1.0 if a.shipper.connected else 0.0,
        )
        yield counter(
            "epwatch_agent_reconnects_total",
            "Streams to the collector that ended or failed to open",
            a.shipper.reconnects,
        )
        yield counter(
            "epwatch_agent_records_lost_total",
            "Records a previous agent process had accepted but not made durable when it "
            "died (from its state file)",
            a.ledger.lost_at_start,
        )
        yield gauge(
            "epwatch_agent_records_at_risk",
            "Accepted records a crash now would lose: being batched, and without "
            "--spool-dir the spool's too",
            a.records_at_risk(),
        )
        yield gauge(
            "epwatch_agent_spool_bytes",
            "Serialized bytes waiting for an ack (bounded by --spool-bytes)",
            a.spool.bytes,
        )
        yield counter(
            "epwatch_agent_messages_split_total",
            "Messages over the collector's size limit, shipped as smaller ones",
            sc.messages_split,
        )
        dropped = CounterMetricFamily(
            "epwatch_agent_messages_dropped",
            "Messages dropped, by reason (spool_full, oversized)",
            labels=["node", "reason"],
        )
        for reason in ("spool_full", "oversized"):
            dropped.add_metric([node, reason], sc.messages_dropped[reason])
        yield dropped
        rejected = CounterMetricFamily(
            "epwatch_agent_frames_rejected_total",
            "Hook frames refused, by reason",
            labels=["node", "reason"],
        )
        for reason, n in sorted(rc.rejected_by_reason().items()):
            rejected.add_metric([node, reason], n)
        yield rejected


def serve_metrics(
    agent: Agent, host: str, port: int, security: WebSecurity | None = None
) -> WebServer:
    """Start /metrics; the server's ``port`` is the bound one, ``stop()`` ends it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentMetrics(agent))
    return WebServer(registry, host, port, security=security).start()
