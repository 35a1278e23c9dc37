"""Hooks on real gloo collectives, through the real ``epwatch agent`` and collector.

Four ranks (``tests/moe_worker.py``) run a miniature MoE model on 127.0.0.1; one launch
plays four scenarios in order, each as its own EP group, while a poller scrapes the
collector's /metrics: a clean run, a rank with 1.3x slower expert compute, a rank that
hosts a hot expert, and a rank that stops before a dispatch. Everything runs as
subprocesses so the collector's diagnosis comes only from what the hooks sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from epwatch.cliargs import free_port
from tests.helpers import samples, scrape, wait_for
from tests.moe_worker import Scenario

ROOT = Path(__file__).resolve().parents[1]
P = 4
STEPS = 160
SLOW_RANK, HOT_RANK, HANG_RANK, HANG_STEP = 2, 1, 3, 30

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@dataclass
class Observed:
    """Everything the poller saw on /metrics, with when it first saw it."""

    flags: dict[tuple[str, int, str], float] = field(default_factory=dict)
    node: dict[tuple[str, int], str] = field(default_factory=dict)
    last_step: dict[str, float] = field(default_factory=dict)
    scrapes: int = 0
    errors: int = 0


@dataclass
class Cluster:
    metrics_port: int
    observed: Observed
    events: dict[str, float]
    worker_lines: list[str]
    workers: list[subprocess.Popen]


def _poll(port: int, seen: Observed, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        try:
            text = scrape(port, timeout=2.0)
        except Exception:
            seen.errors += 1
            continue
        seen.scrapes += 1
        now = time.monotonic()
        hung = samples(text, "epwatch_rank_stalled_seconds")  # a hang's own metric
        for labels in [*samples(text, "epwatch_straggler"), *hung]:
            d = dict(labels)
            key = (d["ep_group"], int(d["rank"]), d.get("cause", "hang"))
            seen.flags.setdefault(key, now)
            seen.node[(d["ep_group"], int(d["rank"]))] = d["node"]
        for labels, v in samples(text, "epwatch_group_last_step").items():
            seen.last_step[dict(labels)["ep_group"]] = v


def _read_lines(proc: subprocess.Popen, sink: list[str], events: dict[str, float]) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):  # closed by _stop at teardown
        for line in proc.stdout:
            line = line.strip()
            sink.append(line)
            parts = line.split()
            if parts and parts[0] in ("START", "DONE", "HANG"):
                events.setdefault(f"{parts[0]} {parts[1]}", time.monotonic())


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(Exception):
            p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def _collector(grpc_port: int, metrics_port: int) -> list[str]:
    return [
        sys.executable, "-m", "epwatch.cli", "collector",
        "--grpc-listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--update-interval", "0.5", "--log-level", "WARNING",
    ]  # fmt: skip


def _agent(grpc_port: int, sock: str) -> list[str]:
    return [
        sys.executable, "-m", "epwatch.cli", "agent",
        "--collector", f"127.0.0.1:{grpc_port}", "--node", "node-a", "--socket", sock,
        "--flush-interval", "0.1", "--log-level", "WARNING",
        "--no-sampler.nvidia", "--no-sampler.amd", "--no-sampler.netdev",
        "--no-sampler.infiniband",
    ]  # fmt: skip


def _worker(rank: int, dist_port: int, sock: str, plan: list[Scenario]) -> list[str]:
    return [
        sys.executable, "-m", "tests.moe_worker", "--rank", str(rank), "--world-size", str(P),
        "--port", str(dist_port), "--socket", sock,
        "--plan", json.dumps([asdict(s) for s in plan]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    plan = [
        Scenario(group="moe-clean", steps=STEPS),
        Scenario(group="moe-slow", steps=STEPS, slow_rank=SLOW_RANK, slow_factor=1.3),
        Scenario(group="moe-hot", steps=STEPS, hot_rank=HOT_RANK),
        Scenario(group="moe-hang", steps=HANG_STEP + 10, hang_rank=HANG_RANK, hang_step=HANG_STEP),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("EPWATCH_DISABLE", None)
    grpc_port, metrics_port, dist_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    seen = Observed()
    events: dict[str, float] = {}
    lines: list[str] = []

    def hang_started() -> bool:
        return any(e.startswith("HANG") for e in events)

    with tempfile.TemporaryDirectory(prefix="epw-") as tmp:
        sock = os.path.join(tmp, "agent.sock")
        try:
            procs.append(subprocess.Popen(_collector(grpc_port, metrics_port), cwd=ROOT, env=env))
            procs.append(subprocess.Popen(_agent(grpc_port, sock), cwd=ROOT, env=env))
            wait_for(lambda: os.path.exists(sock), 60, "the agent's socket")
            wait_for(lambda: _scrapes(metrics_port), 60, "the collector's /metrics")
            threading.Thread(target=_poll, args=(metrics_port, seen, stop), daemon=True).start()
            workers = [
                subprocess.Popen(
                    _worker(r, dist_port, sock, plan),
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for r in range(P)
            ]
            procs += workers
            for w in workers:
                threading.Thread(target=_read_lines, args=(w, lines, events), daemon=True).start()
            # The hang is the last act: wait for it, then for its diagnosis (or give up).
            wait_for(
                lambda: hang_started() or any(w.poll() is not None for w in workers),
                150,
                "the hang to start",
                detail=lambda: "workers said:\n" + "\n".join(lines[-12:]),
                interval=0.1,
            )
            if not hang_started():
                codes = [w.poll() for w in workers]
                raise AssertionError(f"a worker exited early {codes}: " + "\n".join(lines[-12:]))
            events["hang_started"] = min(t for e, t in events.items() if e.startswith("HANG"))
            with contextlib.suppress(AssertionError):
                wait_for(lambda: ("moe-hang", HANG_RANK, "hang") in seen.flags, 20, "hang flag")
            yield Cluster(metrics_port, seen, events, lines, workers)
        finally:
            stop.set()
            _stop(procs)


def _scrapes(port: int) -> bool:
    try:
        scrape(port, timeout=1.0)
        return True
    except Exception:
        return False


def _flags(c: Cluster, group: str) -> set[tuple[int, str]]:
    return {(rank, cause) for (g, rank, cause) in c.observed.flags if g == group}


def test_every_scenario_ran_to_the_collector(cluster: Cluster) -> None:
    last = cluster.observed.last_step
    for group in ("moe-clean", "moe-slow", "moe-hot"):
        assert last.get(group, -1) >= STEPS - 20, f"{group}: {last}"
    assert cluster.observed.errors < cluster.observed.scrapes


def test_clean_run_flags_nothing(cluster: Cluster) -> None:
    assert _flags(cluster, "moe-clean") == set()


def test_slow_expert_compute_is_flagged_compute_on_that_rank(cluster: Cluster) -> None:
    assert _flags(cluster, "moe-slow") == {(SLOW_RANK, "compute")}
    assert cluster.observed.node[("moe-slow", SLOW_RANK)] == "node-a"


def test_hot_expert_is_routing_not_compute(cluster: Cluster) -> None:
    assert _flags(cluster, "moe-hot") == {(HOT_RANK, "routing")}


def test_rank_that_never_enters_is_flagged_hang_within_10s(cluster: Cluster) -> None:
    key = ("moe-hang", HANG_RANK, "hang")
    assert key in cluster.observed.flags, f"no hang flag; saw {cluster.observed.flags}"
    delay = cluster.observed.flags[key] - cluster.events["hang_started"]
    assert delay <= 10.0, f"hang reported after {delay:.1f} s"
    assert _flags(cluster, "moe-hang") == {(HANG_RANK, "hang")}
