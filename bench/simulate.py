"""How fast ``epwatch simulate`` turns a DeepSeek-V3-sized group into a diagnosis.

P = 256 ranks, 61 MoE layers, 300 steps: 9.4 M hook records generated, ingested by
the streaming estimators and diagnosed. Prints the figures, the last line as JSON.
Goal: under 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time

from epwatch.cli.simulate import run_scenario
from epwatch.simulator.scenario import load_scenario


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=int, default=256)
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    scenario = load_scenario(
        {
            "seed": 1,
            "steps": args.steps,
            "cluster": {"ranks": args.ranks},
            "model": {"layers": args.layers},
            "faults": [
                {"kind": "slow_gpu", "rank": 7, "start_step": args.steps // 3, "factor": 1.1}
            ],
        }
    )
    records = args.ranks * args.layers * 2 * args.steps
    start = time.perf_counter()
    report, _ = run_scenario(scenario)
    wall = time.perf_counter() - start
    found = [(s.rank, s.cause) for s in report.stragglers]
    print(
        f"P={args.ranks} layers={args.layers} steps={args.steps}: {records:,} records "
        f"in {wall:.2f} s ({records / wall / 1e6:.2f} M records/s); found {found}"
    )
    print(
        json.dumps(
            {
                "ranks": args.ranks,
                "layers": args.layers,
                "steps": args.steps,
                "records": records,
                "wall_s": round(wall, 3),
                "records_per_second": round(records / wall),
                "goal_wall_s": 30,
            }
        )
    )


if __name__ == "__main__":
    main()
