"""Pausing the counter probe around CUDA-graph capture, and resuming it.

Graph capture (global mode) breaks if another thread queries an event or starts a
copy meanwhile. The CUDA-only part of the probe (``_Snapshotter``'s copy on a side
stream and its event) is REPLACED HERE BY A STAND-IN, :class:`StandInCopy`, that logs
every call the probe makes to it and whose copy completes when the test says so; the
locking and pause/resume logic under test is the real probe's. The last test runs the
real CUDA path under a real capture and is skipped without a GPU.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from epwatch.counters import CounterSnapshot
from epwatch.hooks import flusher_of, get_probe
from epwatch.hooks.deepep import CounterProbe, CounterTensors
from epwatch.schema import IntervalColumns
from tests.hook_sink import FrameSink
from tests.test_hooks_deepep import SM_HZ

P, E_LOCAL = 8, 4
# The flusher thread never ticks on its own during a test: the test drives polls.
QUIET = {"flush_interval_s": 3600.0, "heartbeat_interval_s": 3600.0, "reconnect_interval_s": 0.1}


class StandInCopy:
    """STAND-IN for ``_Snapshotter``'s CUDA path (a device-to-host copy on the probe's
    stream plus an event, GPU only). ``start`` is the copy being enqueued (it can be
    held to simulate a poll caught half-way), ``finish`` is the event query (the copy
    completes once ``done`` is set), ``abandon`` forgets the copy. Every call is logged
    in ``calls``."""

    def __init__(self, t: CounterTensors) -> None:
        self.t = t
        self.calls: list[str] = []
        self.done = threading.Event()
        self.in_start = threading.Event()
        self.release_start = threading.Event()
        self.release_start.set()
        self._pending: CounterSnapshot | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def start(self, step: int) -> None:
        self.calls.append("start")
        self.in_start.set()
        assert self.release_start.wait(10)
        d, c, e = (x.numpy().copy() for x in (self.t.dispatch_wait, self.t.combine_wait,
                                               self.t.expert_tokens))  # fmt: skip
        self._pending = CounterSnapshot(time.monotonic_ns(), d, c, e, step)

    def finish(self) -> CounterSnapshot | None:
        self.calls.append("finish")
        if self._pending is None or not self.done.is_set():
            return None
        snap, self._pending = self._pending, None
        return snap

    def abandon(self) -> None:
        self.calls.append("abandon")
        self._pending = None


def make(sink: FrameSink, **kw: object) -> CounterProbe:
    probe = get_probe("cg", 3, P, socket_path=sink.path, **QUIET)
    counters = CounterProbe(
        None, probe=probe, interval_ms=1, num_local_experts=E_LOCAL, sm_clock_hz=SM_HZ, **kw
    )
    assert counters.enabled, counters.reason
    return counters


def with_stand_in(counters: CounterProbe) -> StandInCopy:
    assert counters.tensors is not None
    stand_in = StandInCopy(counters.tensors)
    counters._snap = stand_in  # type: ignore[assignment]
    return stand_in


def shipped_rows(counters: CounterProbe) -> IntervalColumns | None:
    parts = [row for _, carried in counters.frames() for row in carried]
    return IntervalColumns.concat(parts) if parts else None


def test_pause_waits_for_a_poll_under_way_and_for_its_copy(sink: FrameSink) -> None:
    counters = make(sink, start=False)
    copy = with_stand_in(counters)
    counters.poll()
    assert copy.calls == []  # created paused: not even an event query
    counters.resume()
    copy.release_start.clear()
    poller = threading.Thread(target=counters.poll)
    poller.start()
    assert copy.in_start.wait(5)  # the poll passed the pause check and is starting a copy
    pauser = threading.Thread(target=counters.pause, kwargs={"wait_s": 5.0})
    pauser.start()
    time.sleep(0.1)
    assert pauser.is_alive(), "pause() returned while a poll was starting a copy"
    copy.release_start.set()
    poller.join(5)
    time.sleep(0.05)
    assert pauser.is_alive(), "pause() returned while the copy was in flight"
    assert copy.in_flight
    copy.done.set()
    pauser.join(5)
    assert not pauser.is_alive() and not copy.in_flight
    assert copy.calls[0] == "start" and copy.calls[-1] == "finish"
    assert "abandon" not in copy.calls  # the copy completed: its snapshot is kept
    # Paused: polls make no CUDA call at all (no event query, no copy).
    before = list(copy.calls)
    for _ in range(5):
        time.sleep(0.003)
        counters.poll()
    assert copy.calls == before


def test_pause_abandons_a_copy_that_does_not_complete(sink: FrameSink) -> None:
    counters = make(sink)
    copy = with_stand_in(counters)
    counters.poll()
    assert copy.in_flight
    t0 = time.monotonic()
    counters.pause(wait_s=0.05)
    assert time.monotonic() - t0 < 2.0
    assert not copy.in_flight and copy.calls[-1] == "abandon"
    assert copy.calls.count("finish") >= 1  # it did wait, with event queries
    n = len(copy.calls)
    counters.poll()
    assert len(copy.calls) == n
    counters.resume()
    counters.poll()
    assert copy.calls[n:] == ["start"]  # sampling again after resume()


def test_resume_starts_a_new_baseline(sink: FrameSink) -> None:
    """Nothing that happened while paused (warm-up runs during a re-capture) is
    reported, and no interval spans the pause."""
    counters = make(sink)  # CPU tensors: the real (synchronous) snapshot path
    t = counters.tensors
    assert t is not None
    counters.poll()  # baseline
    t.expert_tokens.add_(1)
    t.dispatch_wait.add_(100)
    time.sleep(0.003)
    counters.poll()
    counters.pause()
    paused_at = time.monotonic_ns()
    t.expert_tokens.add_(1000)
    t.dispatch_wait.add_(10**9)
    time.sleep(0.005)
    counters.resume()
    resumed_at = time.monotonic_ns()
    counters.poll()  # a new baseline
    t.expert_tokens.add_(2)
    t.dispatch_wait.add_(200)
    time.sleep(0.003)
    counters.poll()
    rows = shipped_rows(counters)
    assert rows is not None and len(rows) == 2
    assert rows.expert_tokens.tolist() == [[1] * E_LOCAL, [2] * E_LOCAL]
    np.testing.assert_allclose(rows.dispatch_wait_s.sum(1), [100 * P / SM_HZ, 200 * P / SM_HZ])
    assert rows.end_ns[0] < paused_at and rows.start_ns[1] >= resumed_at


def test_interval_probe_drops_travel_as_hook_records_dropped(sink: FrameSink) -> None:
    """The probe's queue overflows while the flusher does not ship; the drops go into
    the rank probe's count and ride on the interval frames' stats."""
    counters = make(sink, max_intervals=2)
    t = counters.tensors
    assert t is not None
    for _ in range(6):  # a baseline and 5 intervals: 3 pushed out of a queue of 2
        t.expert_tokens.add_(1)
        time.sleep(0.002)
        counters.poll()
    assert counters.maker.dropped == 3
    counters.pause()  # no more snapshots; what was measured still ships
    flusher = flusher_of(counters.probe)
    assert flusher is not None
    flusher.flush_once()
    assert counters.probe.records_dropped == 3 and flusher.records_dropped == 3

    def got() -> list:
        return [m for m in sink.snapshot() if m.WhichOneof("payload") == "intervals"]

    assert sink.wait_for(lambda: len(got()) >= 1, 10)
    (msg,) = got()
    assert msg.intervals.count == 2
    assert msg.HasField("stats") and msg.stats.hook_records_dropped == 3
    assert msg.agent_id.startswith("hook:")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pause_keeps_a_real_capture_valid(sink: FrameSink) -> None:
    """Real GPU: the probe samples every millisecond, is paused, a graph is captured
    (global mode) while the flusher keeps ticking, then sampling resumes."""
    # The host clock: this test is about the counter probe's CUDA calls only.
    probe = get_probe("cg", 0, P, local_device=0, socket_path=sink.path,
                      flush_interval_s=0.001, clock="host")  # fmt: skip
    counters = CounterProbe(None, probe=probe, interval_ms=1, num_local_experts=E_LOCAL)
    assert counters.enabled, counters.reason
    t = counters.tensors
    assert t is not None and t.dispatch_wait.is_cuda
    assert counters.sm_clock.device == t.dispatch_wait.device.index
    inc = torch.ones(P, dtype=torch.int64, device=t.dispatch_wait.device)
    side = torch.cuda.Stream()
    time.sleep(0.05)  # sampling
    for _ in range(3):
        counters.pause()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            t.dispatch_wait.add_(inc)  # warm-up
            with torch.cuda.graph(graph, stream=side):
                for _ in range(50):
                    t.dispatch_wait.add_(inc)
                time.sleep(0.02)  # several flusher ticks while capturing
        counters.resume()
        for _ in range(20):
            graph.replay()
        time.sleep(0.02)
    torch.cuda.synchronize()
    assert counters.errors == 0
    assert sink.wait_for(lambda: any(m.WhichOneof("payload") == "intervals"
                                     for m in sink.snapshot()), 10)  # fmt: skip
