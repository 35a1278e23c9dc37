"""One agent message in, one outcome out: the collector's ingest path.

Order matters for "bad input loses nothing already accepted": a message is parsed and
validated completely before any of it reaches an estimator, and the (agent_id, seq)
claim is released when it is rejected. Work per message is a handful of vectorised
numpy passes and counter increments; nothing here loops over records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import unknown_fields

from epwatch import wire
from epwatch.collector.agents import AgentTable
from epwatch.collector.decode import check_header, check_size, parse_message
from epwatch.collector.dedup import SeqDeduper
from epwatch.collector.groups import GroupTable
from epwatch.collector.metrics import IngestMetrics
from epwatch.collector.recorder import Recording
from epwatch.collector.samples import NodeSampleStore
from epwatch.names import check_name
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RecordError

log = logging.getLogger(__name__)

OK = 0
INVALID_ARGUMENT = 3
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAUTHENTICATED = 16

# Reasons whose gRPC status is not INVALID_ARGUMENT (docs/security.md lists them all).
_CODES = {"identity": PERMISSION_DENIED}

# NodeEvidence.update(node, points, now_s), when the evidence module is present.
EvidenceUpdate = Callable[[str, object, float], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    seq: int
    code: int = OK
    message: str = ""
    duplicate: bool = False
    reason: str = ""
    agent_id: str = ""
    node: str = ""

    def ack(self) -> pb.Ack:
        return pb.Ack(
            seq=self.seq,
            code=self.code,
            message=self.message,
            duplicate=self.duplicate,
            reason=self.reason,
        )


class Ingestor:
    """Validates, de-duplicates and routes messages to groups, samples and stats."""

    def __init__(
        self,
        groups: GroupTable,
        dedup: SeqDeduper,
        agents: AgentTable,
        samples: NodeSampleStore,
        metrics: IngestMetrics,
        *,
        max_message_bytes: int = 64 << 20,
        max_world_size: int = 4096,
        recorder: Recording | None = None,
        evidence_update: EvidenceUpdate | None = None,
    ) -> None:
        self.groups = groups
        self.dedup = dedup
        self.agents = agents
        self.samples = samples
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_world_size = max_world_size
        self.recorder = recorder
        self.evidence_update = evidence_update
        self._rejects_logged: dict[str, float] = {}

    def handle(self, raw: bytes, identities: frozenset[str] | None = None) -> Outcome:
        """Ingest one serialized AgentMessage; never raises. ``identities`` are the
        sender's authenticated names (its client certificate's), one of which every
        node name it sends must be. Nothing is stored, the agent table included, before the
        message has passed every check."""
        seq, agent_id, node = 0, "", ""
        claimed = False
        try:
            oversized: RecordError | None = None
            try:
                check_size(raw, self.max_message_bytes)
            except RecordError as exc:
                oversized = exc
            msg = parse_message(raw)
            seq = msg.seq
            check_header(msg)
            agent_id, node = msg.agent_id, msg.node
            if identities is not None and node and node not in identities:
                raise RecordError(
                    "identity",
                    f"node {node!r} is not a name of the client certificate "
                    f"({', '.join(sorted(identities))})",
                )
            if oversized is not None:
                raise oversized
            if msg.schema > wire.SCHEMA:
                raise RecordError(
                    "unsupported_schema",
                    f"message needs wire schema {msg.schema}; this collector speaks up to "
                    f"{wire.SCHEMA} (upgrade the collector)",
                )
            stats = msg.stats if msg.HasField("stats") else None
            kind = msg.WhichOneof("payload")
            if kind is None:
                if len(unknown_fields.UnknownFieldSet(msg)):
                    raise RecordError(
                        "unsupported_payload",
                        "message carries a payload this collector does not know "
                        "(upgrade the collector)",
                    )
                self._observe(agent_id, node, stats)
                return Outcome(seq, agent_id=agent_id, node=node)
            if not node:
                raise RecordError("missing_node", f"{kind} message has no node")
            if not seq:
                raise RecordError(
                    "missing_seq",
                    f"{kind} message has seq 0 (seq 0 is for stats-only messages; data needs "
                    "seq >= 1 so that a resend is recognised)",
                )
            if not self.dedup.claim(agent_id, seq):
                self.metrics.duplicates.inc()
                self._observe(agent_id, node, stats)
                return Outcome(seq, duplicate=True, agent_id=agent_id, node=node)
            claimed = True
            if kind == "batch":
                self._batch(msg.batch, node)
            elif kind == "intervals":
                self._intervals(msg.intervals, node)
            else:
                self._sample(msg.sample, node)
            self.metrics.batches.inc()
            self._observe(agent_id, node, stats)
            return Outcome(seq, agent_id=agent_id, node=node)
        except RecordError as exc:
            if claimed:
                self.dedup.release(agent_id, seq)
            code = _CODES.get(exc.reason, INVALID_ARGUMENT)
            return self._reject(seq, exc.reason, str(exc), code, agent_id, node)
        except Exception as exc:  # an estimator bug must not kill the agent's stream
            if claimed:
                self.dedup.release(agent_id, seq)
            log.exception("ingest failed for %s seq %d", agent_id or "?", seq)
            return self._reject(seq, "internal", f"internal error: {exc}", INTERNAL, agent_id, node)

    def _observe(self, agent_id: str, node: str, stats: pb.AgentStats | None) -> None:
        if agent_id:
            self.agents.observe(agent_id, node, stats)

    def _check_group(self, batch: pb.RecordBatch | pb.IntervalBatch) -> None:
        """The group's name and size within bounds, before anything is decoded."""
        if batch.ep_group:  # an empty one is the decoder's "missing_group"
            check_name("ep_group", batch.ep_group)
        if batch.world_size > self.max_world_size:
            raise RecordError(
                "bad_world_size",
                f"world_size {batch.world_size} is above this collector's --max-world-size "
                f"{self.max_world_size}",
            )

    def _batch(self, batch: pb.RecordBatch, node: str) -> None:
        self._check_group(batch)
        d = wire.decode_batch(batch)
        group = self.groups.get(d.ep_group, d.world_size)
        now = time.monotonic()
        with group.lock:
            if len(d.records):
                group.estimator.ingest(d.records, node)
            if d.peer_rows is not None:
                group.estimator.ingest_peer_rows(d.peer_rows)
            if d.entered is not None:
                group.estimator.ingest_entered(d.entered, node, now)
            group.last_ingest_s = now
        if len(d.records):
            self.metrics.records.labels(d.ep_group).inc(len(d.records))
        if self.recorder is not None:
            self.recorder.put(d.ep_group, node, d.world_size, d.records, d.peer_rows)

    def _intervals(self, batch: pb.IntervalBatch, node: str) -> None:
        self._check_group(batch)
        rows = wire.decode_intervals(batch)
        group = self.groups.get(batch.ep_group, batch.world_size)
        now = time.monotonic()
        with group.lock:
            self.groups.make_room(group, group.estimator.counter_bytes_needed(rows.local_experts))
            group.estimator.ingest_intervals(rows, node, now)
            group.last_ingest_s = now
        self.metrics.intervals.labels(batch.ep_group).inc(len(rows))

    def _sample(self, sample: pb.NodeSample, node: str) -> None:
        self.samples.validate(sample, node)
        now = time.monotonic()
        self.samples.update(node, sample, now)
        if self.evidence_update is not None:
            self.evidence_update(node, sample.points, now)

    def _reject(
        self, seq: int, reason: str, message: str, code: int, agent_id: str, node: str
    ) -> Outcome:
        self.metrics.rejected.labels(reason).inc()
        now = time.monotonic()
        if (
            now - self._rejects_logged.get(reason, -1e9) > 10.0
        ):  # at most one line per reason per 10 s
            self._rejects_logged[reason] = now
            log.warning("rejected message from %s seq %d: %s", agent_id or "?", seq, message)
        return Outcome(seq, code, message, reason=reason, agent_id=agent_id, node=node)
