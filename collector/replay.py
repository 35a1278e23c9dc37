"""Post-mortems from the collector's ``--record`` Parquet files (``epwatch replay``).

The recorded hook records go through the same estimators as they did live, in the
order the collector received them, and the diagnosis comes out as ``simulate``'s does.
Recordings hold the records only (no per-peer wait rows, no heartbeats, no node
samples), so the replay can flag compute and routing stragglers but not network
ones, hangs, or evidence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from epwatch.collector.estimators import EstimatorConfig, GroupReport
from epwatch.collector.offline import OfflineRun
from epwatch.schema import OPTIONAL_RECORD_COLUMNS, RECORD_DTYPES, RecordColumns, RecordError


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


def replay(files: list[Path], config: EstimatorConfig | None = None) -> list[GroupReport]:
    """Run every recorded EP group through fresh estimators; one report per group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.concat_tables([pq.read_table(f) for f in files]).unify_dictionaries()
    except (OSError, pa.ArrowException) as err:
        raise ReplayError(f"cannot read the recording: {err}") from None
    required = {"ep_group", "node", "world_size", "received_unix_ns", *RECORD_DTYPES}
    missing = required - OPTIONAL_RECORD_COLUMNS - set(table.column_names)
    if missing:
        raise ReplayError(f"not an epwatch recording: missing {', '.join(sorted(missing))}")
    table = table.sort_by("received_unix_ns")
    groups = table.column("ep_group").to_pylist()
    nodes = np.asarray(table.column("node").to_pylist(), dtype=object)
    group_of = np.asarray(groups, dtype=object)
    world = table.column("world_size").to_numpy()
    # Recordings made before an optional column existed lack it: from_arrays fills 0.
    cols = {n: table.column(n).to_numpy() for n in RECORD_DTYPES if n in table.column_names}
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

