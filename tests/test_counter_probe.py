"""The counter probe (decode under CUDA graphs) on CPU tensors.

DeepEP's kernels need GPUs; here a thread MIMICS them: it adds ``clock64()``-like wait
cycles per source rank and tokens per local expert into the same int64/int32 tensors,
in place, as DeepEP's atomic adds do inside every graph replay. The probe snapshots
them from the hooks' flusher thread and ships interval records to a real Unix socket.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from epwatch import wire
from epwatch.counters import CounterSnapshot
from epwatch.hooks import get_probe, shutdown
from epwatch.hooks.counters import IntervalMaker
from epwatch.hooks.deepep import CounterProbe, CounterTensors, InstrumentedBuffer
from epwatch.schema import IntervalColumns
from tests.hook_sink import FrameSink
from tests.test_hooks_deepep import LL_RECV_COUNT, SM_HZ, StandInBuffer

FAST = {"flush_interval_s": 0.02, "heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}
P, E_LOCAL = 8, 4


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[FrameSink]:
    with FrameSink(str(tmp_path / "agent.sock")) as s:
        yield s
    shutdown()


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
