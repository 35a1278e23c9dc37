"""The collector's hard bounds (docs/security.md), against an in-process collector over
real gRPC on 127.0.0.1: every refusal has its status and counted reason, and nothing
is stored before a message has passed every check."""

from __future__ import annotations

import time

import numpy as np
import pytest

from epwatch.collector.estimators import EstimatorConfig, GroupEstimator
from epwatch.collector.estimators.buffer import StepBuffer
from epwatch.collector.groups import GroupTable, NullEstimator
from epwatch.collector.samples import MAX_POINTS
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RecordError
from tests import attacks
from tests.helpers import make_peer_rows, make_records, samples, start_collector, value

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def svc():
    s = start_collector(estimators=None)
    yield s
    s.stop(grace_s=0.2)


def rejected(svc, reason: str) -> float:
    return value(svc.metrics_text(), "epwatch_ingest_rejected_total", reason=reason) or 0.0


def test_huge_world_size_is_refused_before_anything_is_allocated(svc) -> None:
    client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
    out = attacks.huge_world(client, world_size=65536)
    assert [o.status for o in out] == ["INVALID_ARGUMENT"] * 2
    assert "--max-world-size" in out[0].detail
    assert svc.groups.groups() == [] and rejected(svc, "bad_world_size") == 2


@pytest.mark.parametrize("world_size", [16, 1024, 4096])
def test_a_groups_step_buffer_never_exceeds_its_budget(world_size: int) -> None:
    cfg = EstimatorConfig(buffer_bytes=32 << 20)
    g = GroupEstimator("g", world_size, cfg)
    assert g.buffer.max_bytes + g._peer_budget <= cfg.buffer_bytes
    assert g.memory_bytes <= cfg.buffer_bytes
    # Records on every layer up to 127 grow the buffer only to its bound.
    n = 4096
    i = np.arange(n)
    g.ingest(attacks.records((i * 131) % world_size, i % 3, i % 128), "n0")
    allocated = sum(a.nbytes for a in g.buffer.cols.values()) + g.buffer.filled.nbytes
    assert allocated <= g.buffer.max_bytes <= cfg.buffer_bytes
    if g.buffer.max_layers < 128:
        assert g.ignored_records > 0  # layers beyond the budget are counted, not kept


def test_a_world_size_that_cannot_fit_two_steps_is_refused() -> None:
    table = GroupTable(
        lambda name, ws: GroupEstimator(name, ws, EstimatorConfig(buffer_bytes=1 << 16))
    )
    with pytest.raises(RecordError) as err:
        table.get("big", 4096)
    assert err.value.reason == "over_budget"
    assert StepBuffer(4, 2, 1).max_bytes == 2 * StepBuffer.bytes_per_step_for(4, 1)


def test_groups_share_the_collectors_memory_budget() -> None:
    cfg = EstimatorConfig(buffer_bytes=8 << 20)
    table = GroupTable(lambda name, ws: GroupEstimator(name, ws, cfg), memory_budget=20 << 20)
    a = table.get("a", 4096)
    b = table.get("b", 4096)
    assert a.memory_bytes + b.memory_bytes <= 20 << 20
    with pytest.raises(RecordError) as err:
        table.get("c", 4096)
    assert err.value.reason == "over_budget" and "MiB" in str(err.value)
    assert table.get("small", 8) is not None  # a small group still fits


def test_junk_group_names_give_way_to_a_real_group() -> None:
    table = GroupTable(NullEstimator, max_groups=4, provisional_grace_s=0.2)
    for i in range(4):
        table.get(f"junk-{i}", 2)
    with pytest.raises(RecordError) as err:
        table.get("real", 16)
    assert err.value.reason == "too_many_groups"
    time.sleep(0.3)  # the junk has completed no step within its grace
    assert table.get("real", 16).world_size == 16
    assert len(table.groups()) == 4 and "junk-0" not in {g.ep_group for g in table.groups()}


def test_established_groups_keep_their_slots() -> None:
    table = GroupTable(NullEstimator, max_groups=2, provisional_grace_s=0.0)
    for name in ("a", "b"):
        g = table.get(name, 2)
        g.report = g.estimator.report()
        g.report = type(g.report)(name, 2, steps=3, last_step=2)  # completed steps
    with pytest.raises(RecordError):
        table.get("junk", 2)
    assert table.expire(time.monotonic() + 1.0) == []  # idle expiry is for provisional ones


def test_names_are_bounded_and_label_safe(svc) -> None:
    client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
    out = attacks.long_names(client, 3, size=1 << 20)
    assert {o.status for o in out} == {"INVALID_ARGUMENT"}
    bad = [
        pb.AgentMessage(agent_id="a", node="node\n0", stats=pb.AgentStats()),
        pb.AgentMessage(agent_id="x" * 129, node="n", stats=pb.AgentStats()),
        pb.AgentMessage(
            agent_id="a", node="n", seq=1, batch=pb.RecordBatch(ep_group='g"}', world_size=2)
        ),
    ]
    for msg in bad:
        assert client.push(msg.SerializeToString()).status == "INVALID_ARGUMENT"
    assert rejected(svc, "bad_name") == 6
    text = svc.metrics_text()
    assert "xxxxxxxx" not in text and len(text) < 200_000  # nothing of them was stored
    assert svc.agents.connected() == 0 and not svc.agents._agents


def test_forged_counters_are_refused_and_evicted_agents_keep_their_counts(svc) -> None:
    client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
    assert attacks.forged_counters(client).status == "INVALID_ARGUMENT"
    assert rejected(svc, "bad_stats") == 1
    assert value(svc.metrics_text(), "epwatch_agent_records_dropped_total", node="victim") is None
    svc.agents._max_agents = 50
    real = pb.AgentMessage(
        agent_id="real", node="real-node", stats=pb.AgentStats(records_dropped=5)
    )
    assert client.push(real.SerializeToString()).status == "OK"
    assert attacks.agent_churn(client, 60) == 60  # evicts "real" from the table
    assert "real" not in svc.agents._agents
    got = value(svc.metrics_text(), "epwatch_agent_records_dropped_total", node="real-node")
    assert got == 5  # not a reset


def test_int64_wrap_and_negative_exit_are_refused(svc) -> None:
    client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
    out = attacks.wrapped_duration(client)
    assert out.status == "INVALID_ARGUMENT" and "non-negative" in out.detail
    assert rejected(svc, "negative_time") == 1


def test_seq_zero_is_for_stats_only(svc) -> None:
    client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
    out = attacks.unsequenced_batch_twice(client)
    assert [o.status for o in out] == ["INVALID_ARGUMENT"] * 2
    assert "seq 0" in out[0].detail and rejected(svc, "missing_seq") == 2
    assert value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group="seq0") is None
    stats_only = pb.AgentMessage(agent_id="a", node="n", stats=pb.AgentStats())
    assert client.push(stats_only.SerializeToString()).status == "OK"


def test_node_samples_are_capped_per_message(svc) -> None:
    client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
    points = [
        pb.MetricPoint(name="epwatch_x", labels={"i": str(i)}, value=1.0)
        for i in range(MAX_POINTS + 1)
    ]
    msg = pb.AgentMessage(agent_id="a", node="n", seq=1, sample=pb.NodeSample(points=points))
    out = client.push(msg.SerializeToString())
    assert out.status == "INVALID_ARGUMENT" and f"> {MAX_POINTS}" in out.detail
    long_label = pb.MetricPoint(name="epwatch_x", labels={"gpu": "0" * 200}, value=1.0)
    msg = pb.AgentMessage(agent_id="a", node="n", seq=2, sample=pb.NodeSample(points=[long_label]))
    assert client.push(msg.SerializeToString()).status == "INVALID_ARGUMENT"
    assert not samples(svc.metrics_text(), "epwatch_x")


def test_per_peer_rows_for_far_future_steps_are_not_kept() -> None:
    g = GroupEstimator("g", 64, EstimatorConfig(buffer_bytes=8 << 20))
    g.ingest(make_records(64, 64), "n0")
    rows = make_peer_rows(4, 64, step=np.array([1, 2, 10**9, 10**9 + 1]))
    g.ingest_peer_rows(rows)
    assert sorted(g._peer) == [1, 2] and g.ignored_records == 2
    assert g._peer_bytes <= g._peer_budget


def test_idle_and_hoarded_streams_leave_room_for_an_agent() -> None:
    svc = start_collector(streams_per_peer=4, stream_idle_s=0.5, max_streams=16)
    try:
        client = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
        release = attacks.idle_streams(client, 8)
        try:
            legit = attacks.Client(f"127.0.0.1:{svc.grpc_port}")
            out = legit.push(
                attacks.batch_message("ep0", 16, make_records(16, 16), seq=1), timeout=5
            )
            assert out.status == "OK"  # 8 streams asked, 4 allowed: workers remain
            assert attacks.wait_until(lambda: rejected(svc, "too_many_streams") >= 4, 10)
            # The 4 admitted idle streams are closed after 0.5 s of silence.
            assert attacks.wait_until(lambda: not svc._gate._open, 10)
        finally:
            release()
    finally:
        svc.stop(grace_s=0.2)
