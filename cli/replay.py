"""``epwatch replay``: a post-mortem diagnosis from the collector's ``--record`` files.

The recorded hook records go through the same estimators as they did live, in the
order the collector received them, and the diagnosis comes out as ``simulate``'s does.
The sampled per-peer wait rows recorded with them go in too, so compute, routing and
network stragglers are found; recordings hold no heartbeats and no node samples, so a
replay flags no hangs and gives no GPU/NIC evidence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epwatch.collector.estimators.text import format_report
from epwatch.collector.offline import diagnosis_json
from epwatch.collector.replay import ReplayError, peer_files, recording_files, replay


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("paths", type=Path, nargs="+", help="recording files or --record folders")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")


def run(args: argparse.Namespace) -> int:
    skipped: list[tuple[Path, str]] = []
    try:
        reports = replay(
            recording_files(args.paths), peers=peer_files(args.paths), skipped=skipped
        )
    except ReplayError as err:
        print(f"epwatch replay: {err}", file=sys.stderr)
        return 2
    for path, why in skipped:
        print(f"epwatch replay: skipped {path}: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps(diagnosis_json(reports)))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0
