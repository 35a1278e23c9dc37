"""Generate epwatch's Grafana dashboards into dashboards/grafana/*.json.

    python -m epwatch.dashboards.generate          # write the JSON files
    python -m epwatch.dashboards.generate --check  # exit 1 if a committed file is stale

The dashboards are code so that every query uses the contract's metric names and
the recording rules of dashboards/prometheus/, and so that a test can prove the
committed JSON is what this code produces.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from epwatch.dashboards.builder import Dashboard, Json
from epwatch.dashboards.ep_group import ep_group
from epwatch.dashboards.fleet import fleet
from epwatch.dashboards.node import node

OUT_DIR = Path(__file__).resolve().parent / "grafana"

DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "epwatch-fleet.json": fleet,
    "epwatch-ep-group.json": ep_group,
    "epwatch-node.json": node,
}


def render(board: Dashboard) -> str:
    """Stable JSON text (the committed form)."""
    return json.dumps(board.to_json(), indent=2, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {name: render(factory()) for name, factory in DASHBOARDS.items()}


def dashboards_json() -> dict[str, Json]:
    """File name -> dashboard JSON object (for tests)."""
    return {name: factory().to_json() for name, factory in DASHBOARDS.items()}


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Committed files that differ from the generator's output, or should not exist."""
    wanted = build_all()
    stale = [
        name
        for name, text in wanted.items()
        if not (out_dir / name).exists() or (out_dir / name).read_text() != text
    ]
    stale += sorted(p.name for p in out_dir.glob("*.json") if p.name not in wanted)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epwatch.dashboards.generate", description=__doc__
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if committed JSON is stale")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale: {args.out / name} (run: python -m epwatch.dashboards.generate)")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in build_all().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
