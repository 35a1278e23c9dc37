"""The agent's bounded spool and batcher: order, acks, requeue, drop-oldest, counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from epwatch import wire
from epwatch.agent.batcher import Batcher
from epwatch.agent.spool import Spool
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import Entered
from tests.helpers import make_records


def test_in_order_ack_and_requeue() -> None:
    s = Spool(100)
    seqs = [s.put(b"x", 10) for _ in range(3)]
    assert seqs == [1, 2, 3]
    a, b = s.take(8, 0.1), s.take(8, 0.1)
    assert a is not None and b is not None and (a.seq, b.seq) == (1, 2)
    assert s.ack(1, ok=True) is not None
    s.requeue()  # connection lost: 2 was in flight, 3 unsent
    assert [s.take(8, 0.1).seq, s.take(8, 0.1).seq] == [2, 3]  # type: ignore[union-attr]
    assert s.take(8, 0.01) is None
    s.ack(2, ok=True)
    s.ack(3, ok=False)
    c = s.counters
    assert (c.records_delivered, c.records_rejected, s.records, len(s)) == (20, 10, 0, 0)


def test_window_limits_inflight() -> None:
    s = Spool(100)
    for _ in range(3):
        s.put(b"x", 1)
    assert s.take(2, 0.01) and s.take(2, 0.01)
    assert s.take(2, 0.01) is None


def test_drops_oldest_unsent_beyond_bound_and_counts() -> None:
    s = Spool(25)
    first = s.take(8, 0.0)
    assert first is None
    s.put(b"a", 10)
    inflight = s.take(8, 0.1)  # seq 1 is on the wire: it must not be dropped
    for _ in range(3):
        s.put(b"b", 10)  # seqs 2..4; 40 records > 25
    assert s.counters.records_dropped == 20 and s.counters.messages_dropped["spool_full"] == 2
    assert inflight is not None and s.ack(inflight.seq, ok=True) is not None
    nxt = s.take(8, 0.1)
    assert nxt is not None and nxt.seq == 4  # oldest unsent survivors first
    received = 40
    assert received == s.counters.records_delivered + s.counters.records_dropped + s.records


def test_batcher_merges_splits_and_keeps_latest_heartbeat() -> None:
    s = Spool(1_000_000)
    b = Batcher(s, batch_records=100)
    hb = Entered(
        rank=np.array([0, 1, 0], np.int32),
        step=np.array([1, 1, 2], np.int64),
        layer=np.zeros(3, np.int32),
        phase=np.zeros(3, np.uint8),
    )
    b.add("g", 16, make_records(60), None, hb)
    assert len(s) == 0
    b.add("g", 16, make_records(70), None, None)  # 130 >= 100: one full batch goes
    assert len(s) == 1 and b.pending_records() == 30
    b.flush()
    msgs = [pb.AgentMessage.FromString(s.take(8, 0.1).payload) for _ in range(2)]  # type: ignore[union-attr]
    assert [m.batch.count for m in msgs] == [100, 30]
    entered = wire.decode_entered(msgs[0].batch)
    assert sorted(zip(entered.rank.tolist(), entered.step.tolist(), strict=True)) == [
        (0, 2),
        (1, 1),
    ]
    assert b.pending_records() == 0


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def test_take_sleeps_until_a_message_or_a_wake_that_cancels() -> None:
    s = Spool(100)
    cancel = threading.Event()
    t, out = _in_thread(lambda: s.take(8, 30.0, cancelled=cancel.is_set))
    time.sleep(0.05)
    s.wake()  # not cancelled: keeps waiting
    time.sleep(0.05)
    assert t.is_alive()
    s.put(b"x", 1)
    t.join(2)
    assert not t.is_alive() and out[0] is not None
    t, out = _in_thread(lambda: s.take(8, 30.0, cancelled=cancel.is_set))
    cancel.set()
    s.wake()
    t.join(2)
    assert not t.is_alive() and out == [None]


def test_wait_inflight_returns_when_an_ack_is_due_or_cancelled() -> None:
    s = Spool(100)
    cancel = threading.Event()
    t, out = _in_thread(lambda: s.wait_inflight(cancel.is_set))
    s.put(b"x", 1)  # queued, not in flight: no ack is due yet
    time.sleep(0.05)
    assert t.is_alive()
    assert s.take(8, 0.1) is not None
    t.join(2)
    assert out == [True]
    s.ack(1, ok=True)
    t, out = _in_thread(lambda: s.wait_inflight(cancel.is_set))
    cancel.set()
    s.wake()
    t.join(2)
    assert out == [False]


def test_batcher_signals_pending_data_until_flushed() -> None:
    b = Batcher(Spool(10_000), batch_records=1000)
    assert not b.wait_pending(0.01)
    b.add("g", 16, make_records(10, 16), None, None)
    assert b.wait_pending(0)
    b.flush()
    assert not b.wait_pending(0.01)
    b.add("g", 16, make_records(1000, 16), None, None)  # a full batch leaves nothing pending
    assert not b.wait_pending(0.01)
    b.wake()
    assert b.wait_pending(0)
