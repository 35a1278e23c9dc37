"""Reconnect backoff; the stream's timing: messages as they come, heartbeats, ack timeout."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from epwatch.agent.shipper import MAX_MESSAGE_METADATA, Shipper, backoff_delay
from epwatch.agent.spool import Spool
from epwatch.protos import epwatch_pb2 as pb
from tests.helpers import wait_for


def test_backoff_grows_caps_and_jitters() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        full = min(5.0, 0.1 * 2**attempt)
        d = backoff_delay(attempt, 0.1, 5.0, rng)
        assert full / 2 <= d <= full
    spread = {round(backoff_delay(10, 0.1, 5.0, rng), 3) for _ in range(50)}
    assert len(spread) > 10  # agents do not reconnect in lockstep


class _FakeCollector:
    """A Stream endpoint that records what arrives and acks sequenced messages (or not)."""

    def __init__(self, ack: bool = True, limit: int = 64 << 20) -> None:
        self.ack = ack
        self.limit = limit
        self.received: list[pb.AgentMessage] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(self._stream)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("epwatch.v1.Collector", {"Stream": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        # As the real collector does: its message limit first (docs/contracts.md).
        context.send_initial_metadata(((MAX_MESSAGE_METADATA, str(self.limit)),))
        for raw in requests:
            msg = pb.AgentMessage.FromString(raw)
            with self._lock:
                self.received.append(msg)
            if msg.seq and self.ack:
                yield pb.Ack(seq=msg.seq).SerializeToString()

    def seqs(self) -> list[int]:
        with self._lock:
            return [m.seq for m in self.received]


def _shipper(port: int, spool: Spool, **kw: float) -> Shipper:
    return Shipper(f"127.0.0.1:{port}", "n1:1:ab", "n1", spool, pb.AgentStats, **kw)


def test_messages_are_shipped_as_they_come_and_heartbeats_when_idle() -> None:
    fake = _FakeCollector()
    spool = Spool(1000)
    shipper = _shipper(fake.port, spool, heartbeat_s=0.2)
    shipper.start()
    try:
        wait_for(lambda: shipper.connected)
        for i in range(3):
            sent = time.monotonic()
            spool.put(pb.AgentMessage(sample=pb.NodeSample(time_unix_ns=i)).SerializeToString(), 0)
            wait_for(lambda: len(spool) == 0)
            assert time.monotonic() - sent < 0.5  # woken by the message, not by a poll
        n = len(fake.seqs())
        time.sleep(1.0)  # idle: only heartbeats, one per heartbeat_s
        heartbeats = fake.seqs()[n:]
        assert set(heartbeats) == {0} and 2 <= len(heartbeats) <= 8  # not a busy loop
        assert [s for s in fake.seqs() if s] == [1, 2, 3]
        started = time.monotonic()
    finally:
        shipper.stop()
        fake.server.stop(0)
    assert time.monotonic() - started < 1.0


def test_missing_ack_reconnects_and_resends() -> None:
    fake = _FakeCollector(ack=False)
    spool = Spool(1000)
    shipper = _shipper(fake.port, spool, heartbeat_s=5.0, ack_timeout_s=0.3, backoff_base=0.01)
    shipper.start()
    try:
        spool.put(pb.AgentMessage(sample=pb.NodeSample()).SerializeToString(), 0)
        wait_for(lambda: fake.seqs().count(1) >= 2)  # sent, no ack, sent again
        assert shipper.reconnects >= 1
        fake.ack = True
        wait_for(lambda: len(spool) == 0)
    finally:
        shipper.stop()
        fake.server.stop(0)
