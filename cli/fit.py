"""``epwatch fit``: robust Hockney fit of measured (bytes, seconds) pairs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from epwatch import hockney


class InputError(ValueError):
    """The CSV cannot be read as bytes,seconds pairs."""


def read_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV with a header naming ``bytes`` and ``seconds`` columns."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("bytes", "seconds") if c not in header]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {', '.join(missing)}; header is {header or 'empty'}"
                )
            xs, ys = [], []
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): v for k, v in row.items() if k is not None}
                try:
                    x, y = float(row["bytes"]), float(row["seconds"])
                except (TypeError, ValueError):
                    raise InputError(f"{path}:{line}: not a number: {row}") from None
                if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
                    raise InputError(f"{path}:{line}: bytes and seconds must be finite and >= 0")
                xs.append(x)
                ys.append(y)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text CSV file") from None
    return np.array(xs), np.array(ys)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", type=Path, help="CSV file with a header and columns bytes,seconds")
    p.add_argument("--json", action="store_true", help="print JSON in base units")


def run(args: argparse.Namespace) -> int:
    try:
        x, y = read_points(args.csv)
        result = hockney.fit(x, y)
    except (InputError, hockney.FitError) as err:
        print(f"epwatch fit: {err}", file=sys.stderr)
        return 2
    problem = hockney.untrustworthy(x, result)  # the collector would not publish it
    if args.json:
        print(json.dumps({**result.to_json(), "fit_problem": problem}))
    else:
        print(
            f"L = {result.latency_s * 1e6:.2f} us, BW_eff = {result.bandwidth_Bps / 1e9:.3f} GB/s, "
            f"R^2 = {result.r2:.4f}, n = {result.n} ({result.inliers} inliers), "
            f"crossover n1/2 = {result.crossover_bytes / 1e3:.1f} KB"
        )
    if problem:
        print(f"epwatch fit: warning: not trustworthy: {problem}", file=sys.stderr)
    return 0
