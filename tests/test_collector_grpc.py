"""The collector over real gRPC: statuses, rejecting Acks on a live stream, health,
reflection."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from epwatch import wire
from epwatch.collector.service import CollectorService
from epwatch.protos import epwatch_pb2 as pb
from tests.helpers import make_records, raw_push, raw_stream, start_collector, stub, value

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def service() -> Iterator[CollectorService]:
    svc = start_collector(max_message_bytes=256 << 10)
    yield svc
    svc.stop(grace_s=0.2)


@pytest.fixture(scope="module")
def channel(service: CollectorService) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(
        f"127.0.0.1:{service.grpc_port}", options=[("grpc.max_send_message_length", 8 << 20)]
    )
    yield ch
    ch.close()


def msg(agent: str, seq: int, n: int, group: str = "grpc", ws: int = 16) -> pb.AgentMessage:
    batch = wire.encode_records(group, ws, make_records(n, 16))
    return pb.AgentMessage(agent_id=agent, node="n0", seq=seq, batch=batch)


def test_push_accepts_with_the_generated_stub(channel: grpc.Channel) -> None:
    client = stub(channel)
    ack = client.Push(msg("push-a", 1, 32), timeout=5)
    assert (ack.seq, ack.code, ack.duplicate) == (1, 0, False)
    assert client.Push(msg("push-a", 1, 32), timeout=5).duplicate


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe garbage \x00\x01", "garbage"),
        (msg("push-b", 1, 8000).SerializeToString(), "oversized"),  # > 256 KiB
        (msg("push-b", 2, 16, ws=8).SerializeToString(), "rank_out_of_range"),
    ],
)
def test_push_rejects_with_invalid_argument(
    channel: grpc.Channel, payload: bytes, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        raw_push(channel)(payload, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(reason + ":")


def test_bad_message_on_a_stream_gets_a_rejecting_ack_and_the_stream_lives(
    channel: grpc.Channel, service: CollectorService
) -> None:
    stream = raw_stream(channel)
    bad = msg("stream-a", 2, 16)
    bad.batch.rank = np.full(16, 99, np.int32).tobytes()
    requests = [
        msg("stream-a", 1, 16).SerializeToString(),
        bad.SerializeToString(),
        b"\x00garbage\xff",
        msg("stream-a", 3, 16).SerializeToString(),
        msg("stream-a", 1, 16).SerializeToString(),  # a resend
    ]
    acks = list(stream(iter(requests), timeout=10))
    assert [(a.seq, a.code, a.duplicate) for a in acks] == [
        (1, 0, False),
        (2, 3, False),
        (0, 3, False),
        (3, 0, False),
        (1, 0, True),
    ]
    assert "rank 99" in acks[1].message and "AgentMessage" in acks[2].message


def test_other_agents_are_served_while_one_misbehaves(
    channel: grpc.Channel, service: CollectorService
) -> None:
    stream = raw_stream(channel)
    good_q: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := good_q.get()) is not None:
            yield item

    good_acks = stream(requests(), timeout=20)
    bad_acks: list[pb.Ack] = []

    def misbehave() -> None:
        noise = [b"\xff" * n for n in range(1, 200)]
        bad_acks.extend(stream(iter(noise), timeout=20))

    t = threading.Thread(target=misbehave)
    t.start()
    for seq in range(1, 51):
        good_q.put(msg("good", seq, 100, group="shared").SerializeToString())
        ack = next(good_acks)
        assert (ack.seq, ack.code) == (seq, 0)
    good_q.put(None)
    t.join(20)
    assert len(bad_acks) == 199 and all(a.code == 3 for a in bad_acks)
    text = service.metrics_text()
    assert value(text, "epwatch_ingest_records_total", ep_group="shared") == 5000


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "epwatch.v1.Collector"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(refl.ServerReflectionInfo(iter([req]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"epwatch.v1.Collector", "grpc.health.v1.Health"} <= names
