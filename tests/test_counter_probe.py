"""The counter probe (decode under CUDA graphs) on CPU tensors.

DeepEP's kernels need GPUs; here a thread MIMICS them: it adds ``clock64()``-like wait
cycles per source rank and tokens per local expert into the same int64/int32 tensors,
in place, as DeepEP's atomic adds do inside every graph replay. The probe snapshots
them from the hooks' flusher thread and ships interval records to a real Unix socket.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import torch

from epwatch import wire
from epwatch.agent.batcher import MAX_PENDING_BYTES, Batcher
from epwatch.agent.spool import Spool
from epwatch.counters import CounterSnapshot
from epwatch.hooks import get_probe
from epwatch.hooks.counter_probe import _sm_clock_device
from epwatch.hooks.counters import IntervalMaker
from epwatch.hooks.deepep import CounterProbe, CounterTensors, InstrumentedBuffer
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import MAX_DURATION_NS, IntervalColumns
from tests.hook_sink import FrameSink
from tests.test_hooks_deepep import LL_RECV_COUNT, SM_HZ, StandInBuffer

FAST = {"flush_interval_s": 0.02, "heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}
P, E_LOCAL = 8, 4


def intervals(sink: FrameSink) -> IntervalColumns | None:
    msgs = [m for m in sink.snapshot() if m.WhichOneof("payload") == "intervals"]
    assert all(m.schema == wire.INTERVALS_SCHEMA for m in msgs)
    parts = [wire.decode_intervals(m.intervals) for m in msgs]
    return IntervalColumns.concat(parts) if parts else None


class MimicKernels(threading.Thread):
    """Adds what DeepEP's low-latency kernels add, once per simulated step."""

    def __init__(self, t: CounterTensors, slow_sender: int, probe: CounterProbe) -> None:
        super().__init__(daemon=True)
        self.t, self.slow, self.probe = t, slow_sender, probe
        self.stop = threading.Event()
        self.steps = 0
        self.wait = torch.full((P,), 1000, dtype=torch.int64)
        self.wait[slow_sender] = 5000  # everyone waits 5x longer for the slow sender
        self.tokens = torch.tensor([10, 20, 30, 40], dtype=torch.int32)

    def run(self) -> None:
        while not self.stop.wait(0.002):
            self.t.dispatch_wait.add_(self.wait)
            self.t.combine_wait.add_(self.wait)
            self.t.expert_tokens.add_(self.tokens)
            self.steps += 1
            self.probe.step()


def test_intervals_from_counters_a_thread_writes(sink: FrameSink) -> None:
    probe = get_probe("cg", 2, P, socket_path=sink.path, **FAST)
    counters = CounterProbe(
        None, probe=probe, interval_ms=50, num_local_experts=E_LOCAL, sm_clock_hz=SM_HZ
    )
    assert counters.enabled, counters.reason
    assert counters.tensors is not None and counters.tensors.expert_tokens.dtype == torch.int32
    kernels = MimicKernels(counters.tensors, slow_sender=5, probe=counters)
    kernels.start()
    try:
        assert sink.wait_for(lambda: (rows := intervals(sink)) is not None and len(rows) >= 6, 10)
    finally:
        kernels.stop.set()
        kernels.join()
    rows = intervals(sink)
    assert rows is not None
    assert set(rows.rank.tolist()) == {2}
    # Consecutive intervals tile the probe's clock without gaps.
    assert (rows.start_ns[1:] == rows.end_ns[:-1]).all() and (rows.end_ns > rows.start_ns).all()
    # The step counter at each snapshot; the kernels added once per step, and a
    # snapshot may land between two of the thread's adds, so compare sums over intervals.
    assert (np.diff(rows.step) >= 0).all() and rows.step[-1] - rows.step[0] >= 3
    busy = np.r_[False, np.diff(rows.step) > 0]
    steps = int(rows.step[-1] - rows.step[0])
    waited = rows.dispatch_wait_s[1:].sum(axis=0)
    np.testing.assert_allclose(waited / steps, np.where(np.arange(P) == 5, 5e-6, 1e-6), rtol=0.05)
    np.testing.assert_allclose(rows.combine_wait_s[1:].sum(0), waited, rtol=0.05)
    assert busy.any()
    tokens = rows.expert_tokens[1:].sum(axis=0)
    np.testing.assert_allclose(tokens / steps, [10, 20, 30, 40], rtol=0.05)


def snapshot(t_ns: int, wait: int, tokens: list[int], step: int = -1) -> CounterSnapshot:
    w = np.full(P, wait, np.int64)
    return CounterSnapshot(t_ns, w, w.copy(), np.array(tokens, np.int32), step)


def test_int32_token_counters_wrap_and_a_reset_starts_a_new_baseline() -> None:
    maker = IntervalMaker("g", 0, P, 2)
    top = (1 << 31) - 5
    maker.push(snapshot(1_000, 100, [top, 7]), 1e9)
    maker.push(snapshot(2_000, 300, [-(1 << 31) + 4, 9]), 1e9)  # wrapped past int32
    maker.push(snapshot(3_000, 50, [0, 0]), 1e9)  # counters went backwards: fresh tensors
    maker.push(snapshot(4_000, 70, [6, 1]), 1e9)
    ((_, rows),) = maker.frames()
    assert len(rows) == 2 and maker.restarts == 1
    assert rows[0].expert_tokens.tolist() == [[9, 2]]
    np.testing.assert_allclose(rows[0].dispatch_wait_s, np.full((1, P), 200e-9))
    assert rows[0].step.tolist() == [-1]
    assert rows[1].expert_tokens.tolist() == [[6, 1]] and rows[1].start_ns.tolist() == [3_000]


def test_bounded_while_nothing_ships() -> None:
    maker = IntervalMaker("g", 0, P, 1, max_intervals=4)
    for i in range(10):
        maker.push(snapshot(1_000 * (i + 1), 10 * i, [i]), 1e9)
    assert len(maker) == 4 and maker.dropped == 5 and maker.intervals == 9


def test_bad_settings_disable_the_probe_without_raising(sink: FrameSink) -> None:
    probe = get_probe("cg", 1, P, socket_path=sink.path, **FAST)
    no_size = CounterProbe(None, probe=probe)  # cannot allocate token counters
    assert not no_size.enabled and "num_local_experts" in no_size.reason
    assert no_size.dispatch_kwargs() == {} and no_size.combine_kwargs() == {}
    wrong = CounterProbe(
        {
            "dispatch_wait_recv_cost_stats": torch.zeros(P, dtype=torch.int32),
            "combine_wait_recv_cost_stats": torch.zeros(P, dtype=torch.int64),
            "cumulative_local_expert_recv_stats": torch.zeros(2, dtype=torch.int32),
        },
        probe=probe,
    )
    assert not wrong.enabled and "dispatch_wait_recv_cost_stats" in wrong.reason
    no_probe = CounterProbe(None, "cg", rank=None, world_size=None, num_local_experts=2)
    assert not no_probe.enabled


def test_instrumented_buffer_hands_its_counters_to_deepep_calls(sink: FrameSink) -> None:
    raw = StandInBuffer()
    probe = get_probe("cg", raw.rank, raw.group_size, socket_path=sink.path, **FAST)
    buf = InstrumentedBuffer(
        raw, probe, sm_clock_hz=SM_HZ, counters=True, num_local_experts=2, counter_interval_ms=20
    )
    assert buf.counters is not None and buf.counters.enabled
    t = buf.counters.tensors
    assert t is not None
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    topk = torch.tensor([[0, 3], [2, 3], [5, 6]])
    for _ in range(3):
        _, _, handle, _, _ = buf.low_latency_dispatch(x, topk, 8, 8)
        buf.low_latency_combine(x, topk, torch.ones(3, 2), handle)
    assert t.expert_tokens.tolist() == [3 * n for n in LL_RECV_COUNT]
    assert int(t.dispatch_wait.sum()) > 0 and int(t.combine_wait.sum()) > 0
    own = torch.zeros(raw.group_size, dtype=torch.int64)  # the engine's own tensor wins
    buf.low_latency_combine(x, topk, torch.ones(3, 2), handle, combine_wait_recv_cost_stats=own)
    assert int(own.sum()) > 0
    assert sink.wait_for(lambda: (r := intervals(sink)) is not None and len(r) >= 1, 10)


def test_a_row_past_the_schema_bounds_is_dropped_alone() -> None:
    """An interval longer than the schema's hour (a stalled flusher) is refused; the
    rows framed with it still ship, and the refused one is counted."""
    maker = IntervalMaker("g", 0, P, 1)
    t = 1_000
    for i, dt in enumerate((0, 1_000, 2 * MAX_DURATION_NS, 1_000)):
        t += dt
        maker.push(snapshot(t, 10 * i, [i]), 1e9)
    ((_, rows),) = maker.frames()
    assert len(rows) == 2 and maker.rejected == 1 and maker.lost == 1
    spans = [int(r.end_ns[0] - r.start_ns[0]) for r in rows]
    assert spans == [1_000, 1_000]


def test_put_back_counts_every_row_it_cannot_keep() -> None:
    maker = IntervalMaker("g", 0, P, 1, max_intervals=4)
    for i in range(4):  # a baseline and 3 intervals
        maker.push(snapshot(1_000 * (i + 1), 10 * i, [i]), 1e9)
    ((_, carried),) = maker.frames()  # the send fails ...
    for i in range(4, 8):  # ... and 4 newer intervals fill the queue meanwhile
        maker.push(snapshot(1_000 * (i + 1), 10 * i, [i]), 1e9)
    maker.put_back(carried)
    assert len(maker) == 4 and maker.dropped == 3 and maker.lost == 3
    partly = IntervalMaker("g", 0, P, 1, max_intervals=4)
    for i in range(4):
        partly.push(snapshot(1_000 * (i + 1), 10 * i, [i]), 1e9)
    ((_, carried),) = partly.frames()
    for i in range(4, 7):  # 3 newer intervals: room for 1 of the 3 carried
        partly.push(snapshot(1_000 * (i + 1), 10 * i, [i]), 1e9)
    partly.put_back(carried)  # the newest carried goes back in front, 2 older are lost
    assert len(partly) == 4 and partly.dropped == 2
    ((_, rows),) = partly.frames()
    assert [int(r.start_ns[0]) for r in rows] == [3_000, 4_000, 5_000, 6_000]


def test_an_empty_token_tensor_disables_the_probe(sink: FrameSink) -> None:
    probe = get_probe("cg", 1, P, socket_path=sink.path, **FAST)
    empty = CounterProbe(
        {
            "dispatch_wait_recv_cost_stats": torch.zeros(P, dtype=torch.int64),
            "combine_wait_recv_cost_stats": torch.zeros(P, dtype=torch.int64),
            "cumulative_local_expert_recv_stats": torch.zeros(0, dtype=torch.int32),
        },
        probe=probe,
    )
    assert not empty.enabled
    assert "cumulative_local_expert_recv_stats" in empty.reason and "0 entries" in empty.reason
    assert empty.dispatch_kwargs() == {} and empty.combine_kwargs() == {}
    empty.poll()
    empty.pause()
    empty.resume()
    assert empty.frames() == []
    zero = CounterProbe(None, probe=probe, num_local_experts=0)
    assert not zero.enabled and "num_local_experts" in zero.reason


def test_the_sm_clock_is_asked_for_the_stats_tensors_gpu() -> None:
    """CUDA tensors need a GPU: STAND-INS here carry only what the choice reads
    (``is_cuda`` and ``device``); the CPU case uses real tensors."""
    on_gpu = SimpleNamespace(dispatch_wait=SimpleNamespace(
        is_cuda=True, device=torch.device("cuda", 3)))  # fmt: skip
    assert _sm_clock_device(on_gpu, -1) == 3  # type: ignore[arg-type]
    assert _sm_clock_device(on_gpu, 1) == 3  # type: ignore[arg-type]
    cpu = CounterTensors.allocate(P, 2, "cpu")
    assert _sm_clock_device(cpu, 2) == 2
    assert _sm_clock_device(cpu, -1) is None


def test_instrumented_buffer_counters_can_start_after_capture(sink: FrameSink) -> None:
    raw = StandInBuffer()
    probe = get_probe("cg", raw.rank, raw.group_size, socket_path=sink.path, **FAST)
    buf = InstrumentedBuffer(
        raw, probe, sm_clock_hz=SM_HZ, counters=True, num_local_experts=2,
        counter_interval_ms=5, counters_start=False,
    )  # fmt: skip
    assert buf.counters is not None and buf.counters.enabled
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    topk = torch.tensor([[0, 3], [2, 3], [5, 6]])
    for _ in range(3):  # "capture": the tensors are handed over, nothing is sampled
        _, _, handle, _, _ = buf.low_latency_dispatch(x, topk, 8, 8)
        buf.low_latency_combine(x, topk, torch.ones(3, 2), handle)
        time.sleep(0.02)
    assert buf.counters.tensors is not None
    assert int(buf.counters.tensors.dispatch_wait.sum()) > 0
    time.sleep(0.1)
    assert intervals(sink) is None and buf.counters.maker.intervals == 0
    buf.counters.resume()
    for _ in range(3):
        _, _, handle, _, _ = buf.low_latency_dispatch(x, topk, 8, 8)
        time.sleep(0.02)
    assert sink.wait_for(lambda: (r := intervals(sink)) is not None and len(r) >= 1, 10)


def wide_rows(first: int, n: int, world_size: int) -> IntervalColumns:
    i = np.arange(first, first + n)
    return IntervalColumns.from_arrays(
        world_size, E_LOCAL, rank=np.zeros(n), start_ns=i * 10, end_ns=i * 10 + 10, step=i,
        dispatch_wait_s=np.full((n, world_size), 1e-6),
        combine_wait_s=np.full((n, world_size), 1e-6), expert_tokens=np.ones((n, E_LOCAL)),
    )  # fmt: skip


def test_batcher_keeps_interval_messages_under_the_byte_bound() -> None:
    """At 4096 ranks a row is 64 KiB: 1024 of them would be 64 MiB in one message."""
    world = 4096
    spool = Spool(100_000)
    batcher = Batcher(spool, batch_records=1000)
    sent = 0
    for n in (100, 100, 300, 7):  # one part alone is past the bound: it is split
        batcher.add_intervals("big", world, wide_rows(sent, n, world))
        sent += n
    batcher.flush()
    payloads = []
    while (entry := spool.take(max_inflight=1000, timeout=0)) is not None:
        payloads.append(entry.payload)
    assert len(payloads) >= 4
    assert max(len(p) for p in payloads) <= MAX_PENDING_BYTES
    rows = [wire.decode_intervals(pb.AgentMessage.FromString(p).intervals) for p in payloads]
    steps = np.concatenate([r.step for r in rows])
    assert steps.tolist() == list(range(sent))  # nothing lost, in order
    assert batcher.pending_records() == 0
