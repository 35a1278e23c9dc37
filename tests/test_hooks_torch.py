"""The ``torch.distributed.all_to_all_single`` adapter on a real gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from epwatch.hooks import COMBINE, DISPATCH, Probe, get_probe
from epwatch.hooks.torch_a2a import A2ASpan, EPAllToAll, all_to_all_single
from tests.hook_sink import FAST, FrameSink


@pytest.fixture
def sink(hook_sink: FrameSink) -> FrameSink:
    return hook_sink


def test_span_counts_bytes_tokens_and_peer_sends_from_split_sizes() -> None:
    p = Probe(ep_group="g", rank=1, world_size=4, peer_sample_steps=1)
    x = torch.zeros(10, 8, dtype=torch.bfloat16)  # 16 bytes per row
    out = torch.zeros(7, 8, dtype=torch.bfloat16)
    span = A2ASpan(p, 2, 2, DISPATCH)  # step 2 samples layer 2 (of the 3 seen)
    span.add(out, x, [1, 2, 4, 0], [3, 3, 0, 4])
    span.add(out, x, [1, 2, 4, 0], [3, 3, 0, 4], recv_tokens=5)
    assert (span.send_bytes, span.recv_bytes, span.recv_tokens) == (320, 224, 12)
    assert span.peer_send_bytes == [96, 96, 0, 128]
    even = A2ASpan(p, 2, 2, COMBINE)
    even.add(out[:4], x[:8], None, None)  # no splits: equal parts
    assert even.peer_send_bytes == [32, 32, 32, 32] and even.recv_tokens == 4


def test_wrapper_times_real_gloo_collectives(gloo: None, sink: FrameSink) -> None:
    probe = get_probe("t", 0, 1, socket_path=sink.path, peer_sample_steps=1, **FAST)
    a2a = EPAllToAll(probe=probe)
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    for step in range(2):
        out = torch.empty(6, 4)
        a2a.all_to_all_single(out, x, [6], [6], phase=DISPATCH, step=step, layer=0)
        assert torch.equal(out, x)  # the collective really ran
        back = torch.empty(6, 4)
        all_to_all_single(back, out, probe=probe, phase=COMBINE, step=step, layer=0, recv_tokens=3)
    recs = sink.wait_records(4)
    assert recs.phase.tolist() == [0, 1, 0, 1]
    assert set(recs.send_bytes.tolist()) == {96} and set(recs.recv_bytes.tolist()) == {96}
    assert recs.recv_tokens.tolist() == [6, 3, 6, 3]
    assert (recs.exit_ns > recs.enter_ns).all()
    sink.wait_for(lambda: len(sink.peer_rows()) > 0)
    assert sink.peer_rows()[0].send_bytes[0].tolist() == [96]
    assert not sink.peer_rows()[0].wait_s.size  # gloo has no per-peer wait


def test_async_work_ends_the_record_on_wait(gloo: None, sink: FrameSink) -> None:
    probe = get_probe("t", 0, 1, socket_path=sink.path, **FAST)
    a2a = EPAllToAll(probe=probe)
    out = torch.empty(4, 2)
    work = a2a.all_to_all_single(
        out, torch.ones(4, 2), async_op=True, phase=DISPATCH, step=0, layer=1
    )
    assert probe.buffered == 0  # nothing recorded before the engine waits
    work.wait()
    assert work.is_completed()  # other attributes pass through
    recs = sink.wait_records(1)
    assert recs.layer.tolist() == [1] and recs.recv_tokens.tolist() == [4]


def test_multi_collective_span_and_cursor(gloo: None, sink: FrameSink) -> None:
    probe = get_probe("t", 0, 1, socket_path=sink.path, **FAST)
    a2a = EPAllToAll(probe=probe)
    for _ in range(2):
        with a2a.span(DISPATCH) as span:
            counts = torch.empty(1, dtype=torch.int64)
            span.all_to_all_single(counts, torch.tensor([5]), count=False)
            span.all_to_all_single(torch.empty(5, 3), torch.ones(5, 3), [5], [5])
        with a2a.span(COMBINE) as span:
            span.all_to_all_single(torch.empty(5, 3), torch.ones(5, 3), [5], [5])
    a2a.cursor.next_step()
    with a2a.span(DISPATCH) as span:
        span.all_to_all_single(torch.empty(2, 3), torch.ones(2, 3))
    recs = sink.wait_records(5)
    assert list(zip(recs.step.tolist(), recs.layer.tolist(), recs.phase.tolist(), strict=True)) == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (0, 1, 1),
        (1, 0, 0),
    ]
    assert recs.send_bytes.tolist()[:2] == [60, 60]  # the count exchange is not payload


def test_collective_errors_propagate_unchanged(gloo: None, sink: FrameSink) -> None:
    probe = get_probe("t", 0, 1, socket_path=sink.path, **FAST)
    a2a = EPAllToAll(probe=probe)
    with pytest.raises(Exception) as info:  # whatever torch raises
        a2a.all_to_all_single(
            torch.empty(3, 2), torch.ones(4, 2), [3], [9], phase=DISPATCH, step=0, layer=0
        )
    direct = None
    try:
        dist.all_to_all_single(torch.empty(3, 2), torch.ones(4, 2), [3], [9])
    except Exception as e:
        direct = e
    assert type(info.value) is type(direct)
    assert probe.entered == (0, 0, DISPATCH) and probe.buffered == 0
    assert probe.internal_errors == 0


def test_group_rank_is_taken_from_the_process_group(
    gloo: None, sink: FrameSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EPWATCH_AGENT_SOCKET", sink.path)
    monkeypatch.setenv("EPWATCH_EP_GROUP", "from-group")
    a2a = EPAllToAll()
    assert isinstance(a2a.probe, Probe)
    assert (a2a.probe.ep_group, a2a.probe.rank, a2a.probe.world_size) == ("from-group", 0, 1)
    assert a2a.all_to_all_single(torch.empty(1), torch.ones(1), phase=DISPATCH) is None
    assert sink.wait_records(1).recv_tokens.tolist() == [1]
