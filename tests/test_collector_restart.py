"""Real processes: SIGKILL the collector under load and start it again.

The agents reconnect by themselves; every record an agent accepted is either
acknowledged by the first collector before it died, or counted by the second one
(exactly, via ``epwatch_ingest_records_total``), or counted as dropped beyond the
spool bound: accepted = delivered + dropped, nothing silently lost. Also: SIGTERM
shuts both daemons down cleanly and the recorder's Parquet holds what was ingested.
"""

from __future__ import annotations

import functools
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epwatch.cliargs import free_port
from epwatch.frames import FrameSender, hook_frame
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import load_scenario
from tests import helpers
from tests.helpers import Proc, scrape, value

pytestmark = pytest.mark.timeout(120)

NO_SAMPLERS = [f"--no-sampler.{n}" for n in ("nvidia", "amd", "netdev", "infiniband")]
SCENARIO = {
    "seed": 5,
    "steps": 1_000_000,
    "cluster": {"ranks": 16, "ranks_per_node": 8, "ep_group": "ep0"},
    "model": {"layers": 4},
}


# Processes start and reconnect here: more patience than in-process tests need.
wait_for = functools.partial(helpers.wait_for, timeout=20.0)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="epw"))  # short: Unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL, timeout=5)


def collector_args(grpc_port: int, metrics_port: int, *extra: str) -> list[str]:
    return [
        "collector",
        f"--grpc-listen=127.0.0.1:{grpc_port}",
        f"--metrics-listen=127.0.0.1:{metrics_port}",
        "--update-interval=0.5",
        "--log-level=WARNING",
        *extra,
    ]


def agent_args(grpc_port: int, node: str, sock: Path, metrics_port: int, spool: int) -> list[str]:
    return [
        "agent",
        f"--collector=127.0.0.1:{grpc_port}",
        f"--node={node}",
        f"--socket={sock}",
        f"--metrics-listen=127.0.0.1:{metrics_port}",
        f"--spool-records={spool}",
        "--batch-records=4096",
        "--flush-interval=0.05",
        "--backoff-max=0.3",
        "--log-level=WARNING",
        *NO_SAMPLERS,
    ]


class Load:
    """Simulated ranks: one socket per rank, a chunk of steps every ``period_s``."""

    def __init__(self, sockets: list[Path], period_s: float = 0.05) -> None:
        scenario = load_scenario(SCENARIO)
        self.sim = Simulation(scenario)
        self.per_node = scenario.cluster.ranks_per_node
        self.senders = [[FrameSender(str(sock)) for _ in range(self.per_node)] for sock in sockets]
        self.sent = [0] * len(sockets)
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for node in self.senders:
            for s in node:
                s.close()

    def _run(self) -> None:
        for chunk in self.sim.chunks():
            if self._stop.is_set():
                return
            records = self.sim.records(chunk)
            for node, senders in enumerate(self.senders):
                for local, sender in enumerate(senders):
                    mine = records.take(records.rank == node * self.per_node + local)
                    sender.send(hook_frame("ep0", 16, mine))
                    self.sent[node] += len(mine)
            time.sleep(self.period_s)


def agent_metric(port: int, name: str) -> float:
    v = value(scrape(port), name)
    return 0.0 if v is None else v


def test_sigkill_restart_loses_nothing_silently(workdir: Path, procs: list[Proc]) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    agent_ports = [free_port(), free_port()]
    sockets = [workdir / "a0.sock", workdir / "a1.sock"]
    spools = [1_000_000, 3_000]  # node-1's bound is far below an outage's worth
    first = Proc(workdir, "collector-1", *collector_args(grpc_port, metrics_port))
    procs.append(first)
    for i in range(2):
        procs.append(
            Proc(
                workdir,
                f"agent-{i}",
                *agent_args(grpc_port, f"node-{i}", sockets[i], agent_ports[i], spools[i]),
            )
        )
    try:
        wait_for(
            what="agents connected",
            cond=lambda: value(scrape(metrics_port), "epwatch_agents_connected") == 2
        )
        load = Load(sockets)
        load.start()
        wait_for(
            what="records flowing",
            cond=lambda: (
                (value(scrape(metrics_port), "epwatch_ingest_records_total", ep_group="ep0") or 0)
                > 20_000
            ),
        )
        first.stop(signal.SIGKILL)
        for port in agent_ports:
            wait_for(
            what="agent disconnect",
            cond=lambda p=port: agent_metric(p, "epwatch_agent_collector_connected") == 0,
            )
        acked_by_first = [
            agent_metric(p, "epwatch_agent_records_delivered_total") for p in agent_ports
        ]
        received_at_kill = [
            agent_metric(p, "epwatch_agent_records_received_total") for p in agent_ports
        ]
        time.sleep(1.5)  # the outage: the load goes on, node-1's spool overflows
        second = Proc(workdir, "collector-2", *collector_args(grpc_port, metrics_port))
        procs.append(second)
        wait_for(
            what="agents reconnected",
            cond=lambda: value(scrape(metrics_port), "epwatch_agents_connected") == 2,
        )
        time.sleep(1.0)
        load.stop()

        def settled(port: int, node: int) -> bool:
            text = scrape(port)
            got = value(text, "epwatch_agent_records_received_total")
            return got == load.sent[node] and value(text, "epwatch_agent_spool_records") == 0

        for node, port in enumerate(agent_ports):
            wait_for(
            what="agent drained",
            cond=lambda p=port, n=node: settled(p, n))
        final = [scrape(p) for p in agent_ports]
        delivered = [value(t, "epwatch_agent_records_delivered_total") for t in final]
        dropped = [value(t, "epwatch_agent_records_dropped_total") for t in final]
        rejected = [value(t, "epwatch_agent_records_rejected_total") for t in final]
        for node in range(2):
            # nothing silently lost: every accepted record is delivered, dropped or refused
            assert load.sent[node] == delivered[node] + dropped[node] + rejected[node]
            assert rejected[node] == 0, "the collector refused records (see its log below)"
            assert received_at_kill[node] < load.sent[node]  # the load went on through the kill
        assert dropped[0] == 0 and dropped[1] > 0
        assert min(acked_by_first) > 0
        counted_by_second = value(
            scrape(metrics_port), "epwatch_ingest_records_total", ep_group="ep0"
        )
        assert counted_by_second == sum(delivered) - sum(acked_by_first)
        wait_for(
            what="drops mirrored",
            cond=lambda: (
                value(scrape(metrics_port), "epwatch_agent_records_dropped_total", node="node-1")
                == dropped[1]
            ),
            timeout=10.0,
        )
    except AssertionError:
        for p in procs:
            print(f"--- {p.name}\n{p.output()}")
        raise


def test_sigterm_is_clean_and_the_recording_holds_what_was_ingested(
    workdir: Path, procs: list[Proc]
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    grpc_port, metrics_port, agent_port = free_port(), free_port(), free_port()
    record_dir = workdir / "rec"
    collector = Proc(
        workdir, "collector", *collector_args(grpc_port, metrics_port, f"--record={record_dir}")
    )
    agent = Proc(
        workdir,
        "agent",
        *agent_args(grpc_port, "node-0", workdir / "a.sock", agent_port, 1_000_000),
    )
    procs.extend([collector, agent])
    wait_for(
            what="agent connected",
            cond=lambda: value(scrape(metrics_port), "epwatch_agents_connected") == 1
    )
    load = Load([workdir / "a.sock"])
    load.start()
    time.sleep(1.0)
    load.stop()
    wait_for(
            what="delivered",
            cond=lambda: (
            value(scrape(metrics_port), "epwatch_ingest_records_total", ep_group="ep0")
            == load.sent[0]
        ),
    )
    assert agent.stop(signal.SIGTERM) == 0, agent.output()
    assert collector.stop(signal.SIGTERM) == 0, collector.output()
    files = sorted(record_dir.glob("*.parquet"))
    assert files and not list(record_dir.glob("*.partial"))
    table = pq.read_table(files)
    assert table.num_rows == load.sent[0]
    assert set(table.column("node").to_pylist()) == {"node-0"}
