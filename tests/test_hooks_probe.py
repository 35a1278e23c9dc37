"""The probe core against a stand-in agent socket: records, heartbeats, fail-open."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from epwatch import wire
from epwatch.hooks import (
    COMBINE,
    DISPATCH,
    HookConfig,
    LayerCursor,
    NullProbe,
    Probe,
    flusher_of,
    get_probe,
    shutdown,
)
from tests.hook_sink import FrameSink

FAST = {"flush_interval_s": 0.02, "heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    yield
    shutdown()


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "agent.sock")


def probe_for(sock: str, rank: int = 1, world_size: int = 4, **kw: object) -> Probe:
    settings = {**FAST, **kw}
    p = get_probe("g", rank, world_size, 3, socket_path=sock, **settings)
    assert isinstance(p, Probe)
    return p


# ---- configuration ------------------------------------------------------------------


def test_config_reads_environment_and_arguments_win() -> None:
    env = {
        "EPWATCH_AGENT_SOCKET": "/x/a.sock",
        "EPWATCH_EP_GROUP": "decode",
        "EPWATCH_RANK": "5",
        "EPWATCH_WORLD_SIZE": "16",
        "EPWATCH_LOCAL_DEVICE": "2",
        "EPWATCH_BUFFER_RECORDS": "128",
        "EPWATCH_FLUSH_INTERVAL_MS": "50",
        "EPWATCH_PEER_SAMPLE_STEPS": "4",
        "EPWATCH_CLOCK": "HOST",
    }
    cfg = HookConfig.from_env(env, rank=7)
    assert (cfg.socket_path, cfg.ep_group, cfg.rank, cfg.world_size) == (
        "/x/a.sock",
        "decode",
        7,
        16,
    )
    assert (cfg.local_device, cfg.buffer_records, cfg.peer_sample_steps) == (2, 128, 4)
    assert cfg.flush_interval_s == pytest.approx(0.05)
    assert cfg.clock == "host" and not cfg.disabled and cfg.problems == ()


def test_config_never_raises_on_bad_values() -> None:
    env = {
        "EPWATCH_RANK": "two",
        "EPWATCH_BUFFER_RECORDS": "-3",
        "EPWATCH_CLOCK": "tsc",
        "EPWATCH_FLUSH_INTERVAL_MS": "soon",
        "LOCAL_RANK": "1",
    }
    cfg = HookConfig.from_env(env)
    assert cfg.rank is None and cfg.buffer_records == 65536 and cfg.clock == "auto"
    assert cfg.flush_interval_s == pytest.approx(0.1) and cfg.local_device == 1
    assert len(cfg.problems) == 4
    assert HookConfig.from_env({"EPWATCH_DISABLE": "yes"}).disabled


def test_disabled_or_unconfigured_probe_is_a_null_probe(
    sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EPWATCH_DISABLE", "1")
    assert isinstance(get_probe("g", 0, 4, socket_path=sock), NullProbe)
    monkeypatch.delenv("EPWATCH_DISABLE")
    monkeypatch.delenv("EPWATCH_RANK", raising=False)
    assert isinstance(get_probe("g", socket_path=sock), NullProbe)  # rank unknown
    assert isinstance(get_probe("g", 9, 4, socket_path=sock), NullProbe)  # rank >= P
    assert isinstance(get_probe("g", 0, 1 << 17, socket_path=sock), NullProbe)  # P too large
    null = get_probe("g", 9, 4, socket_path=sock)
    with null.collective(0, 0, DISPATCH) as span:
        span.recv_tokens = 3
    null.end(null.begin(0, 0, DISPATCH), 1, 2, 3)
    assert null.records_dropped == 0


def test_same_identity_gives_the_same_probe(sock: str) -> None:
    assert probe_for(sock) is probe_for(sock)
    assert probe_for(sock, rank=2) is not probe_for(sock)


# ---- records on the wire --------------------------------------------------------------


def test_records_reach_the_agent_with_every_field(sock: str) -> None:
    with FrameSink(sock) as sink:
        p = probe_for(sock)
        for step in range(3):
            for layer in range(2):
                t = p.begin(step, layer, DISPATCH)
                p.end(t, send_bytes=1000 + layer, recv_bytes=2000, recv_tokens=17)
                with p.collective(step, layer, COMBINE, send_bytes=5) as span:
                    span.recv_bytes = 6
                    span.recv_tokens = 7
        recs = sink.wait_records(12)
        msgs = sink.snapshot()
    assert len(recs) == 12
    assert set(recs.rank.tolist()) == {1} and set(recs.local_device.tolist()) == {3}
    assert recs.step.tolist() == [s for s in range(3) for _ in range(4)]
    assert recs.layer.tolist() == [0, 0, 1, 1] * 3
    assert recs.phase.tolist() == [0, 1] * 6
    assert (recs.exit_ns >= recs.enter_ns).all() and (np.diff(recs.enter_ns) >= 0).all()
    d = recs.take(recs.phase == 0)
    assert d.send_bytes.tolist() == [1000, 1001] * 3 and set(d.recv_tokens.tolist()) == {17}
    c = recs.take(recs.phase == 1)
    assert set(c.send_bytes.tolist()) == {5} and set(c.recv_bytes.tolist()) == {6}
    m = msgs[0]
    assert m.agent_id == f"hook:{os.getpid()}" and m.seq == 0
    assert m.batch.ep_group == "g" and m.batch.world_size == 4
    recs.validate(4)


def test_collective_exception_propagates_unchanged_and_records_nothing(sock: str) -> None:
    class Boom(RuntimeError):
        pass

    err = Boom("nccl timeout")
    with FrameSink(sock) as sink:
        p = probe_for(sock)
        with pytest.raises(Boom) as info, p.collective(4, 2, DISPATCH):
            raise err
        assert info.value is err
        assert p.entered == (4, 2, DISPATCH)  # it did enter
        p.end(p.begin(5, 0, DISPATCH))
        recs = sink.wait_records(1)
    assert recs.step.tolist() == [5]


def test_probe_failures_are_counted_not_raised(sock: str) -> None:
    def broken_clock() -> int:
        raise OSError("clock gone")

    p = probe_for(sock)
    p._now = broken_clock
    assert p.begin(0, 0, DISPATCH) is None
    p.end(object())  # type: ignore[arg-type]
    assert p.internal_errors == 2


def test_invalid_records_are_dropped_alone(sock: str) -> None:
    with FrameSink(sock) as sink:
        p = probe_for(sock)
        p.end(p.begin(-1, 0, DISPATCH), 1, 1, 1)  # negative step: the collector would reject
        p.end(p.begin(1, 0, 7), 1, 1, 1)  # no such phase
        p.end(p.begin(1, 5000, DISPATCH), 1, 1, 1)  # beyond MAX_LAYER
        token = p.begin(1, 1, DISPATCH)
        p.end_at(token, token[3] + 2 * 3600 * 10**9)  # "lasted" two hours
        p.end(p.begin(1, 2, DISPATCH), 1 << 50, 1, 1)  # implausible byte count
        p.end(p.begin(2, 0, COMBINE), -5, 1, 1)  # negative count: clamped to 0
        p.begin(-3, 0, DISPATCH)  # an unshippable heartbeat must not sink the frames
        recs = sink.wait_records(1)
        time.sleep(0.1)
        msgs = sink.snapshot()
    assert recs.step.tolist() == [2] and recs.send_bytes.tolist() == [0]
    assert flusher_of(p)._entries[0].resolver.invalid_records == 5
    for m in msgs:  # every frame passes the schema's own checks, as the agent applies them
        wire.decode_records(m.batch).validate(4)
        wire.decode_entered(m.batch).validate(4)
    assert all(m.batch.entered.count == 0 for m in msgs[-2:])


def test_peer_vectors_are_kept_on_sampled_steps_only(sock: str) -> None:
    with FrameSink(sock) as sink:
        p = probe_for(sock, peer_sample_steps=2)
        for step in range(4):
            t = p.begin(step, 0, DISPATCH)
            p.end(
                t,
                10,
                20,
                3,
                peer_wait_s=[0.1, 0.0, 0.2, 0.3],
                peer_send_bytes=np.array([1, 2, 3, 4]),
            )
        t = p.begin(4, 0, DISPATCH)
        p.end(t, 1, 1, 1, peer_wait_s=[1.0, 2.0])  # wrong length: dropped, record kept
        p.end(p.begin(6, 0, COMBINE), 1, 1, 1, peer_send_bytes=[5, 6, 7, 8])
        sink.wait_records(6)
        sink.wait_for(lambda: sum(len(r) for r in sink.peer_rows()) >= 3)
        rows = sink.peer_rows()
    both = [r for r in rows if r.wait_s.size and r.send_bytes.size]
    send_only = [r for r in rows if r.send_bytes.size and not r.wait_s.size]
    assert sorted(s for r in both for s in r.step.tolist()) == [0, 2]
    np.testing.assert_allclose(both[0].wait_s[0], [0.1, 0.0, 0.2, 0.3])
    assert both[0].send_bytes[0].tolist() == [1, 2, 3, 4]
    assert send_only[0].step.tolist() == [6] and send_only[0].phase.tolist() == [1]
    assert flusher_of(p)._entries[0].resolver.bad_peer_vectors == 1


# ---- heartbeats -------------------------------------------------------------------------


def test_heartbeat_is_sent_while_no_record_completes(sock: str) -> None:
    with FrameSink(sock) as sink:
        p = probe_for(sock, heartbeat_interval_s=0.2)
        p.end(p.begin(7, 60, COMBINE))
        p.begin(8, 0, DISPATCH)  # enters, never exits: a hang
        time.sleep(1.3)
        msgs = sink.snapshot()
        arrivals = sink.arrivals[: len(msgs)]
        entered = sink.entered()
    assert entered[-1] == (1, 8, 0, DISPATCH)
    late = [a for m, a in zip(msgs, arrivals, strict=True) if m.batch.entered.count]
    late = [a for a in late if a >= arrivals[0] + 0.2]
    assert len(late) >= 4, "heartbeats must keep coming with nothing completing"
    assert max(np.diff(late)) < 1.0  # periodic, with slack for a loaded CI machine


# ---- fail-open ------------------------------------------------------------------------


def test_no_agent_drops_and_counts_and_reconnects_rarely(sock: str) -> None:
    p = probe_for(sock, buffer_records=64, reconnect_interval_s=0.25)
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < 0.8:
        p.end(p.begin(step, 0, DISPATCH), 1, 1, 1)
        step += 1
    time.sleep(0.1)
    transport = flusher_of(p).transport
    assert p.records_dropped > 0 and p.records_dropped >= step - 2 * 64
    assert 1 <= transport.connect_attempts <= 5  # 0.9 s / 0.25 s, not one per tick
    # The agent appears: the newest records and the drop count arrive.
    with FrameSink(sock) as sink:
        for _ in range(3):
            p.end(p.begin(step, 0, DISPATCH), 1, 1, 1)
            step += 1
        sink.wait_for(lambda: any(m.stats.hook_records_dropped for m in sink.snapshot()))
        recs = sink.wait_records(3)
        msgs = sink.snapshot()
    assert recs.step.max() == step - 1
    assert max(m.stats.hook_records_dropped for m in msgs) == p.records_dropped


def test_agent_restart_is_survived(sock: str) -> None:
    p = probe_for(sock)
    with FrameSink(sock) as sink:
        p.end(p.begin(0, 0, DISPATCH))
        assert len(sink.wait_records(1)) == 1
    with FrameSink(sock) as sink:
        deadline = time.monotonic() + 5
        step = 1
        while time.monotonic() < deadline and not len(sink.records()):
            p.end(p.begin(step, 0, DISPATCH))
            step += 1
            time.sleep(0.01)
        assert len(sink.records()) >= 1
    assert flusher_of(p).transport.connects >= 2


def test_stalled_agent_never_blocks_the_caller(sock: str) -> None:
    with FrameSink(sock, read_delay_s=30) as sink:
        p = probe_for(sock, buffer_records=256, send_timeout_s=0.2)
        payload = list(range(4))
        worst = 0.0
        step = 0
        start = time.monotonic()
        while time.monotonic() - start < 1.5:  # long enough to fill the socket buffer
            t0 = time.perf_counter()
            p.end(p.begin(step, 0, DISPATCH), 1, 1, 1, None, payload)
            worst = max(worst, time.perf_counter() - t0)
            step += 1
        assert sink.connections >= 1
        assert flusher_of(p).transport.send_failures >= 1  # it did stall
    # Nothing the probe does waits on the socket; the GIL hand-off is the worst case.
    assert worst < 0.25
    assert p.records_dropped > 0


def test_buffer_bound_drops_newest_on_the_callers_side(sock: str) -> None:
    p = Probe(ep_group="g", rank=0, world_size=2, buffer_records=10)  # no flusher
    for step in range(25):
        p.end(p.begin(step, 0, DISPATCH))
    assert p.buffered == 10 and p.dropped_buffer_full == 15
    assert [r[0] for r in p.drain()] == list(range(10))


# ---- packaging ------------------------------------------------------------------------


def test_core_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import epwatch.hooks as h\n"
        "p = h.get_probe('g', 0, 2, socket_path='/nonexistent/a.sock', clock='auto')\n"
        "p.end(p.begin(0, 0, h.DISPATCH), 1, 2, 3)\n"
        "assert p.clock.name == 'host' and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_forked_child_ships_its_own_records(sock: str) -> None:
    with FrameSink(sock) as sink:
        p = probe_for(sock)
        p.end(p.begin(0, 0, DISPATCH))
        sink.wait_records(1)
        pid = os.fork()
        if pid == 0:  # child: record, let the flusher ship, leave without cleanup
            code = 1
            try:
                p.end(p.begin(100, 0, DISPATCH))
                time.sleep(0.5)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        sink.wait_for(lambda: any(m.agent_id == f"hook:{pid}" for m in sink.snapshot()))
        child = [m for m in sink.snapshot() if m.agent_id == f"hook:{pid}" and m.batch.count]
    assert child, "the child must connect on its own"
    steps = np.concatenate([wire.decode_records(m.batch).step for m in child]).tolist()
    assert steps == [100]  # not the parent's step 0 again


# ---- layer cursor ---------------------------------------------------------------------


def test_layer_cursor_numbers_layers_and_wraps_steps() -> None:
    c = LayerCursor(layers_per_step=2)
    assert [c.dispatch(), c.combine(), c.dispatch(), c.combine()] == [
        (0, 0),
        (0, 0),
        (0, 1),
        (0, 1),
    ]
    assert c.dispatch() == (1, 0) and c.dispatch() == (1, 1)
    assert c.combine() == (1, 0) and c.combine() == (1, 1)  # FIFO: oldest open dispatch
    assert c.step == 2
    c2 = LayerCursor()
    assert c2.dispatch(layer=5) == (0, 5) and c2.combine(5) == (0, 5)
    assert c2.next_step() == 1 and c2.dispatch() == (1, 0)


def test_outbox_keeps_the_newest_records_and_counts_the_rest() -> None:
    from epwatch.hooks.outbox import Outbox
    from tests.helpers import make_records

    p = Probe(ep_group="g", rank=0, world_size=16)
    box = Outbox(p, max_records=100)
    box.add(make_records(70, step0=0), [])
    box.add(make_records(50, step0=100), [])
    assert len(box) == 100 and p.dropped_unsent == 20
    frames = box.frames((9, 0, DISPATCH), dropped_total=p.records_dropped)
    kept = np.concatenate([np.asarray(r.step) for _, r in frames])
    assert len(kept) == 100 and kept.min() >= 1  # the 20 oldest (all of step 0) went


def test_peer_vectors_are_sampled_on_one_rotating_layer_per_sampled_step() -> None:
    """Every rank picks the same (step, layer), one layer per sampled step."""
    probes = [Probe(ep_group="g", rank=r, world_size=4, peer_sample_steps=4) for r in range(4)]
    picked = {r: [] for r in range(4)}
    for step in range(0, 40):
        for layer in range(3):
            for r, p in enumerate(probes):
                if p.sample_peers(step, layer):
                    picked[r].append((step, layer))
    assert all(picks == picked[0] for picks in picked.values())
    assert picked[0][:4] == [(0, 0), (4, 1), (8, 2), (12, 0)]
    assert len(picked[0]) == 10  # one per sampled step


def test_a_forked_child_does_not_speak_for_its_parent() -> None:
    p = Probe(ep_group="g", rank=0, world_size=2)
    p.begin(5, 1, 0)
    p.internal_errors = 3
    p.clear()  # what the flusher does in a forked child
    assert p.entered is None
    assert (p.records_dropped, p.internal_errors) == (0, 0)
