"""A real epwatch deployment around four gloo ranks of the mini-MoE, on 127.0.0.1.

``epwatch collector`` and ``epwatch agent`` run as subprocesses exactly as an operator
would start them; four ``tests.moe_worker`` ranks play a plan of scenarios through the
hooks; a poller scrapes the collector's /metrics four times a second and keeps, per
straggler flag, every scrape it was seen in (so episodes can be counted as a
Prometheus would see them). Used by the live tests and by ``tests/gloo_recordings.py``,
which records the regression data in ``tests/data/recordings``. ``worker`` may name
another module with the same command line (``tests.fairscale_worker``).

    with GlooCluster(plan, workdir, record=True) as cluster:
        cluster.wait_for_line("DONE moe-slow", 200)
    cluster.recordings  # the collector's Parquet files, closed
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from epwatch.cliargs import free_port
from tests.helpers import samples, scrape, wait_for
from tests.moe_worker import Scenario

ROOT = Path(__file__).resolve().parents[1]
P = 4


@dataclass
class Observed:
    """What the poller saw on /metrics, with monotonic times."""

    scrapes: list[float] = field(default_factory=list)
    flags: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    node: dict[tuple[str, int], str] = field(default_factory=dict)
    last_step: dict[str, float] = field(default_factory=dict)
    errors: int = 0

    def first_seen(self, key: tuple[str, int, str]) -> float | None:
        seen = self.flags.get(key)
        return seen[0] if seen else None

    def episodes(self, key: tuple[str, int, str]) -> int:
        """Runs of consecutive scrapes that showed the flag."""
        seen = set(self.flags.get(key, ()))
        runs, inside = 0, False
        for t in self.scrapes:
            if t in seen and not inside:
                runs += 1
            inside = t in seen
        return runs

    def groups_flags(self, group: str) -> set[tuple[int, str]]:
        return {(rank, cause) for (g, rank, cause) in self.flags if g == group}


class GlooCluster:
    """Collector, agent and four mini-MoE ranks; a context manager."""

    def __init__(
        self,
        plan: Sequence[Scenario],
        workdir: Path,
        record: bool = False,
        collector_args: Sequence[str] = (),
        worker: str = "tests.moe_worker",
    ) -> None:
        self.plan = list(plan)
        self.worker = worker
        self.workdir = Path(workdir)
        self.record_dir = self.workdir / "recordings" if record else None
        self.collector_args = list(collector_args)
        self.grpc_port, self.metrics_port, self.dist_port = free_port(), free_port(), free_port()
        self.socket = str(self.workdir / "agent.sock")
        self.observed = Observed()
        self.events: dict[str, float] = {}  # "START g", "ONSET g", "DONE g", "HANG g" -> time
        self.onset_step: dict[str, int] = {}
        self.lines: list[str] = []
        self.collector: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self._env.pop("EPWATCH_DISABLE", None)

    # -- processes -----------------------------------------------------------------------
    def _collector_cmd(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "epwatch.cli", "collector",
            "--grpc-listen", f"127.0.0.1:{self.grpc_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--update-interval", "0.5", "--log-level", "INFO", *self.collector_args,
        ]  # fmt: skip
        if self.record_dir is not None:
            cmd += ["--record", str(self.record_dir)]
        return cmd

    def _agent_cmd(self) -> list[str]:
        return [
            sys.executable, "-m", "epwatch.cli", "agent",
            "--collector", f"127.0.0.1:{self.grpc_port}", "--node", "node-a",
            "--socket", self.socket, "--flush-interval", "0.1", "--log-level", "WARNING",
            "--no-sampler.nvidia", "--no-sampler.amd", "--no-sampler.netdev",
            "--no-sampler.infiniband",
        ]  # fmt: skip

    def _worker_cmd(self, rank: int) -> list[str]:
        return [
            sys.executable, "-m", self.worker, "--rank", str(rank),
            "--world-size", str(P), "--port", str(self.dist_port), "--socket", self.socket,
            "--plan", json.dumps([asdict(s) for s in self.plan]),
        ]  # fmt: skip

    def __enter__(self) -> GlooCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        log = (self.workdir / "collector.log").open("w")
        self.collector = subprocess.Popen(
            self._collector_cmd(), cwd=ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append(self.collector)
        self.procs.append(subprocess.Popen(self._agent_cmd(), cwd=ROOT, env=self._env))
        wait_for(lambda: os.path.exists(self.socket), 60, "the agent's socket")
        wait_for(self._answers, 60, "the collector's /metrics")
        threading.Thread(target=self._poll, daemon=True).start()
        for rank in range(P):
            worker = subprocess.Popen(
                self._worker_cmd(rank), cwd=ROOT, env=self._env, stdout=subprocess.PIPE, text=True
            )
            self.workers.append(worker)
            self.procs.append(worker)
            threading.Thread(target=self._read_lines, args=(worker,), daemon=True).start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Workers and agent first, then the collector with SIGINT: it flushes and
        closes its recording."""
        self._stop.set()
        for p in self.procs:
            if p is not self.collector and p.poll() is None:
                p.kill()
        if self.collector is not None and self.collector.poll() is None:
            self.collector.send_signal(signal.SIGINT)
            try:
                self.collector.wait(30)
            except subprocess.TimeoutExpired:
                self.collector.kill()
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(10)
            if p.stdout is not None:
                p.stdout.close()

    # -- observing -----------------------------------------------------------------------
    def _answers(self) -> bool:
        try:
            scrape(self.metrics_port, timeout=1.0)
            return True
        except Exception:
            return False

    def _poll(self) -> None:
        seen = self.observed
        while not self._stop.wait(0.25):
            try:
                text = scrape(self.metrics_port, timeout=2.0)
            except Exception:
                seen.errors += 1
                continue
            now = time.monotonic()
            seen.scrapes.append(now)
            for labels, _ in samples(text, "epwatch_straggler").items():
                d = dict(labels)
                key = (d["ep_group"], int(d["rank"]), d["cause"])
                seen.flags.setdefault(key, []).append(now)
                seen.node[(d["ep_group"], int(d["rank"]))] = d["node"]
            for labels, v in samples(text, "epwatch_group_last_step").items():
                seen.last_step[dict(labels)["ep_group"]] = v

    def _read_lines(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by stop()
            for line in proc.stdout:
                line = line.strip()
                self.lines.append(line)
                parts = line.split()
                if parts and parts[0] in ("START", "DONE", "HANG", "ONSET"):
                    self.events.setdefault(f"{parts[0]} {parts[1]}", time.monotonic())
                if parts and parts[0] == "ONSET":
                    self.onset_step.setdefault(parts[1], int(parts[2]))

    def event(self, prefix: str) -> float | None:
        """When the first worker line starting ``prefix`` came (``START <group>``,
        ``ONSET <group>``, ``DONE <group>``, ``HANG`` + its step)."""
        times = [t for name, t in list(self.events.items()) if name.startswith(prefix)]
        return min(times) if times else None

    def wait_for_event(self, prefix: str, timeout: float) -> float:
        """:meth:`event`, waiting for it; fails at once if a worker exits."""
        wait_for(
            lambda: self.event(prefix) is not None
            or any(w.poll() is not None for w in self.workers),
            timeout,
            prefix,
            detail=lambda: "workers said:\n" + "\n".join(self.lines[-12:]),
            interval=0.1,
        )
        found = self.event(prefix)
        if found is None:
            codes = [w.poll() for w in self.workers]
            raise AssertionError(f"a worker exited early {codes}: " + "\n".join(self.lines[-12:]))
        return found

    @property
    def collector_log(self) -> str:
        return (self.workdir / "collector.log").read_text()

    @property
    def recordings(self) -> list[Path]:
        return sorted(self.record_dir.glob("*.parquet")) if self.record_dir else []
