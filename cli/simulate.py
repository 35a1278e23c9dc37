"""``epwatch simulate``: a scenario through the estimators, with its diagnosis."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epwatch.collector.estimators import EstimatorConfig, GroupReport
from epwatch.collector.estimators.text import format_report
from epwatch.collector.offline import OfflineRun, diagnosis_json, post_mortem_config
from epwatch.schema import IntervalColumns
from epwatch.simulator.counters import CounterStream
from epwatch.simulator.engine import Simulation
from epwatch.simulator.node_samples import NodeSampleModel
from epwatch.simulator.scenario import Scenario, ScenarioError, load_scenario

EXAMPLE = """\
scenario file (TOML), every key optional but the fault's kind:
  seed = 1
  steps = 400
  [cluster]  ranks = 64, ranks_per_node = 8, ep_group = "ep0"
  [model]    layers = 61, experts = 256, topk = 8, hidden = 7168, bytes_per_elem = 1
  [workload] batch_tokens = 16384, batch_jitter = 0.3 (the step's batch, shared),
             rank_batch_jitter = 0.05 (each rank's own data-parallel share),
             routing = "uniform" | "zipf", zipf_s = 1.0 (0 = uniform)
  [network]  latency_us = 80, bandwidth_gbps = 40, noise_cv = 0.05, link_noise_cv = 0.01,
             spike_prob = 0 (2-5x slower collectives)
  [compute]  ns_per_token = 40, noise_cv = 0.05, shared_cv = 0 (one factor per step for
             every rank), drift_cv = 0, drift_steps = 300 (slow per-rank wander),
             spike_prob = 0 (per step, layer, rank), rank_spike_prob = 0 (a whole
             rank-step), spike_min = 2, spike_max = 5
  [attention] fixed_us = 20, ns_per_token = 100, noise_cv = 0.05 (before each dispatch,
             per token of the rank's own batch; a slow GPU slows it too)
  [probe]    peer_sample_every = 10, mode = "records" | "counters" (decode under CUDA
             graphs: only the kernels' cumulative counters, no per-collective records),
             counter_interval_steps = 5 (steps between counter reads)
  [[faults]] kind = "slow_gpu" | "slow_nic" | "hot_expert" | "batch_imbalance" | "hang"
             | "slow_link", rank, start_step, factor (slow_gpu, slow_nic, slow_link,
             batch_imbalance: the rank's batch), expert and share (hot_expert), layer
             (hang), peer (slow_link: the link's other end)
examples are in simulator/scenarios/.
"""


@dataclass
class Truth:
    """What the simulator knows and the estimators must recover (for tests)."""

    gamma: list[np.ndarray] = field(default_factory=list)  # [S, L] per chunk
    latency_s: float = 0.0
    bandwidth_Bps: float = 0.0


def run_scenario(
    scenario: Scenario,
    config: EstimatorConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[GroupReport, Truth]:
    """Simulate, feed the collector's estimators chunk by chunk (with the nodes' GPU
    and NIC samples about once a chunk, as agents would ship them), and return the
    run's report with the simulator's ground truth."""
    sim = Simulation(scenario)
    P = scenario.cluster.ranks
    run = OfflineRun(
        scenario.cluster.ep_group,
        P,
        post_mortem_config(scenario.steps, config),
        nodes={r: scenario.node_of(r) for r in range(P)},
    )
    truth = Truth(latency_s=sim.latency_s, bandwidth_Bps=sim.bandwidth_Bps)
    nodes = NodeSampleModel(scenario)
    counters = CounterStream(sim) if scenario.probe.mode == "counters" else None
    for chunk in sim.chunks():
        if counters is None:
            run.ingest(sim.records(chunk), peer_rows=chunk.peer_rows, entered=chunk.entered)
        else:
            feed_counter_reads(run, scenario, counters.intervals(chunk))
        end = float(chunk.exit_s[chunk.valid].max())
        for node, points in nodes.advance(int(chunk.steps[-1]), end - run.source_time_s).items():
            run.node_sample(node, points, end)
        truth.gamma.append(sim.true_gamma(chunk)[chunk.valid.all(axis=(2, 3))])
        if progress:
            progress(int(chunk.steps[-1]) + 1, sim.last_step + 1)
    if counters is not None and sim.hang is not None:
        # The probes outlive the hang: counters that no longer move, for long enough
        # that the estimators can call it one.
        stall = 3 * run.estimator.cfg.hang_after_s
        feed_counter_reads(run, scenario, counters.frozen(stall))
    return run.finish(), truth


def feed_counter_reads(
    run: OfflineRun,
    scenario: Scenario,
    reads: Iterable[tuple[float, IntervalColumns]],
    after_read: Callable[[float, IntervalColumns], None] | None = None,
) -> None:
    """Interval records as the nodes' agents would ship them (one batch per node, at
    the time they were read), each read followed by one counter-mode pass (and
    ``after_read``, for a caller that watches the flags as they open)."""
    per_node = scenario.cluster.ranks_per_node
    for time_s, rows in reads:
        node_of = rows.rank // per_node
        for node in np.unique(node_of).tolist():
            mine = rows.take(np.flatnonzero(node_of == node))
            run.ingest_intervals(mine, scenario.node_of(node * per_node), time_s)
        run.update_counters()
        if after_read is not None:
            after_read(time_s, rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLE
    p.add_argument("scenario", type=Path, help="scenario file (TOML)")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="also write the run as the collector's --record would (records and per-peer "
        "rows), for `epwatch replay` and `epwatch report`",
    )


def _progress(done: int, total: int) -> None:
    print(f"\rsimulating step {done}/{total}", end="" if done < total else "\n", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as err:
        print(f"epwatch simulate: {err}", file=sys.stderr)
        return 2
    show = not args.quiet and sys.stderr.isatty()
    if args.record is not None and scenario.probe.mode == "counters":
        print(
            "epwatch simulate: --record writes per-collective records, and a counter-mode "
            "scenario has none (the collector does not record interval records either)",
            file=sys.stderr,
        )
        return 2
    if args.record is not None:
        from epwatch.cli.simrecord import record_scenario
        from epwatch.collector.recorder import RecorderError

        try:
            written = record_scenario(scenario, args.record)
        except RecorderError as err:
            print(f"epwatch simulate: {err}", file=sys.stderr)
            return 2
        print(f"recorded {written:,} records in {args.record}", file=sys.stderr)
    report, _ = run_scenario(scenario, progress=_progress if show else None)
    if args.json:
        print(json.dumps(diagnosis_json([report])))
    else:
        print(format_report(report))
    return 0
