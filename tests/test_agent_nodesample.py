"""The cached NodeSample encoder parses to exactly the message the protobuf path builds."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest

from epwatch.agent.nodesample import NodeSampleEncoder, varint
from epwatch.agent.samplers.base import SamplerResult, run_sampler, status_points
from epwatch.agent.samplers.infiniband import InfinibandSampler
from epwatch.agent.samplers.netdev import NetdevSampler
from epwatch.catalogue import Kind, Point, metric
from epwatch.collector.samples import NodeSampleStore
from epwatch.protos import epwatch_pb2 as pb

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


def _slow(time_ns: int, points: list[Any], statuses: list[Any]) -> pb.AgentMessage:
    sample = pb.NodeSample(
        time_unix_ns=time_ns,
        points=[p.to_proto() for p in points],
        samplers=[s.to_proto() for s in statuses],
    )
    return pb.AgentMessage(sample=sample)


def _norm(msg: pb.AgentMessage) -> tuple[Any, ...]:
    """The message as plain data; values by their bits, so NaN and -0.0 compare."""
    s = msg.sample
    points = [
        (p.name, sorted(p.labels.items()), struct.pack("<d", p.value), p.kind, p.help)
        for p in s.points
    ]
    statuses = [(x.name, x.ok, x.duration_s, x.error) for x in s.samplers]
    return msg.WhichOneof("payload"), s.time_unix_ns, points, statuses


def _round() -> tuple[list[Point], list[SamplerResult]]:
    results = [run_sampler(InfinibandSampler(SYSFS)), run_sampler(NetdevSampler(SYSFS))]
    results.append(SamplerResult("boom", False, 0.25, "RuntimeError: sensor on fire"))
    points = [p for r in results for p in (*r.points, *status_points(r))]
    return points, results


class _ProtoOnly:
    """A point that only knows how to make its message (as in the daemon tests)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def to_proto(self) -> pb.MetricPoint:
        return pb.MetricPoint(name="epwatch_gpu_power_watts", labels={"gpu": "0"}, value=self.value)


@pytest.mark.parametrize("n", [1, 127, 128, 300, 16_383, 16_384, 2**35])
def test_varint_matches_protobuf(n):
    assert b"\x08" + varint(n) == pb.Ack(seq=n).SerializeToString()  # uint64 field 1
    assert varint(0) == b"\x00"


def test_a_sampler_round_parses_to_the_protobuf_message():
    points, results = _round()
    enc = NodeSampleEncoder()
    fast = pb.AgentMessage.FromString(enc.encode(123, points, results))
    assert _norm(fast) == _norm(_slow(123, points, results))
    assert len(enc) == len(points)


def test_values_change_from_round_to_round_and_series_are_cached_once():
    enc = NodeSampleEncoder()
    for value in (1.0, 2.5, 7.0):
        points = [metric("epwatch_gpu_power_watts", value, gpu=str(g)) for g in range(8)]
        back = pb.AgentMessage.FromString(enc.encode(1, points, []))
        assert [p.value for p in back.sample.points] == [value] * 8
    assert len(enc) == 8


@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1, 2**53 + 1, 1e300, -1e-300, math.inf, -math.inf, math.nan]
)
def test_edge_values(value):
    points = [Point("epwatch_gpu_power_watts", {"gpu": "0"}, value, Kind.GAUGE, "")]
    fast = pb.AgentMessage.FromString(NodeSampleEncoder().encode(0, points, []))
    assert _norm(fast) == _norm(_slow(0, points, []))


def test_long_unicode_labels_and_help_and_no_labels():
    points = [
        Point("epwatch_gpu_xid_errors_total", {"gpu": "ü" * 200}, 3, Kind.COUNTER, "h" * 1000),
        Point("epwatch_sampler_up", {}, 1.0),
        metric("epwatch_gpu_lost", 0, gpu="1"),
    ]
    fast = pb.AgentMessage.FromString(NodeSampleEncoder().encode(2**62, points, []))
    assert _norm(fast) == _norm(_slow(2**62, points, []))


def test_points_with_only_to_proto_take_the_protobuf_path():
    points = [_ProtoOnly(700.0), metric("epwatch_gpu_lost", 1, gpu="3"), _ProtoOnly(1.0)]
    fast = pb.AgentMessage.FromString(NodeSampleEncoder().encode(5, points, []))
    assert _norm(fast) == _norm(_slow(5, points, []))


def test_cache_is_bounded_and_stays_correct_when_it_starts_over():
    enc = NodeSampleEncoder(max_series=10)
    for start in range(0, 40, 7):
        points = [metric("epwatch_gpu_lost", 0, gpu=str(g)) for g in range(start, start + 7)]
        fast = pb.AgentMessage.FromString(enc.encode(9, points, []))
        assert _norm(fast) == _norm(_slow(9, points, []))
        assert len(enc) <= 10


def test_merges_with_the_shippers_header_and_the_collector_takes_it():
    points, results = _round()
    header = pb.AgentMessage(agent_id="n1:1:ab", node="n1", seq=42).SerializeToString()
    msg = pb.AgentMessage.FromString(header + NodeSampleEncoder().encode(77, points, results))
    assert (msg.agent_id, msg.node, msg.seq) == ("n1:1:ab", "n1", 42)
    assert _norm(msg) == _norm(_slow(77, points, results))
    store = NodeSampleStore(reserved_names=())
    store.validate(msg.sample, "n1")
    store.update("n1", msg.sample)
    assert store.nodes() == ["n1"]
