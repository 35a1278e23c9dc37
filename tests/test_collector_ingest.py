"""The ingest path: validation with reasons, de-duplication, nothing partial ingested."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from epwatch import wire
from epwatch.collector.agents import AgentTable
from epwatch.collector.dedup import SeqDeduper
from epwatch.collector.groups import GroupTable, NullEstimator
from epwatch.collector.ingest import INVALID_ARGUMENT, Ingestor
from epwatch.collector.metrics import IngestMetrics, family_names
from epwatch.collector.samples import NodeSampleStore
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import PeerRows, RecordColumns
from tests.helpers import make_records, value


class CountingEstimator(NullEstimator):
    def __init__(self, ep_group: str, world_size: int) -> None:
        super().__init__(ep_group, world_size)
        self.records = 0

    def ingest(self, records: RecordColumns, node: str) -> None:
        self.records += len(records)


class Rig:
    def __init__(self, max_message_bytes: int = 1 << 20) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.groups = GroupTable(CountingEstimator)
        self.agents = AgentTable()
        metrics = IngestMetrics(self.registry)
        self.samples = NodeSampleStore(family_names([*metrics.members, self.agents]))
        self.registry.register(self.agents)
        self.registry.register(self.samples)
        self.ingestor = Ingestor(
            self.groups,
            SeqDeduper(),
            self.agents,
            self.samples,
            metrics,
            max_message_bytes=max_message_bytes,
        )

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def ingested(self, group: str = "g") -> int:
        return sum(g.estimator.records for g in self.groups.groups() if g.ep_group == group)


def message(seq: int, records: RecordColumns, ws: int = 16, **kw) -> bytes:
    batch = wire.encode_records(kw.pop("group", "g"), ws, records, kw.pop("peer_rows", None))
    msg = pb.AgentMessage(agent_id=kw.pop("agent", "a"), node="n0", seq=seq, batch=batch)
    return msg.SerializeToString()


def test_accept_count_and_deduplicate() -> None:
    rig = Rig()
    raw = message(1, make_records(100))
    assert rig.ingestor.handle(raw).code == 0
    again = rig.ingestor.handle(raw)
    assert again.code == 0 and again.duplicate
    assert rig.ingested() == 100
    text = rig.text()
    assert value(text, "epwatch_ingest_records_total", ep_group="g") == 100
    assert value(text, "epwatch_ingest_batches_total") == 1
    assert value(text, "epwatch_ingest_duplicates_total") == 1


def _with(records: RecordColumns, **changes: np.ndarray) -> RecordColumns:
    cols = records.as_dict()
    cols.update(changes)
    return RecordColumns(**cols)


def _bad_cases() -> dict[str, bytes]:
    r = make_records(32)
    short = message(2, r)
    batch = pb.AgentMessage.FromString(short)
    batch.batch.step = batch.batch.step[:-8]  # one value short
    rows = PeerRows(
        rank=np.array([0], np.int32),
        step=np.array([0], np.int64),
        layer=np.array([0], np.int32),
        phase=np.array([0], np.uint8),
        wait_s=np.full((1, 16), np.nan),
        send_bytes=np.zeros((1, 16), np.int64),
    )
    return {
        "length_mismatch": batch.SerializeToString(),
        "rank_out_of_range": message(2, _with(r, rank=r.rank + 16)),
        "negative_duration": message(2, _with(r, exit_ns=r.enter_ns - 1)),
        "non_finite": message(2, r, peer_rows=rows),
        "garbage": b"\x0a\xff\xff\xff\xff\x0f garbage",
        "bad_phase": message(2, _with(r, phase=np.full(32, 7, np.uint8))),
        "missing_group": message(2, r, group=""),
        "bad_world_size": message(2, r, ws=0),
    }


@pytest.mark.parametrize("reason", sorted(_bad_cases()))
def test_malformed_is_rejected_with_reason_and_nothing_lost(reason: str) -> None:
    rig = Rig()
    assert rig.ingestor.handle(message(1, make_records(64))).code == 0
    out = rig.ingestor.handle(_bad_cases()[reason])
    assert out.code == INVALID_ARGUMENT and out.reason == reason and out.message
    assert rig.ingested() == 64  # what was accepted before is intact
    assert value(rig.text(), "epwatch_ingest_rejected_total", reason=reason) == 1
    assert rig.ingestor.handle(message(2, make_records(16))).code == 0  # seq 2 is free again
    assert rig.ingested() == 80


def test_world_size_change_is_rejected() -> None:
    rig = Rig()
    assert rig.ingestor.handle(message(1, make_records(16, 16))).code == 0
    out = rig.ingestor.handle(message(2, make_records(8, 8), ws=8))
    assert (out.code, out.reason) == (INVALID_ARGUMENT, "world_size_changed")
    assert "16" in out.message and "8" in out.message


def test_a_quiet_group_may_come_back_at_another_world_size() -> None:
    """An engine restarted at another EP width: after the group has been quiet a while
    the new size is a new group, not a stream of rejections."""
    rig = Rig()
    assert rig.ingestor.handle(message(1, make_records(16, 16))).code == 0
    (group,) = rig.groups.groups()
    group.last_ingest_s -= 31.0  # quiet for longer than resize_after_s
    assert rig.ingestor.handle(message(2, make_records(8, 8), ws=8)).code == 0
    (group,) = rig.groups.groups()
    assert group.world_size == 8


def test_oversized_is_rejected_with_its_seq() -> None:
    rig = Rig(max_message_bytes=10_000)
    out = rig.ingestor.handle(message(5, make_records(1000)))
    assert (out.code, out.reason, out.seq) == (INVALID_ARGUMENT, "oversized", 5)
    assert rig.ingested() == 0


def test_rejected_seq_is_not_remembered() -> None:
    rig = Rig()
    r = make_records(16)
    assert rig.ingestor.handle(message(1, _with(r, rank=r.rank + 99))).code == INVALID_ARGUMENT
    assert rig.ingestor.handle(message(1, r)).code == 0
    assert rig.ingested() == 16


def _sample(*points: pb.MetricPoint) -> bytes:
    msg = pb.AgentMessage(agent_id="a", node="n1", seq=1, sample=pb.NodeSample(points=points))
    return msg.SerializeToString()


def test_node_samples_are_reexposed_with_node() -> None:
    rig = Rig()
    point = pb.MetricPoint(
        name="epwatch_gpu_sm_clock_hertz", labels={"gpu": "0"}, value=1.98e9, help="SM clock"
    )
    counter = pb.MetricPoint(
        name="epwatch_nic_transmit_bytes_total",
        labels={"device": "mlx5_0", "port": "1"},
        value=123.0,
        kind=pb.MetricPoint.COUNTER,
    )
    assert rig.ingestor.handle(_sample(point, counter)).code == 0
    text = rig.text()
    assert value(text, "epwatch_gpu_sm_clock_hertz", node="n1", gpu="0") == 1.98e9
    assert value(text, "epwatch_nic_transmit_bytes_total", node="n1", device="mlx5_0") == 123


@pytest.mark.parametrize(
    "point",
    [
        pb.MetricPoint(name="node_cpu_seconds"),
        pb.MetricPoint(name="epwatch_ingest_records_total", kind=pb.MetricPoint.COUNTER),
        pb.MetricPoint(name="epwatch_x", kind=pb.MetricPoint.COUNTER),
        pb.MetricPoint(name="epwatch_x", labels={"bad-label": "1"}),
    ],
)
def test_bad_node_samples_are_rejected(point: pb.MetricPoint) -> None:
    rig = Rig()
    out = rig.ingestor.handle(_sample(point))
    assert (out.code, out.reason) == (INVALID_ARGUMENT, "bad_sample")


def test_agent_stats_are_mirrored_per_node() -> None:
    rig = Rig()
    for agent, dropped in (("a", 5), ("b", 7)):
        msg = pb.AgentMessage(
            agent_id=agent,
            node="n0",
            stats=pb.AgentStats(records_dropped=dropped, hook_records_dropped=1, spool_records=3),
        )
        assert rig.ingestor.handle(msg.SerializeToString()).code == 0
    text = rig.text()
    assert value(text, "epwatch_agent_records_dropped_total", node="n0") == 12
    assert value(text, "epwatch_agent_hook_records_dropped_total", node="n0") == 2
    assert value(text, "epwatch_agent_spool_records", node="n0") == 6


def test_estimator_failure_is_internal_not_fatal() -> None:
    class Broken(NullEstimator):
        def ingest(self, records: RecordColumns, node: str) -> None:
            raise RuntimeError("boom")

    rig = Rig()
    rig.groups = rig.ingestor.groups = GroupTable(Broken)
    out = rig.ingestor.handle(message(1, make_records(8)))
    assert out.code == 13 and "boom" in out.message
    assert not math.isnan(out.seq)


def test_idle_group_expires_and_may_return_with_another_world_size() -> None:
    from epwatch.collector.analyzer import Analyzer

    rig = Rig()
    rig.groups = rig.ingestor.groups = GroupTable(CountingEstimator, expire_after_s=0.0)
    assert rig.ingestor.handle(message(1, make_records(16, 16))).code == 0
    Analyzer(rig.groups, rig.ingestor.metrics).run_once()
    assert rig.groups.groups() == []
    assert value(rig.text(), "epwatch_ingest_records_total", ep_group="g") is None
    assert rig.ingestor.handle(message(2, make_records(8, 8), ws=8)).code == 0


def test_every_reject_reason_exists_at_zero_from_the_start() -> None:
    """rate() cannot see a counter's first value; the reject panels and the
    EPCollectorIngestRejects alert need every reason's series before any reject."""
    import re
    from pathlib import Path

    from epwatch.collector.metrics import REJECT_REASONS

    root = Path(__file__).resolve().parents[1]
    raised = {"internal"}
    for package in ("epwatch", "collector"):
        for path in (root / package).rglob("*.py"):
            raised |= set(re.findall(r'RecordError\(\s*"([a-z_]+)"', path.read_text()))
    assert set(REJECT_REASONS) == raised
    text = Rig().text()
    assert all(
        value(text, "epwatch_ingest_rejected_total", reason=reason) == 0
        for reason in REJECT_REASONS
    )
