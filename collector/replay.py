"""Post-mortems from the collector's ``--record`` Parquet files (``epwatch replay``).

The recorded hook records go through the same estimators as they did live, in the
order the collector received them, and the diagnosis comes out as ``simulate``'s does.
Recordings hold the records only (no per-peer wait rows, no heartbeats, no node
samples), so the replay can flag compute and routing stragglers but not network
ones, hangs, or evidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from epwatch.collector.estimators import EstimatorConfig, GroupReport
from epwatch.collector.offline import OfflineRun
from epwatch.schema import RECORD_DTYPES, RecordColumns, RecordError


class ReplayError(ValueError):
    """The recording cannot be read."""


def recording_files(paths: list[Path]) -> list[Path]:
    """Files named on the command line, and the finished recordings in folders."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(path.glob("*.parquet"))
        elif path.exists():
            out.append(path)
        else:
            raise ReplayError(f"{path}: no such file or folder")
    if not out:
        raise ReplayError("no .parquet recordings found (only finished files are read)")
    return out


def read_recordings(files: list[Path]) -> tuple[Any, list[tuple[Path, str]]]:
    """Every readable recording as one table, and the files skipped with why (a file
    cut short by a crash, or not a recording): one bad file does not cost the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, skipped = [], []
    for f in files:
        try:
            table = pq.read_table(f)
        except (OSError, pa.ArrowException) as err:
            skipped.append((f, str(err).splitlines()[0][:200]))
            continue
        missing = {"ep_group", "node", "world_size", "received_unix_ns", *RECORD_DTYPES} - set(
            table.column_names
        )
        if missing:
            skipped.append((f, f"not an epwatch recording: no {', '.join(sorted(missing))}"))
            continue
        tables.append(table)
    if not tables:
        raise ReplayError(
            "no readable recording: "
            + "; ".join(f"{path}: {why}" for path, why in skipped)
        )
    return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries(), skipped


def replay(
    files: list[Path],
    config: EstimatorConfig | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> list[GroupReport]:
    """Run every recorded EP group through fresh estimators; one report per group.
    Unreadable files are left out and appended to ``skipped`` (path, why)."""
    table, bad = read_recordings(files)
    if skipped is not None:
        skipped += bad
    table = table.sort_by("received_unix_ns")
    groups = table.column("ep_group").to_pylist()
    nodes = np.asarray(table.column("node").to_pylist(), dtype=object)
    group_of = np.asarray(groups, dtype=object)
    world = table.column("world_size").to_numpy()
    cols = {name: table.column(name).to_numpy() for name in RECORD_DTYPES}
    reports = []
    for group in dict.fromkeys(groups):
        mine = np.flatnonzero(group_of == group)
        sizes = np.unique(world[mine])
        if len(sizes) != 1:
            raise ReplayError(f"EP group {group!r} changes world size in the recording: {sizes}")
        run = OfflineRun(str(group), int(sizes[0]), config)
        # Ingest as the collector did: one batch per run of the same node.
        run_starts = np.flatnonzero(np.r_[True, nodes[mine][1:] != nodes[mine][:-1]])
        for start, end in zip(run_starts, [*run_starts[1:], len(mine)], strict=True):
            rows = mine[start:end]
            records = RecordColumns.from_arrays(**{n: c[rows] for n, c in cols.items()})
            try:
                records.validate(int(sizes[0]))
            except RecordError as err:
                raise ReplayError(f"EP group {group!r}: {err}") from None
            run.ingest(records, str(nodes[rows[0]]))
        reports.append(run.finish())
    return reports

