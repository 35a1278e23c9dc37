"""The CUDA-event clock and device-value reads: only where a GPU is present.

These are the paths a GPU engine takes: stamps are events recorded on the stream and
resolved by the flusher, device counters are read through pinned non-blocking copies,
and the caller's thread never waits for the device.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from epwatch.hooks import DISPATCH, get_probe
from tests.hook_sink import FrameSink

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=(
        "the CUDA-event clock needs a GPU: torch.cuda.is_available() is False here "
        f"(torch {torch.__version__}); the host-clock path is tested everywhere"
    ),
)

FAST = {"flush_interval_s": 0.02, "heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}


def _spin_cycles(seconds: float) -> int:
    khz = torch.cuda.get_device_properties(0).clock_rate or 1_500_000
    return int(seconds * khz * 1e3)


def test_stamps_time_the_device_and_the_caller_never_waits(sink: FrameSink) -> None:
    probe = get_probe("cuda", 0, 1, 0, socket_path=sink.path, clock="cuda", **FAST)
    assert probe.clock.name == "cuda"
    torch.cuda.synchronize()
    t0 = time.monotonic_ns()
    token = probe.begin(0, 0, DISPATCH)
    torch.cuda._sleep(_spin_cycles(0.05))  # 50 ms of device work, launched asynchronously
    probe.end(token, 1, 2, 3)
    host_ns = time.monotonic_ns() - t0
    assert host_ns < 20e6, "begin/end must not wait for the device"
    recs = sink.wait_records(1, timeout=10)
    duration = int(recs.exit_ns[0] - recs.enter_ns[0])
    assert 20e6 <= duration <= 1e9
    assert abs(int(recs.enter_ns[0]) - t0) < 100e6  # on the host clock's timeline


def test_host_copy_reads_device_values_as_of_the_copy() -> None:
    from epwatch.hooks.tensors import HostCopy

    t = torch.arange(4, device="cuda")
    torch.cuda._sleep(_spin_cycles(0.02))
    copy = HostCopy(t)
    t.add_(10)  # later work on the stream must not show in the copy
    deadline = time.monotonic() + 5
    while not copy.ready() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert copy.value().tolist() == [0, 1, 2, 3]


def test_deepep_wait_stats_on_the_device(sink: FrameSink) -> None:
    from epwatch.hooks.deepep import InstrumentedBuffer
    from tests.test_hooks_deepep import SM_HZ, TOPK, WAIT_CYCLES, E, H, P, StandInBuffer

    raw = StandInBuffer()
    probe = get_probe(
        "cuda-deepep",
        raw.rank,
        P,
        0,
        socket_path=sink.path,
        clock="cuda",
        peer_sample_steps=1,
        **FAST,
    )
    buf = InstrumentedBuffer(raw, probe, sm_clock_hz=SM_HZ)
    stats = torch.zeros(P, dtype=torch.int64, device="cuda")
    buf.low_latency_dispatch(
        torch.zeros(6, H, dtype=torch.bfloat16), TOPK, 16, E, dispatch_wait_recv_cost_stats=stats
    )
    sink.wait_records(1, timeout=10)
    sink.wait_for(lambda: len(sink.peer_rows()) >= 1, timeout=10)
    np.testing.assert_allclose(sink.peer_rows()[0].wait_s[0], WAIT_CYCLES.numpy() / SM_HZ)
