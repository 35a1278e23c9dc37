"""The DeepEP adapter against a STAND-IN buffer.

DeepEP needs GPUs and NVSHMEM, so these tests use ``StandInBuffer``: a CPU object with
the method signatures and return shapes of ``deep_ep.Buffer`` (deepseek-ai/DeepEP,
``deep_ep/buffer.py``: ``dispatch``, ``combine``, ``low_latency_dispatch``,
``low_latency_combine``, ``get_dispatch_layout``). Its routing is a fixed, hand-checked
example seen from rank 1 of a 4-rank group; its wait-stat counters grow like DeepEP's
(cumulative ``clock64()`` cycles per source rank, int64 ``[num_ranks]``).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from epwatch.hooks import COMBINE, DISPATCH, get_probe
from epwatch.hooks.deepep import InstrumentedBuffer
from tests.hook_sink import FrameSink

FAST = {"flush_interval_s": 0.02, "heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}
H, K, P, E = 256, 2, 4, 8  # hidden, top-k, ranks, experts (2 per rank)
TOPK = torch.tensor([[0, 3], [2, 3], [5, 6], [1, 7], [4, -1], [2, 5]])
PER_RANK = [2, 3, 3, 2]  # distinct destination ranks of each token, counted per rank
N_RECV, PER_EXPERT = 7, [5, 4]  # what the other ranks send to rank 1
LL_RECV_COUNT = [3, 5]
WAIT_CYCLES = torch.tensor([1000, 0, 3000, 500]) * 1000  # per call, per source rank
SM_HZ = 1e9


class StandInBuffer:
    """Stand-in for deep_ep.Buffer with its signatures and return shapes (CPU only)."""

    def __init__(self) -> None:
        self.rank, self.group_size = 1, P
        self.calls: list[str] = []

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple:
        ranks = torch.where(topk_idx >= 0, topk_idx // (num_experts // P), -1)
        in_rank = torch.stack([(ranks == r).any(dim=1) for r in range(P)], dim=1)
        per_rank = in_rank.sum(dim=0).to(torch.int32)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return per_rank, None, per_expert, in_rank, SimpleNamespace(event=None)

    def dispatch(
        self,
        x: Any,
        handle: tuple | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Any = None,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple:
        self.calls.append("dispatch")
        fp8 = isinstance(x, tuple)
        recv_x = torch.zeros(N_RECV, H, dtype=torch.bfloat16)
        if fp8:
            recv_x = (recv_x.to(torch.float8_e4m3fn), torch.ones(N_RECV, H // 128))
        event = SimpleNamespace(event=None)
        if handle is not None:  # cached layout
            assert topk_idx is None and topk_weights is None
            return recv_x, None, None, None, None, event
        assert num_tokens_per_rank is not None and is_token_in_rank is not None
        handle = (
            torch.zeros(P, P, dtype=torch.int32),
            torch.zeros(P, 4, dtype=torch.int32),
            torch.zeros(P, 4, dtype=torch.int32),
            torch.zeros(N_RECV, dtype=torch.int32),
            is_token_in_rank,
            torch.zeros(6, P, dtype=torch.int32),
        )
        return (
            recv_x,
            torch.zeros(N_RECV, K, dtype=torch.int64),
            torch.ones(N_RECV, K),
            list(PER_EXPERT),
            handle,
            event,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias: Any = None,
        config: Any = None,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple:
        self.calls.append("combine")
        if x.shape[0] != handle[3].shape[0]:
            raise RuntimeError("Assertion failed: x.size(0) == num_recv_tokens")
        return torch.zeros(6, H, dtype=torch.bfloat16), None, SimpleNamespace(event=None)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple:
        self.calls.append("low_latency_dispatch")
        local, slots = num_experts // P, num_max_dispatch_tokens_per_rank * P
        recv = torch.zeros(local, slots, H, dtype=torch.bfloat16)
        recv_x: Any = (recv.to(torch.float8_e4m3fn), torch.ones(local, slots, H // 128))
        if not use_fp8:
            recv_x = recv

        recv_count = torch.zeros(local, dtype=torch.int32)

        def receive() -> None:  # the kernel's receive half counts and waits per source
            recv_count.copy_(torch.tensor(LL_RECV_COUNT))
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(
                    torch.tensor(LL_RECV_COUNT, dtype=torch.int32)
                )
            if dispatch_wait_recv_cost_stats is not None:
                dispatch_wait_recv_cost_stats.add_(
                    WAIT_CYCLES.to(dispatch_wait_recv_cost_stats.device)
                )

        if not return_recv_hook:
            receive()
        handle = (
            torch.zeros(local, slots, dtype=torch.int32),
            torch.zeros(local, P, dtype=torch.int64),
            num_max_dispatch_tokens_per_rank,
            x.size(1),
            num_experts,
        )
        return (
            recv_x,
            recv_count,
            handle,
            SimpleNamespace(event=None),
            receive if return_recv_hook else None,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple:
        self.calls.append("low_latency_combine")
        if combine_wait_recv_cost_stats is not None:
            combine_wait_recv_cost_stats.add_(
                2 * WAIT_CYCLES.to(combine_wait_recv_cost_stats.device)
            )
        return torch.zeros(topk_idx.shape[0], H, dtype=torch.bfloat16), None, None


def wrap(sink: FrameSink, **kw: Any) -> tuple[InstrumentedBuffer, StandInBuffer]:
    raw = StandInBuffer()
    probe = get_probe(
        "deepep", raw.rank, raw.group_size, socket_path=sink.path, peer_sample_steps=1, **FAST
    )
    return InstrumentedBuffer(raw, probe, sm_clock_hz=SM_HZ, **kw), raw


def normal_layer(buf: InstrumentedBuffer, cached: bool = False) -> None:
    x = torch.zeros(6, H, dtype=torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(TOPK, E)
    recv_x, _, _, _, handle, _ = buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=TOPK,
        topk_weights=torch.ones(6, K),
    )
    if cached:
        buf.dispatch(x, handle=handle)
    buf.combine(recv_x, handle, topk_weights=torch.ones(N_RECV, K))


def test_normal_mode_counts_come_from_what_deepep_returns(sink: FrameSink) -> None:
    buf, raw = wrap(sink)
    normal_layer(buf, cached=True)
    recs = sink.wait_records(3)
    d, cached, c = (recs.take(np.array([i])) for i in range(3))
    send_row = H * 2 + K * 8 + K * 4  # bf16 token + int64 top-k ids + float weights
    assert (d.phase[0], d.send_bytes[0]) == (DISPATCH, sum(PER_RANK) * send_row)
    assert d.recv_bytes[0] == N_RECV * send_row and d.recv_tokens[0] == sum(PER_EXPERT)
    # A cached dispatch re-sends the same layout: its counts come from the handle.
    assert cached.send_bytes[0] == sum(PER_RANK) * H * 2 and cached.recv_tokens[0] == 9
    assert cached.recv_bytes[0] == N_RECV * H * 2
    assert (c.phase[0], c.send_bytes[0]) == (COMBINE, N_RECV * (H * 2 + K * 4))
    assert c.recv_bytes[0] == sum(PER_RANK) * H * 2 and c.recv_tokens[0] == sum(PER_RANK)
    sink.wait_for(lambda: len(sink.peer_rows()) >= 1)
    rows = sink.peer_rows()[0]
    assert rows.send_bytes[0].tolist() == [n * send_row for n in PER_RANK]
    assert raw.calls == ["dispatch", "dispatch", "combine"]


def test_layers_are_numbered_and_explicit_positions_never_reach_deepep(sink: FrameSink) -> None:
    buf, _ = wrap(sink)
    normal_layer(buf)
    normal_layer(buf)
    x = torch.zeros(6, H, dtype=torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(TOPK, E)
    buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=TOPK,
        topk_weights=torch.ones(6, K),
        epwatch_step=40,
        epwatch_layer=60,
    )
    recs = sink.wait_records(5)
    assert recs.layer.tolist() == [0, 0, 1, 1, 60] and recs.step.tolist() == [0] * 4 + [40]


def test_low_latency_wait_stats_become_seconds_per_source_rank(sink: FrameSink) -> None:
    buf, _ = wrap(sink)
    stats = torch.zeros(P, dtype=torch.int64)
    cstats = torch.zeros(P, dtype=torch.int64)
    x = torch.zeros(6, H, dtype=torch.bfloat16)
    for _ in range(2):  # counters are cumulative: each record must hold one call's wait
        _, _, handle, _, _ = buf.low_latency_dispatch(
            x, TOPK, 16, E, dispatch_wait_recv_cost_stats=stats, use_fp8=True
        )
        buf.low_latency_combine(
            torch.zeros(2, 64, H, dtype=torch.bfloat16),
            TOPK,
            torch.ones(6, K),
            handle,
            combine_wait_recv_cost_stats=cstats,
        )
    recs = sink.wait_records(4)
    msg = H + H // 128 * 4  # FP8 token + float scale per 128 channels
    d = recs.take(recs.phase == DISPATCH)
    assert set(d.send_bytes.tolist()) == {TOPK.numel() * msg}
    assert set(d.recv_tokens.tolist()) == {sum(LL_RECV_COUNT)}
    assert set(d.recv_bytes.tolist()) == {sum(LL_RECV_COUNT) * msg}
    c = recs.take(recs.phase == COMBINE)
    assert set(c.send_bytes.tolist()) == {sum(LL_RECV_COUNT) * H * 2}
    assert set(c.recv_bytes.tolist()) == {TOPK.numel() * H * 2}
    sink.wait_for(lambda: sum(len(r) for r in sink.peer_rows()) >= 4)
    rows = [r for r in sink.peer_rows() if r.wait_s.size]
    waits = {
        (int(ph), tuple(np.round(w, 9)))
        for r in rows
        for ph, w in zip(r.phase, r.wait_s, strict=True)
    }
    expect = WAIT_CYCLES.numpy() / SM_HZ
    assert waits == {(0, tuple(np.round(expect, 9))), (1, tuple(np.round(2 * expect, 9)))}


def test_receive_hook_ends_the_record_when_the_engine_calls_it(sink: FrameSink) -> None:
    buf, _ = wrap(sink)
    stats = torch.zeros(P, dtype=torch.int64)
    out = buf.low_latency_dispatch(
        torch.zeros(6, H, dtype=torch.bfloat16),
        TOPK,
        16,
        E,
        None,
        stats,
        False,
        return_recv_hook=True,
    )
    assert len(out) == 5 and callable(out[4])
    time.sleep(0.05)  # the engine overlaps other work before receiving
    assert buf.probe.buffered == 0
    out[4]()
    out[4]()  # a second call records nothing more
    recs = sink.wait_records(1)
    time.sleep(0.1)
    assert len(sink.records()) == 1
    assert recs.exit_ns[0] - recs.enter_ns[0] >= 50_000_000
    assert recs.recv_bytes[0] == sum(LL_RECV_COUNT) * H * 2  # BF16 dispatch
    sink.wait_for(lambda: len(sink.peer_rows()) >= 1)
    np.testing.assert_allclose(sink.peer_rows()[0].wait_s[0], WAIT_CYCLES.numpy() / SM_HZ)


def test_deepep_errors_propagate_unchanged_and_odd_results_pass_through(
    sink: FrameSink,
) -> None:
    buf, raw = wrap(sink)
    x = torch.zeros(6, H, dtype=torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(TOPK, E)
    _, _, _, _, handle, _ = buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=TOPK,
        topk_weights=torch.ones(6, K),
    )
    with pytest.raises(RuntimeError, match="num_recv_tokens"):
        buf.combine(torch.zeros(3, H, dtype=torch.bfloat16), handle)
    # A future DeepEP returning something else: the engine gets it untouched.
    raw.combine = lambda *a, **k: None  # type: ignore[method-assign]
    assert buf.combine(torch.zeros(N_RECV, H, dtype=torch.bfloat16), handle) is None
    assert buf.probe.internal_errors == 1
    assert buf.rank == 1 and buf.group_size == P  # attributes pass through


def test_one_shared_wrapper_per_buffer_numbers_every_layer(sink: FrameSink) -> None:
    raw = StandInBuffer()
    probe = get_probe("deepep", raw.rank, raw.group_size, socket_path=sink.path, **FAST)
    per_layer = [InstrumentedBuffer.shared(raw, probe=probe, layers_per_step=2) for _ in range(2)]
    assert per_layer[0] is per_layer[1] and InstrumentedBuffer.shared(per_layer[0]) is per_layer[0]
    for _ in range(2):  # two forward passes of a two-layer model
        for buf in per_layer:
            normal_layer(buf)
    recs = sink.wait_records(8)
    assert recs.step.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert recs.layer.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
