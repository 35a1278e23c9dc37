"""The agent process: receiver -> batcher -> spool -> shipper, plus node samplers.

Everything the agent counts is kept in plain attributes of these parts; the
:class:`Agent` only wires them, runs the flush and sampling loops, and reports
``AgentStats`` (shipped with every message) and its own /metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from epwatch.agent.batcher import MAX_PENDING_BYTES, Batcher
from epwatch.agent.ledger import LossLedger
from epwatch.agent.nodesample import NodeSampleEncoder
from epwatch.agent.receiver import Receiver, ReceiverCounters, SocketPolicy
from epwatch.agent.shipper import ClientSecurity, Shipper
from epwatch.agent.split import split_payload
from epwatch.agent.spool import Spool
from epwatch.agent.spool_disk import SpoolStore, new_store_agent_id
from epwatch.protos import epwatch_pb2 as pb

log = logging.getLogger(__name__)

# One round of node samplers: () -> (points, statuses with .to_proto()); a point is a
# catalogue Point or anything with .to_proto() (see epwatch.agent.nodesample).
SampleRound = Callable[[], tuple[Sequence[Any], Sequence[Any]]]


@dataclass(frozen=True)
class AgentConfig:
    node: str
    socket_path: str
    collector: str = "127.0.0.1:50051"
    socket_mode: int = 0o660
    spool_records: int = 1_000_000
    spool_bytes: int = 64 << 20
    spool_dir: str | None = None
    batch_records: int = 16_384
    flush_interval_s: float = 0.2
    sample_interval_s: float = 1.0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    window: int = 32
    socket: SocketPolicy = field(default_factory=SocketPolicy)  # its mode: socket_mode
    security: ClientSecurity = field(default_factory=ClientSecurity)


def _batch_bounds(config: AgentConfig) -> tuple[int, int]:
    """Records and bytes per shipped batch, below a quarter of the spool's bounds: a
    spool smaller than one flush would drop whole batches even while connected."""
    records = min(config.batch_records, max(1, config.spool_records // 4))
    message_bytes = min(MAX_PENDING_BYTES, max(64 << 10, config.spool_bytes // 8))
    if records < config.batch_records:
        log.warning(
            "--spool-records %d holds less than four batches of --batch-records %d: "
            "shipping batches of %d records instead",
            config.spool_records,
            config.batch_records,
            records,
        )
    return records, message_bytes


def new_agent_id(node: str) -> str:
    """Unique per process: a restarted agent starts a fresh seq space."""
    return f"{node[:96]}:{os.getpid()}:{secrets.token_hex(4)}"


class Agent:
    """A running agent; ``start()``/``stop()`` from the CLI, tests and the demo."""

    def __init__(self, config: AgentConfig, sample_round: SampleRound | None = None) -> None:
        self.config = config
        store = SpoolStore(config.spool_dir) if config.spool_dir else None
        self.agent_id = (
            store.agent_id(lambda: new_store_agent_id(config.node))
            if store is not None
            else new_agent_id(config.node)
        )
        self.spool = Spool(config.spool_records, config.spool_bytes, store)
        if self.spool.recovered_messages:
            log.info(
                "spool folder: %d messages (%d records) from before to deliver",
                self.spool.recovered_messages,
                self.spool.recovered_records,
            )
        self.ledger = LossLedger(
            os.path.join(config.spool_dir, "state.json")
            if config.spool_dir
            else f"{config.socket_path}.state"
        )
        if not self.spool.durable:  # acks lower the records a crash would lose
            self.spool.on_ack = lambda: self.ledger.update(self.records_at_risk())
        self.batcher = Batcher(self.spool, *_batch_bounds(config))
        self.receiver_counters = ReceiverCounters()
        policy = dataclasses.replace(config.socket, mode=config.socket_mode)
        self.receiver = Receiver(config.socket_path, self.batcher, self.receiver_counters, policy)
        self.shipper = Shipper(
            config.collector,
            self.agent_id,
            config.node,
            self.spool,
            self.stats,
            window=config.window,
            backoff_base=config.backoff_base_s,
            backoff_max=config.backoff_max_s,
            security=config.security,
            split=split_payload,
        )
        self._sample_round = sample_round
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._flush_loop, name="flush", daemon=True)]
        if sample_round is not None:
            self._threads.append(
                threading.Thread(target=self._sample_loop, name="sampler", daemon=True)
            )

    def stats(self) -> pb.AgentStats:
        c = self.spool.counters
        return pb.AgentStats(
            records_received=self.receiver_counters.records_received,
            records_dropped=c.records_dropped + self.ledger.lost_at_start,
            spool_records=self.spool.records + self.batcher.pending_records(),
            hook_records_dropped=self.receiver_counters.hook_records_dropped,
        )

    def start(self) -> None:
        self.receiver.start()
        self.shipper.start()
        for t in self._threads:
            t.start()
        log.info(
            "agent %s: hooks on %s, shipping to %s",
            self.agent_id,
            self.config.socket_path,
            self.config.collector,
        )

    def stop(self, drain_timeout: float = 2.0) -> None:
        """Stop taking frames, ship what is pending for a moment, then stop."""
        self.receiver.stop()
        self._stop.set()
        self.batcher.wake()
        for t in self._threads:
            t.join(timeout=5)
        self.batcher.flush()
        self.shipper.stop(drain_timeout)
        if self.spool.records:
            where = "kept in the spool folder" if self.spool.durable else "lost"
            log.warning("exiting with %d records unacknowledged (%s)", self.spool.records, where)
        self.spool.close()
        self.ledger.update(0, clean=True, force=True)

    def records_at_risk(self) -> int:
        """Accepted records a crash now would lose: those being batched, and without a
        spool folder the spool's too."""
        pending = self.batcher.pending_records()
        return pending if self.spool.durable else pending + self.spool.records

    def _flush_loop(self) -> None:
        """A partial batch ships one flush interval after its first record came."""
        while True:
            # The crash ledger follows the records at risk; once it has caught up this
            # sleeps until a hook sends something (no polling while idle).
            at_risk = self.records_at_risk()
            self.ledger.update(at_risk)
            behind = self.ledger.written != at_risk
            if not self.batcher.wait_pending(self.ledger.min_interval_s if behind else None):
                continue
            if self._stop.wait(self.config.flush_interval_s):
                return  # stop() flushes what is left
            try:
                self.batcher.flush()
            except Exception:  # keep flushing whatever one bad batch did
                log.exception("flush failed")

    def _sample_loop(self) -> None:
        assert self._sample_round is not None
        encoder = NodeSampleEncoder()
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                points, statuses = self._sample_round()
                self.spool.put(encoder.encode(time.time_ns(), points, statuses), 0)
            except Exception:
                log.exception("sampling round failed")
            next_at += self.config.sample_interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))
