"""The collector assembled: gRPC ingest, estimator loop, /metrics, optional recorder.

``CollectorService`` is what ``epwatch collector`` runs and what tests, the demo and
the benchmark start in-process; ports may be 0 (the bound ports are reported).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from epwatch.collector.agents import AgentTable
from epwatch.collector.analyzer import Analyzer
from epwatch.collector.dedup import SeqDeduper
from epwatch.collector.estimators.report import GroupReport
from epwatch.collector.groups import EstimatorFactory, Group, GroupTable, default_factory, finite
from epwatch.collector.ingest import Ingestor
from epwatch.collector.metrics import GroupMetrics, IngestMetrics, family_names
from epwatch.collector.recorder import RecorderConfig, Recording
from epwatch.collector.samples import NodeSampleStore
from epwatch.collector.server import CollectorHandlers, ServerSecurity, StreamGate, build_server
from epwatch.webserver import WebSecurity, WebServer, warn_if_exposed

log = logging.getLogger(__name__)

# The live diagnosis on the metrics port: what `epwatch status` reads.
DIAGNOSIS_PATH = "/api/v1/diagnosis"


@dataclass(frozen=True)
class CollectorConfig:
    grpc_listen: str = "127.0.0.1:50051"
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9401)
    update_interval_s: float = 1.0
    max_message_bytes: int = 64 << 20
    max_groups: int = 64
    group_expire_s: float = 600.0
    max_streams: int = 256
    record: RecorderConfig | None = None
    max_world_size: int = 4096
    # Memory every group's step assembly may reserve together (each group's own bound
    # is its EstimatorConfig.buffer_bytes); a group that does not fit is refused.
    buffer_bytes: int = 1 << 30
    new_group_grace_s: float = 30.0  # a group that completes no step gives way after
    streams_per_peer: int = 16
    stream_idle_s: float = 60.0
    security: ServerSecurity = field(default_factory=ServerSecurity)
    web: WebSecurity | None = None


def _node_evidence() -> Any | None:
    """``collector.evidence.NodeEvidence`` when present (GPU/NIC corroboration)."""
    try:
        from epwatch.collector.estimators.evidence import NodeEvidence
    except ImportError:
        return None
    return NodeEvidence()


class CollectorService:
    def __init__(
        self, config: CollectorConfig, estimator_factory: EstimatorFactory | None = None
    ) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics = IngestMetrics(self.registry)
        self.groups = GroupTable(
            estimator_factory or default_factory(),
            config.max_groups,
            config.group_expire_s,
            memory_budget=config.buffer_bytes,
            provisional_grace_s=config.new_group_grace_s,
        )
        self.agents = AgentTable()
        group_metrics = GroupMetrics(self.groups.groups, self._stalled_s)
        for c in (group_metrics, self.agents):
            self.registry.register(c)
        # Node samples may not take a name the collector exposes itself.
        self.reserved_names = family_names([*self.metrics.members, group_metrics, self.agents])
        self.samples = NodeSampleStore(self.reserved_names)
        self.registry.register(self.samples)
        self.evidence = _node_evidence()
        self.recorder = (
            Recording(config.record, self.metrics.recorder_dropped.inc) if config.record else None
        )
        self.ingestor = Ingestor(
            self.groups,
            SeqDeduper(),
            self.agents,
            self.samples,
            self.metrics,
            max_message_bytes=config.max_message_bytes,
            max_world_size=config.max_world_size,
            recorder=self.recorder,
            evidence_update=self.evidence.update if self.evidence is not None else None,
        )
        self.analyzer = Analyzer(
            self.groups,
            self.metrics,
            config.update_interval_s,
            evidence=self.evidence.evidence_for if self.evidence is not None else None,
        )
        self._gate = StreamGate(config.streams_per_peer, config.stream_idle_s)
        handlers = CollectorHandlers(
            self.ingestor,
            self.agents,
            security=config.security,
            gate=self._gate,
            on_refused=lambda reason: self.metrics.rejected.labels(reason).inc(),
        )
        self._server, self.grpc_port, self._health = build_server(
            handlers,
            config.grpc_listen,
            max_message_bytes=config.max_message_bytes,
            max_workers=config.max_streams,
            credentials=config.security.credentials(),
        )
        self._http: WebServer | None = None
        self.metrics_port = 0

    def _stalled_s(self, group: Group) -> float:
        reported = finite(group.report.stalled_s) if group.report is not None else None
        if reported is not None:
            return reported
        idle = time.monotonic() - group.last_ingest_s
        return idle if idle > 2 * self.config.update_interval_s else 0.0

    def start(self) -> None:
        if self.recorder is not None:
            self.recorder.start()
        security = self.config.security
        host, _, _ = self.config.grpc_listen.rpartition(":")
        warn_if_exposed(
            "gRPC",
            host.strip("[]"),
            security.tls_cert is not None or security.token is not None,
            "--tls-cert/--tls-key with --tls-client-ca (mTLS), or --token-file",
        )
        self._server.start()
        self._gate.start()
        self.analyzer.start()
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            routes = {DIAGNOSIS_PATH: self._diagnosis_route}
            self._http = WebServer(
                self.registry, host, port, routes, security=self.config.web
            ).start()
            self.metrics_port = self._http.port
        log.info(
            "collector: gRPC on port %d, /metrics on port %d", self.grpc_port, self.metrics_port
        )

    def stop(self, grace_s: float = 2.0) -> None:
        """Refuse new work, finish what is in flight, flush the recorder."""
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait(grace_s + 1)
        self._gate.stop()
        self.analyzer.stop()
        if self.recorder is not None:
            self.recorder.stop()
        if self._http is not None:
            self._http.stop()

    def metrics_text(self) -> str:
        return generate_latest(self.registry).decode()

    def reports(self) -> list[GroupReport]:
        """Newest report of every group (after at least one estimator pass)."""
        return [g.report for g in self.groups.groups() if g.report is not None]

    def diagnosis(self, ep_group: str | None = None) -> list[GroupReport]:
        """Every group's report now (or ``ep_group``'s), with the flags that cleared
        recently (the last few per cause)."""
        evidence = self.analyzer.evidence
        out = []
        for group in self.groups.groups():
            if ep_group is not None and group.ep_group != ep_group:
                continue
            with group.lock:
                out.append(group.estimator.report(evidence, include_closed=True))
        return out

    def _diagnosis_route(self, query: Mapping[str, str]) -> tuple[int, Any]:
        """``GET /api/v1/diagnosis[?ep_group=NAME]``: the diagnosis JSON of
        ``simulate --json``, one entry per EP group; 404 for a group we do not have."""
        from epwatch.collector.offline import diagnosis_json

        ep_group = query.get("ep_group") or None
        reports = self.diagnosis(ep_group)
        if ep_group is not None and not reports:
            return 404, {"error": f"no EP group {ep_group[:200]!r} on this collector"}
        return 200, diagnosis_json(reports)
