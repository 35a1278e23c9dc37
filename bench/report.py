"""How long ``epwatch report`` takes, and how much memory, over a million records.

The demo's story (32 ranks on 4 nodes, 61 MoE layers, a slow GPU at step 50 and a hot
expert at step 100) is recorded as the collector's ``--record`` writes it: 257 steps,
1,003,328 records and their sampled per-peer rows. Then the real command runs in a
fresh process, three ways: the HTML report, the Perfetto trace, and both at once.
Prints wall time and peak RSS (the child's ru_maxrss) for each, the last line as JSON.
Goals: under 20 s and under 1 GB for the report on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from epwatch.cli.demo import add_arguments, demo_scenario
from epwatch.cli.simrecord import record_scenario


def timed(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one ``epwatch`` run in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "epwatch.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"epwatch {' '.join(args)} failed:\n{err}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--duration", type=float, default=45.0, help="demo seconds (x5 steps)")
    p.add_argument("--keep", type=Path, help="record into this folder and keep it")
    args = p.parse_args()
    demo = argparse.ArgumentParser()
    add_arguments(demo)
    scenario = demo_scenario(
        demo.parse_args([f"--layers={args.layers}", f"--duration={args.duration}"])
    )
    with tempfile.TemporaryDirectory(prefix="epwatch-bench-report-") as tmp:
        directory = args.keep or Path(tmp)
        start = time.perf_counter()
        records = record_scenario(scenario, directory)
        print(f"recorded {records:,} records in {time.perf_counter() - start:.1f} s")
        html, trace = Path(tmp) / "report.html", Path(tmp) / "trace.json"
        results = {}
        for name, extra in (
            ("html", ["--out", str(html)]),
            ("perfetto", ["--perfetto", str(trace)]),
            ("html+perfetto", ["--out", str(html), "--perfetto", str(trace)]),
        ):
            wall, rss = timed(["report", str(directory), *extra])
            results[name] = {"wall_s": round(wall, 2), "peak_rss_mib": round(rss)}
            print(f"{name:>14}: {wall:6.2f} s, peak RSS {rss:6.0f} MiB")
        print(f"HTML {html.stat().st_size / 1e6:.1f} MB, trace {trace.stat().st_size / 1e6:.0f} MB")
    print(
        json.dumps(
            {
                "records": records,
                "ranks": scenario.cluster.ranks,
                "layers": args.layers,
                "steps": scenario.steps,
                **results,
                "goal_wall_s": 20,
                "goal_peak_rss_mib": 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
