"""The ``epwatch`` command: one subcommand per job, each in its own module.

Subcommand modules are imported only when chosen, so ``epwatch agent`` never pays for
(or needs) the collector's estimators, and ``epwatch model`` starts instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("epwatch.cli.model", "Wide-EP cost model: payload, bytes/s, t_comm, regime."),
    "fit": ("epwatch.cli.fit", "Robust Hockney fit t = L + V/BW_eff of a bytes,seconds CSV."),
    "simulate": (
        "epwatch.cli.simulate",
        "Run a simulated EP cluster scenario through the estimators.",
    ),
    "collector": ("epwatch.cli.collector", "Run the collector: gRPC ingest, estimators, /metrics."),
    "replay": ("epwatch.cli.replay", "Post-mortem diagnosis from the collector's --record files."),
    "report": (
        "epwatch.cli.report",
        "Post-mortem HTML report (figures) or Perfetto trace from --record files.",
    ),
    "agent": (
        "epwatch.cli.agent",
        "Run the node agent: hook records and node samples to the collector.",
    ),
    "demo": ("epwatch.cli.demo", "A simulated EP cluster through the real agent and collector."),
    "status": (
        "epwatch.cli.status",
        "The live diagnosis of a running collector, once or refreshed in place (--watch).",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epwatch",
        description="Find the straggler in a Wide Expert-Parallel MoE cluster and say why.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage or the unknown-command error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"epwatch {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
