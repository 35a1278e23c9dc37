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
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import disable_created_metrics

from epwatch.cli import promstack
from epwatch.cli.demo_cluster import Agents, Ranks, SimulatedSamplers
from epwatch.cli.demo_view import HEADER, AlertWatch, table_row
from epwatch.cliargs import parse_hostport, stop_on_signals
from epwatch.collector.estimators.text import format_report
from epwatch.collector.offline import diagnosis_json
from epwatch.collector.recorder import RecorderConfig, RecorderError
from epwatch.collector.service import CollectorConfig, CollectorService
from epwatch.simulator.scenario import Scenario, ScenarioError, load_scenario


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
        "--record",
        type=Path,
        metavar="DIR",
        help="record what the collector accepts into DIR, as `epwatch collector --record`",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="with --record: end by writing this run's HTML report (`epwatch report`) to "
        "DIR/report.html",
    )
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
            # Equal data-parallel batches: the demo's story is the GPU and the expert.
            "workload": {"rank_batch_jitter": 0.0},
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
            "start_step": int(min(10.0, duration / 4) * sps),
        },
        {
            "kind": "hot_expert",
            "expert": hot_rank * (experts // p),
            "share": 0.06,
            "start_step": int(min(20.0, duration / 2) * sps),
        },
    ]


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


def write_report(directory: Path, since_ns: int) -> None:
    """This run's part of the recording as an HTML report in the same folder."""
    from epwatch.cli.report import INSTALL, make_report
    from epwatch.collector.replay import ReplayError

    out = directory / "report.html"
    skipped: list[tuple[Path, str]] = []
    try:
        make_report([directory], out=out, start_ns=since_ns, skipped=skipped)
    except (ReplayError, OSError) as err:
        print(f"epwatch demo: no report: {err}", file=sys.stderr)
        return
    except ImportError:
        print(f"epwatch demo: no report: {INSTALL}", file=sys.stderr)
        return
    finally:
        for path, why in skipped:
            print(f"epwatch demo: report: skipped {path}: {why}", file=sys.stderr)
    print(f"report: {out}")


def run(args: argparse.Namespace) -> int:
    if args.report and args.record is None:
        print("epwatch demo: --report needs --record DIR (where the report goes)", file=sys.stderr)
        return 2
    try:
        scenario = demo_scenario(args)
    except ScenarioError as err:
        print(f"epwatch demo: {err}", file=sys.stderr)
        return 2
    stop = stop_on_signals()
    disable_created_metrics()  # as `epwatch collector`: no *_created twin per counter
    started_ns = time.time_ns()
    try:
        service = CollectorService(
            CollectorConfig(
                grpc_listen="127.0.0.1:0",
                metrics_listen=args.metrics_listen,
                record=RecorderConfig(str(args.record)) if args.record else None,
            )
        )
    except RecorderError as err:  # an unwritable --record folder
        print(f"epwatch demo: {err}", file=sys.stderr)
        return 2
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
    service.analyzer.run_once()
    reports = service.diagnosis()
    service.stop(grace_s=0.5)
    print()
    for report in reports:
        print(format_report(report))
    if args.report:
        write_report(args.record, started_ns)
    if args.json:
        print(json.dumps(diagnosis_json(reports)))
    return 0
