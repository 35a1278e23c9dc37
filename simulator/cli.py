"""``epwatch simulate``: a scenario through the estimators, with its diagnosis."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from collector.estimators.text import format_report
from simulator.run import run_scenario
from simulator.scenario import ScenarioError, load_scenario

EXAMPLE = """\
scenario file (TOML), every key optional but the fault's kind:
  seed = 1
  steps = 400
  [cluster]  ranks = 64, ranks_per_node = 8, ep_group = "ep0"
  [model]    layers = 61, experts = 256, topk = 8, hidden = 7168, bytes_per_elem = 1
  [workload] batch_tokens = 16384, batch_jitter = 0.3, routing = "uniform" | "zipf", zipf_s = 1.0
  [network]  latency_us = 80, bandwidth_gbps = 40, noise_cv = 0.05
  [compute]  ns_per_token = 40, noise_cv = 0.05
  [probe]    peer_sample_every = 10
  [[faults]] kind = "slow_gpu" | "slow_nic" | "hot_expert" | "hang" | "slow_link",
             rank, start_step, factor (slow_gpu, slow_nic, slow_link), expert and share
             (hot_expert), layer (hang), peer (slow_link: the link's other end)
examples are in simulator/scenarios/.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLE
    p.add_argument("scenario", type=Path, help="scenario file (TOML)")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _progress(done: int, total: int) -> None:
    print(f"\rsimulating step {done}/{total}", end="" if done < total else "\n", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as err:
        print(f"epwatch simulate: {err}", file=sys.stderr)
        return 2
    show = not args.quiet and sys.stderr.isatty()
    report, _ = run_scenario(scenario, progress=_progress if show else None)
    if args.json:
        print(json.dumps({"groups": [report.to_json()]}))
    else:
        print(format_report(report))
    return 0
