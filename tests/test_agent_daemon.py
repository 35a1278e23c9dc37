"""The agent in-process against an in-process collector: frames in, records out."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from epwatch.agent.daemon import Agent, AgentConfig
from epwatch.cliargs import free_port
from epwatch.collector.groups import NullEstimator
from epwatch.collector.service import CollectorConfig, CollectorService
from epwatch.frames import FrameSender, encode_frame, hook_frame
from tests.helpers import make_records, value, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="epw")  # short: Unix socket paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_collector(grpc_port: int) -> CollectorService:
    """On a given port: the agents are made before it, and some must find it gone."""
    svc = CollectorService(
        CollectorConfig(grpc_listen=f"127.0.0.1:{grpc_port}", metrics_listen=None),
        estimator_factory=NullEstimator,
    )
    svc.start()
    return svc


def make_agent(grpc_port: int, path: str, **kw) -> Agent:
    config = AgentConfig(
        collector=f"127.0.0.1:{grpc_port}",
        node="n0",
        socket_path=path,
        flush_interval_s=0.05,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
        **kw,
    )
    return Agent(config)


def records_total(svc: CollectorService) -> float:
    return value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group="g") or 0.0


def test_frames_from_ranks_reach_the_collector(sockdir: str) -> None:
    port = free_port()
    svc = start_collector(port)
    agent = make_agent(port, f"{sockdir}/a.sock")
    agent.start()
    try:
        senders = [FrameSender(f"{sockdir}/a.sock") for _ in range(2)]
        for _ in range(20):
            for r, s in enumerate(senders):
                s.send(hook_frame("g", 16, make_records(50, 16, ranks=[r]), pid=100 + r))
        wait_for(lambda: records_total(svc) == 2000)
        wait_for(lambda: agent.spool.counters.records_delivered == 2000)
        assert agent.receiver_counters.records_received == 2000
        assert value(svc.metrics_text(), "epwatch_agents_connected") == 1
        for s in senders:
            s.close()
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


def test_bad_frames_are_counted(sockdir: str) -> None:
    port = free_port()
    svc = start_collector(port)
    agent = make_agent(port, f"{sockdir}/a.sock")
    agent.start()
    try:
        good = hook_frame("g", 16, make_records(10, 16))
        bad = hook_frame("g", 4, make_records(10, 16))  # ranks beyond world_size 4
        with FrameSender(f"{sockdir}/a.sock") as s:
            s.send(bad + good)
            wait_for(lambda: agent.receiver_counters.records_received == 10)
            s.send(encode_frame(b"\xff\xff\xff\xff"))  # not a message: connection closed
            s._sock.settimeout(5)
            assert s._sock.recv(1) == b""
        rejected = agent.receiver_counters.rejected_by_reason()
        assert rejected == {"rank_out_of_range": 1, "garbage": 1}
        wait_for(lambda: records_total(svc) == 10)
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


def test_agent_spools_while_collector_is_down_and_delivers_after(sockdir: str) -> None:
    port = free_port()
    agent = make_agent(port, f"{sockdir}/a.sock")
    agent.start()
    svc = None
    try:
        with FrameSender(f"{sockdir}/a.sock") as s:
            for _ in range(10):
                s.send(hook_frame("g", 16, make_records(100, 16)))
            wait_for(lambda: agent.spool.records == 1000)
            assert not agent.shipper.connected
            svc = start_collector(port)
            wait_for(lambda: records_total(svc) == 1000)
            svc.stop(grace_s=0.2)  # a graceful stop, then a fresh collector on the same port
            s.send(hook_frame("g", 16, make_records(100, 16)))
            svc = start_collector(port)
            wait_for(lambda: records_total(svc) == 100)
        assert agent.spool.counters.records_delivered == 1100
        assert agent.shipper.reconnects >= 1
    finally:
        agent.stop()
        if svc is not None:
            svc.stop(grace_s=0.2)


class _Point:
    def __init__(self, name: str, value: float) -> None:
        self.name, self.value = name, value

    def to_proto(self) -> object:
        from epwatch.protos import epwatch_pb2 as pb

        return pb.MetricPoint(name=self.name, labels={"gpu": "0"}, value=self.value)


def test_sample_rounds_are_shipped_and_reexposed(sockdir: str) -> None:
    port = free_port()
    svc = start_collector(port)
    config = AgentConfig(
        collector=f"127.0.0.1:{port}",
        node="n7",
        socket_path=f"{sockdir}/a.sock",
        sample_interval_s=0.1,
    )
    agent = Agent(config, sample_round=lambda: ([_Point("epwatch_gpu_power_watts", 700.0)], []))
    agent.start()
    try:
        wait_for(
            lambda: (
                value(svc.metrics_text(), "epwatch_gpu_power_watts", node="n7", gpu="0") == 700.0
            )
        )
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


def test_agent_daemon_imports_neither_pandas_nor_the_collector() -> None:
    code = (
        "import argparse, sys, epwatch.cli.agent, epwatch.agent.daemon, epwatch.agent.metrics;"
        "epwatch.cli.agent.add_arguments(argparse.ArgumentParser());"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pandas', 'pyarrow')"
        " or m.startswith('epwatch.collector')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_stale_socket_file_is_replaced(sockdir: str) -> None:
    path = f"{sockdir}/a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    agent = make_agent(free_port(), path)
    agent.start()
    try:
        with FrameSender(path) as s:
            s.send(hook_frame("g", 16, make_records(5, 16)))
        wait_for(lambda: agent.receiver_counters.records_received == 5)
    finally:
        agent.stop(drain_timeout=0)


def test_real_hooks_through_the_agent(sockdir: str) -> None:
    hooks = pytest.importorskip("epwatch.hooks")
    port = free_port()
    svc = start_collector(port)
    path = f"{sockdir}/a.sock"
    agent = make_agent(port, path)
    agent.start()
    try:
        probes = [
            hooks.get_probe("hooked", r, 2, r, socket_path=path, flush_interval_s=0.02)
            for r in range(2)
        ]
        for step in range(50):
            for layer in range(4):
                for phase in (hooks.DISPATCH, hooks.COMBINE):
                    for p in probes:
                        token = p.begin(step, layer, phase)
                        p.end(token, send_bytes=1024, recv_bytes=1024, recv_tokens=8)
        hooks.shutdown(timeout=5)
        wait_for(
            lambda: (
                value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group="hooked")
                == 2 * 50 * 4 * 2
            )
        )
        assert agent.receiver_counters.rejected_by_reason() == {}
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


def test_collector_rejections_are_counted_not_retried(sockdir: str) -> None:
    port = free_port()
    svc = start_collector(port)
    agent = make_agent(port, f"{sockdir}/a.sock")
    agent.start()
    try:
        with FrameSender(f"{sockdir}/a.sock") as s:
            s.send(hook_frame("g", 16, make_records(32, 16)))
            wait_for(lambda: records_total(svc) == 32)
            s.send(hook_frame("g", 8, make_records(8, 8)))  # the group's P changed: refused
            wait_for(lambda: agent.spool.counters.records_rejected == 8)
            s.send(hook_frame("g", 16, make_records(16, 16)))
            wait_for(lambda: records_total(svc) == 48)
        assert agent.shipper.rejections == 1 and len(agent.spool) == 0
        assert (
            value(svc.metrics_text(), "epwatch_ingest_rejected_total", reason="world_size_changed")
            == 1
        )
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)


def test_agent_metrics_pass_promtool(sockdir: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed: sudo apt-get install --no-install-recommends prometheus"
        )
    from epwatch.agent.metrics import serve_metrics
    from tests.helpers import scrape

    agent = make_agent(free_port(), f"{sockdir}/a.sock")
    agent.start()
    server = serve_metrics(agent, "127.0.0.1", 0)
    port = server.port
    try:
        with FrameSender(f"{sockdir}/a.sock") as s:
            s.send(encode_frame(b"\xff"))
        wait_for(lambda: agent.receiver_counters.rejected_by_reason() == {"garbage": 1})
        text = scrape(port)
        out = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert value(text, "epwatch_agent_frames_rejected_total", node="n0", reason="garbage") == 1
        assert value(text, "epwatch_agent_collector_connected", node="n0") == 0
    finally:
        server.stop()
        agent.stop(drain_timeout=0)


def _wakeups(names: tuple[str, ...]) -> dict[str, int]:
    """Voluntary context switches (wake-ups after a wait) of the named threads."""
    out = {}
    for t in threading.enumerate():
        if t.name in names and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/status") as fh:
                line = next(x for x in fh if x.startswith("voluntary_ctxt_switches"))
            out[t.name] = int(line.split()[1])
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_agent_threads_sleep_until_there_is_work(sockdir: str) -> None:
    """No hook traffic and nothing to ship: the flush, accept and ack loops do not poll,
    and the first frame is still shipped one flush interval later."""
    port = free_port()
    svc = start_collector(port)
    path = f"{sockdir}/a.sock"
    agent = make_agent(port, path)
    agent.start()
    try:
        wait_for(lambda: agent.shipper.connected)
        time.sleep(0.3)
        names = ("flush", "receiver", "shipper")
        before = _wakeups(names)
        time.sleep(1.0)  # flush interval 0.05 s: a polling loop would wake 20 times
        after = _wakeups(names)
        assert set(after) == set(names)
        woken = {n: after[n] - before[n] for n in names}
        assert max(woken.values()) <= 2, woken  # a polling loop would wake 20 times
        with FrameSender(path) as s:
            s.send(hook_frame("g", 16, make_records(5, 16)))
        wait_for(lambda: records_total(svc) == 5)
        started = time.monotonic()
    finally:
        agent.stop()
        svc.stop(grace_s=0.2)
    assert time.monotonic() - started < 1.5


def test_receiver_works_with_descriptors_above_1023(sockdir: str) -> None:
    """The samplers keep hundreds of files open; the accept loop must not use select()."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        port = free_port()
        svc = start_collector(port)
        path = f"{sockdir}/a.sock"
        agent = make_agent(port, path)
        assert agent.receiver._listener.fileno() > 1023
        agent.start()
        try:
            with FrameSender(path) as s:
                s.send(hook_frame("g", 16, make_records(5, 16)))
            wait_for(lambda: agent.receiver_counters.records_received == 5)
        finally:
            agent.stop(drain_timeout=0)
            svc.stop(grace_s=0.2)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
