"""``epwatch demo``: a simulated EP cluster through the real agents and collector.

One ``epwatch agent`` subprocess per simulated node, a collector (with its real gRPC
server and /metrics) in this process so the diagnosis can be printed at the end, and
simulated ranks that send the simulator's records as hook frames over the agents' Unix
sockets in real time, a few forward passes per second so it stays light on a laptop.
By default a GPU slows down about 10 s in and an expert turns hot later; a table
every second shows what the collector sees, and the diagnosis closes the run. The
simulated nodes' GPU/NIC samples (consistent with the faults) are pushed to the
collector directly, as their agents' samplers would ship them.

With ``--prometheus`` a real Prometheus (and Alertmanager when installed) scrapes the
collector with the shipped alert rules, their ``for:`` shortened to the demo's
seconds, and every alert that starts firing or resolves is printed as it happens.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from prometheus_client import disable_created_metrics

from agent.frames import FrameSender, hook_frame
from collector.service import CollectorConfig, CollectorService
from epwatch import promstack
from epwatch.cliargs import parse_hostport
from epwatch.schema import Entered, PeerRows, RecordColumns
from simulator.engine import Simulation, StepChunk
from simulator.node_samples import NodeSampleModel
from simulator.scenario import Scenario, ScenarioError, load_scenario

AGENT_FLAGS = [f"--no-sampler.{n}" for n in ("nvidia", "amd", "netdev", "infiniband")]


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not (0 <= seconds <= 86400):
        raise argparse.ArgumentTypeError(f"expected 0..86400 seconds, got {value!r}")
    return seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=32, help="EP ranks (default %(default)s)")
    p.add_argument(
        "--ranks-per-node", type=int, default=8, help="ranks per node (default %(default)s)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to run (default %(default)s)",
    )
    p.add_argument(
        "--steps-per-second",
        type=float,
        default=5.0,
        metavar="N",
        help="simulated forward passes per second (default %(default)s)",
    )
    p.add_argument("--layers", type=int, default=61, help="MoE layers (default %(default)s)")
    story = p.add_mutually_exclusive_group()
    story.add_argument(
        "--scenario",
        metavar="FILE",
        help="a scenario TOML (see `epwatch simulate --help`) instead of the default faults",
    )
    story.add_argument(
        "--clean",
        action="store_true",
        help="inject no fault: a healthy cluster, where nothing is flagged and no alert fires",
    )
    p.add_argument(
        "--metrics-listen",
        type=parse_hostport,
        default=("127.0.0.1", 9401),
        metavar="HOST:PORT",
        help="the collector's /metrics (default 127.0.0.1:9401; port 0 picks one)",
    )
    p.add_argument("--json", action="store_true", help="end with the diagnosis as JSON")
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a real Prometheus (and Alertmanager when installed) on 127.0.0.1 with "
        "the rules of dashboards/prometheus/, scraping this collector, and print alerts as "
        "they fire and resolve",
    )
    p.add_argument(
        "--prometheus-for",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="with --prometheus: shorten every alert's `for:` to at most this, so that "
        "alerts fire within the demo (default %(default)g)",
    )
    p.add_argument(
        "--alertmanager-webhook",
        metavar="URL",
        help="with --prometheus: Alertmanager also sends its notifications to this webhook "
        "(a chat bridge, a test's receiver)",
    )


def demo_scenario(args: argparse.Namespace) -> Scenario:
    """The default story: a slow GPU about 10 s in, a hot expert later on (none with
    ``--clean``)."""
    if args.scenario:
        return load_scenario(args.scenario)
    sps, duration, p = args.steps_per_second, args.duration, args.ranks
    steps = int(duration * sps) + 32
    experts = 256 if 256 % p == 0 else p * max(1, 256 // p)
    faults = [] if getattr(args, "clean", False) else _default_faults(args, p, experts)
    return load_scenario(
        {
            "seed": 42,
            "steps": steps,
            "cluster": {"ranks": p, "ranks_per_node": args.ranks_per_node, "ep_group": "demo"},
            "model": {"layers": args.layers, "experts": experts},
            "faults": faults,
        }
    )


def _default_faults(args: argparse.Namespace, p: int, experts: int) -> list[dict[str, Any]]:
    """A GPU of the second node slows down, later an expert of another rank turns hot."""
    sps, duration = args.steps_per_second, args.duration
    slow_rank = min(p - 1, args.ranks_per_node + 5)
    hot_rank = p - 3 if p - 3 != slow_rank else p - 2
    return [
        {
            "kind": "slow_gpu",
            "rank": slow_rank,
            "factor": 1.25,
            "start_step": int(min(10.0, duration / 3) * sps),
        },
        {
            "kind": "hot_expert",
            "expert": hot_rank * (experts // p),
            "share": 0.06,
            "start_step": int(min(20.0, 2 * duration / 3) * sps),
        },
    ]


class Agents:
    """``epwatch agent`` subprocesses, one per simulated node."""

    def __init__(self, nodes: list[str], collector: str, workdir: str) -> None:
        self.sockets = {node: os.path.join(workdir, f"{node}.sock") for node in nodes}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "epwatch.cli",
                    "agent",
                    f"--collector={collector}",
                    f"--node={node}",
                    f"--socket={path}",
                    "--flush-interval=0.1",
                    "--backoff-max=1",
                    "--log-level=WARNING",
                    *AGENT_FLAGS,
                ],
                stdout=subprocess.DEVNULL,
            )
            for node, path in self.sockets.items()
        ]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for path in self.sockets.values():
            while True:
                if any(p.poll() is not None for p in self.procs):
                    raise RuntimeError("an agent exited during start-up")
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"agent socket {path} did not come up") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class Ranks:
    """Simulated ranks: each has its own hook connection and sends its records of a
    step as one frame, at ``steps_per_second`` forward passes per second."""

    def __init__(self, scenario: Scenario, sockets: dict[str, str], sps: float) -> None:
        self.sim = Simulation(scenario)
        self.scenario = scenario
        self.P = scenario.cluster.ranks
        self.group = scenario.cluster.ep_group
        self.senders = [FrameSender(sockets[scenario.node_of(r)]) for r in range(self.P)]
        self.sps = sps
        self.sent = 0
        self.step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ranks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.senders:
            s.close()

    def _run(self) -> None:
        t0 = time.monotonic()
        for chunk in self.sim.chunks():
            records = self.sim.records(chunk)
            order = np.lexsort((records.rank, records.step))
            records = records.take(order)
            first = int(chunk.steps[0])
            key = (records.step - first) * self.P + records.rank
            bounds = np.searchsorted(key, np.arange(len(chunk.steps) * self.P + 1))
            for i, step in enumerate(chunk.steps.tolist()):
                delay = t0 + step / self.sps - time.monotonic()
                if self._stop.wait(max(0.0, delay)):
                    return
                last = i == len(chunk.steps) - 1
                for rank in range(self.P):
                    j = i * self.P + rank
                    mine = records.take(slice(int(bounds[j]), int(bounds[j + 1])))
                    self._send(rank, mine, chunk, step, last)
                self.step = step

    def _send(
        self, rank: int, records: RecordColumns, chunk: StepChunk, step: int, last: bool
    ) -> None:
        rows = chunk.peer_rows
        sel = (rows.rank == rank) & (rows.step == step)
        peer = None
        if sel.any():
            peer = PeerRows(
                rank=rows.rank[sel],
                step=rows.step[sel],
                layer=rows.layer[sel],
                phase=rows.phase[sel],
                wait_s=rows.wait_s[sel],
                send_bytes=rows.send_bytes[sel],
            )
        entered = None
        if last:  # heartbeat: where the rank is at the end of the chunk
            e = chunk.entered
            at = e.rank == rank
            entered = Entered(
                rank=e.rank[at], step=e.step[at], layer=e.layer[at], phase=e.phase[at]
            )
        frame = hook_frame(self.group, self.P, records, peer, entered, pid=100_000 + rank)
        try:
            self.senders[rank].send(frame)
        except OSError:
            self._stop.set()
            return
        self.sent += len(records)


class SimulatedSamplers:
    """Node samples consistent with the injected faults (the simulated nodes have no
    GPUs or NICs of their own), pushed to the collector the way an agent ships them:
    sequenced ``NodeSample`` messages over gRPC, one sender per node."""

    def __init__(self, scenario: Scenario, target: str) -> None:
        import grpc

        from protos import epwatch_pb2 as pb

        self._pb = pb
        self.model = NodeSampleModel(scenario)
        self._channel = grpc.insecure_channel(target)
        self._push = self._channel.unary_unary(
            "/epwatch.v1.Collector/Push", response_deserializer=pb.Ack.FromString
        )
        self._seq = 0
        self._last = time.monotonic()

    def push(self, step: int) -> None:
        now = time.monotonic()
        pb = self._pb
        self._seq += 1
        for node, points in self.model.advance(max(step, 0), now - self._last).items():
            msg = pb.AgentMessage(
                agent_id=f"demo-samplers:{node}",
                node=node,
                seq=self._seq,
                sample=pb.NodeSample(
                    time_unix_ns=time.time_ns(), points=[p.to_proto() for p in points]
                ),
            )
            self._push(msg.SerializeToString(), timeout=5)
        self._last = now

    def close(self) -> None:
        self._channel.close()


def _num(v: Any, scale: float = 1.0, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v * scale:{fmt}}"


HEADER = (
    f"{'t':>5} {'step':>5}  {'γ p50':>6} {'γ p99':>6}  {'skew':>5} {'max':>5}  "
    f"{'L disp':>8} {'BW_eff disp':>12}  {'regime':<15}  flagged"
)


def table_row(elapsed: float, rep: dict[str, Any] | None) -> str:
    rep = rep or {}
    gamma, skew = rep.get("gamma") or {}, rep.get("skew") or {}
    disp = rep.get("dispatch") or {}
    flagged = ", ".join(
        f"{s['rank']}@{s['node']} {s['cause']} x{_num(s.get('slowdown'))}"
        for s in rep.get("stragglers") or []
        if s.get("active", True)
    )
    return (
        f"{elapsed:>4.0f}s {rep.get('last_step', -1):>5}  "
        f"{_num(gamma.get('median'), fmt='.3f'):>6} "
        f"{_num(gamma.get('p99'), fmt='.3f'):>6}  {_num(skew.get('median')):>5} "
        f"{_num(skew.get('max')):>5}  {_num(disp.get('latency_s'), 1e6, '.0f') + ' µs':>8} "
        f"{_num(disp.get('bandwidth_Bps'), 1e-9, '.1f') + ' GB/s':>12}  "
        f"{disp.get('regime', '-'):<15}  {flagged or '-'}"
    )


def _final_report(service: CollectorService) -> list[Any]:
    """Every group's report including flags that cleared during the run."""
    service.analyzer.run_once()
    out = []
    for group in service.groups.groups():
        with group.lock:
            try:
                out.append(group.estimator.report(service.analyzer.evidence, include_closed=True))  # type: ignore[call-arg]
            except TypeError:
                out.append(group.estimator.report(service.analyzer.evidence))
    return out


def _ingested(service: CollectorService) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = service.metrics_text()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "epwatch_ingest_records_total"
    )


# Labels every alert of the demo carries; they say nothing about the alert.
_QUIET_LABELS = frozenset({"alertname", "job", "instance"})


def alert_key(alert: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Identity of an alert: its name and labels (as Prometheus and Alertmanager see it)."""
    labels = alert.get("labels") or {}
    return str(labels.get("alertname", "?")), tuple(sorted(labels.items()))


def alert_line(elapsed: float, event: str, alert: dict[str, Any]) -> str:
    """``  16s FIRING   EPStragglerRank{cause="compute", ...}: summary``."""
    labels = alert.get("labels") or {}
    shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k not in _QUIET_LABELS)
    summary = " ".join(str((alert.get("annotations") or {}).get("summary", "")).split())
    line = f"{elapsed:>4.0f}s {event:<8} {labels.get('alertname', '?')}{{{shown}}}"
    return f"{line}: {summary}" if summary and event == "FIRING" else line


class AlertWatch:
    """Polls Prometheus's alerts API and says when an alert starts firing or resolves
    (pending alerts are not news yet: their `for:` has not passed)."""

    def __init__(self, prometheus: promstack.Prometheus) -> None:
        self.prometheus = prometheus
        self.firing: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
        self._lost = False

    def poll(self, elapsed: float) -> list[str]:
        """Lines for what changed since the last poll; none while Prometheus is away."""
        if not self.prometheus.running:
            if self._lost:
                return []
            self._lost = True
            return [f"{elapsed:>4.0f}s Prometheus exited; see {self.prometheus.log_path}"]
        try:
            active = self.prometheus.alerts(timeout=2.0)
        except (OSError, ValueError, promstack.PromStackError):
            return []
        now = {alert_key(a): a for a in active if a.get("state") == "firing"}
        lines = [alert_line(elapsed, "FIRING", a) for k, a in now.items() if k not in self.firing]
        lines += [
            alert_line(elapsed, "RESOLVED", a) for k, a in self.firing.items() if k not in now
        ]
        self.firing = now
        return lines


def start_prometheus(
    args: argparse.Namespace, metrics_host: str, metrics_port: int, workdir: str
) -> promstack.PromStack | None:
    """Prometheus (and Alertmanager when installed) scraping the demo's collector, or
    None with the reason printed: the demo runs on without them."""
    if promstack.prometheus_binary() is None:
        print(
            "epwatch demo: --prometheus: `prometheus` is not installed; running without it.\n"
            "  install it with: apt-get install prometheus prometheus-alertmanager "
            "(Debian/Ubuntu; elsewhere https://prometheus.io/download/)",
            file=sys.stderr,
            flush=True,
        )
        return None
    if not promstack.rule_files():
        print(
            f"epwatch demo: --prometheus: no alert rules in {promstack.RULES_DIR} "
            "(an incomplete installation?); running without Prometheus",
            file=sys.stderr,
            flush=True,
        )
        return None
    with_am = promstack.alertmanager_binary() is not None
    if not with_am:
        print(
            "epwatch demo: `prometheus-alertmanager` is not installed: alerts show in Prometheus"
            " only (apt-get install prometheus-alertmanager)",
            file=sys.stderr,
            flush=True,
        )
    host = "127.0.0.1" if metrics_host in ("", "0.0.0.0", "::") else metrics_host
    target = f"[{host}]:{metrics_port}" if ":" in host else f"{host}:{metrics_port}"
    print("starting Prometheus (its first scrape takes about 5 s) ...", flush=True)
    stack = promstack.PromStack(
        Path(workdir) / "prometheus",
        [target],
        for_duration=promstack.format_duration(args.prometheus_for),
        interval="1s",
        alertmanager=with_am,
        webhook_url=args.alertmanager_webhook,
    )
    try:
        stack.start(timeout=30)
    except promstack.PromStackError as err:
        print(f"epwatch demo: Prometheus did not start: {err}", file=sys.stderr, flush=True)
        return None
    assert stack.prometheus is not None
    url = stack.prometheus.url
    print(
        f"Prometheus: {url} (alerts: {url}/alerts), scraping {target} every 1s with the rules "
        f"of {promstack.RULES_DIR.parent.name}/{promstack.RULES_DIR.name}/, "
        f"for: at most {promstack.format_duration(args.prometheus_for)}",
        flush=True,
    )
    if stack.alertmanager is not None:
        where = f", notifying {args.alertmanager_webhook}" if args.alertmanager_webhook else ""
        print(f"Alertmanager: {stack.alertmanager.url}{where}", flush=True)
    return stack


def run(args: argparse.Namespace) -> int:
    try:
        scenario = demo_scenario(args)
    except ScenarioError as err:
        print(f"epwatch demo: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    disable_created_metrics()  # as `epwatch collector`: no *_created twin per counter
    service = CollectorService(
        CollectorConfig(grpc_listen="127.0.0.1:0", metrics_listen=args.metrics_listen)
    )
    try:
        service.start()
    except OSError as err:
        host, port = args.metrics_listen
        print(f"epwatch demo: cannot serve /metrics on {host}:{port}: {err}", file=sys.stderr)
        print("  pick another with --metrics-listen HOST:PORT (port 0: any)", file=sys.stderr)
        service.stop(grace_s=0)
        return 2
    workdir = tempfile.mkdtemp(prefix="epwatch-demo-")
    agents = Agents(scenario.nodes, f"127.0.0.1:{service.grpc_port}", workdir)
    ranks = None
    stack: promstack.PromStack | None = None
    try:
        agents.wait_ready()
        ranks = Ranks(scenario, agents.sockets, args.steps_per_second)
        faults = ", ".join(
            f"{f.kind} rank {f.rank}" if f.kind != "hot_expert" else f"hot expert {f.expert}"
            for f in scenario.faults
        )
        print(
            f"epwatch demo: {scenario.cluster.ranks} ranks on {len(scenario.nodes)} nodes, "
            f"{scenario.model.layers} layers, {args.steps_per_second:g} steps/s; "
            f"injected: {faults or 'nothing'}\n"
            f"collector /metrics: http://{args.metrics_listen[0]}:{service.metrics_port}/metrics",
            flush=True,
        )
        if args.prometheus:
            stack = start_prometheus(args, args.metrics_listen[0], service.metrics_port, workdir)
        watch = AlertWatch(stack.prometheus) if stack and stack.prometheus else None
        print(HEADER, flush=True)
        samplers = SimulatedSamplers(scenario, f"127.0.0.1:{service.grpc_port}")
        ranks.start()
        t0 = time.monotonic()
        while not stop.wait(1.0):
            samplers.push(ranks.step)
            elapsed = time.monotonic() - t0
            reports = service.reports()
            print(table_row(elapsed, reports[0] if reports else None), flush=True)
            for line in watch.poll(elapsed) if watch else ():
                print(line, flush=True)
            if elapsed >= args.duration or not ranks.running:
                break
        if watch is not None:
            counts = collections.Counter(name for name, _ in watch.firing)
            names = [f"{n} ({c})" if c > 1 else n for n, c in sorted(counts.items())]
            print(f"alerts firing at the end: {', '.join(names) or 'none'}", flush=True)
        if stack is not None:
            stack.stop()  # before the agents go: their leaving is the demo's end, not news
        ranks.stop()
        samplers.close()
        deadline = time.monotonic() + 10
        while _ingested(service) < ranks.sent and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if stack is not None:
            stack.stop()
        if ranks is not None:
            ranks.stop()
        agents.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    reports = _final_report(service)
    service.stop(grace_s=0.5)
    from collector.estimators.text import format_report

    print()
    for report in reports:
        print(format_report(report))
    if args.json:
        print(json.dumps({"groups": [r.to_json() for r in reports]}))
    return 0
