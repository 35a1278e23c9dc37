"""Post-mortems from the collector's ``--record`` Parquet files (``epwatch replay``).

The recorded hook records go through the same estimators as they did live, in the
order the collector received them, and the diagnosis comes out as ``simulate``'s does.
The sampled per-peer wait rows (``peers-*`` files) go in with the batch they came with,
so network stragglers are found too. Recordings hold no heartbeats and no node
samples, so a replay flags neither hangs nor evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from epwatch.collector.estimators import EstimatorConfig, GroupReport
from epwatch.collector.offline import OfflineRun
from epwatch.collector.recorder import PEERS
from epwatch.schema import (
    OPTIONAL_RECORD_COLUMNS,
    PEER_KEY_DTYPES,
    RECORD_DTYPES,
    PeerRows,
    RecordColumns,
    RecordError,
)

PEER_PREFIX = PEERS.prefix + "-"
_BATCH_COLUMNS = {"ep_group", "node", "world_size", "received_unix_ns"}


class ReplayError(ValueError):
    """The recording cannot be read."""


def recording_files(paths: list[Path]) -> list[Path]:
    """Files named on the command line, and the finished recordings in folders (the
    records; per-peer files are found by :func:`peer_files`)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.glob("*.parquet") if not p.name.startswith(PEER_PREFIX))
        elif path.exists():
            if not path.name.startswith(PEER_PREFIX):
                out.append(path)
        else:
            raise ReplayError(f"{path}: no such file or folder")
    if not out:
        raise ReplayError("no .parquet recordings found (only finished files are read)")
    return out


def peer_files(paths: list[Path]) -> list[Path]:
    """The finished per-peer row files among ``paths`` and in its folders."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(path.glob(f"{PEER_PREFIX}*.parquet"))
        elif path.name.startswith(PEER_PREFIX) and path.exists():
            out.append(path)
    return out


def _read(
    files: list[Path], columns: set[str], what: str, skipped: list[tuple[Path, str]]
) -> Any:
    """The readable files as one table sorted by receive time. A file cut short by a
    crash, or not of this kind, is left out and appended to ``skipped`` (path, why):
    one bad file does not cost the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        try:
            table = pq.read_table(f)
        except (OSError, pa.ArrowException) as err:
            skipped.append((f, str(err).splitlines()[0][:200]))
            continue
        missing = {*_BATCH_COLUMNS, *columns} - set(table.column_names)
        if missing:
            skipped.append((f, f"not an epwatch {what}: no {', '.join(sorted(missing))}"))
            continue
        tables.append(table)
    if not tables:
        raise ReplayError(
            f"no readable {what}: " + "; ".join(f"{path}: {why}" for path, why in skipped)
        )
    try:
        table = pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()
    except pa.ArrowException as err:
        raise ReplayError(f"cannot join the {what} files: {err}") from None
    return table.sort_by("received_unix_ns")


def read_recording(files: list[Path], skipped: list[tuple[Path, str]] | None = None) -> Any:
    """The recorded hook records as one pyarrow table, in the order received; files
    that cannot be read are appended to ``skipped``."""
    required = set(RECORD_DTYPES) - OPTIONAL_RECORD_COLUMNS
    return _read(files, required, "recording", [] if skipped is None else skipped)


def read_peers(files: list[Path], skipped: list[tuple[Path, str]] | None = None) -> Any | None:
    """The recorded per-peer rows as one table in the order received, or None."""
    if not files:
        return None
    columns = {*PEER_KEY_DTYPES, "wait_s", "send_bytes"}
    bad: list[tuple[Path, str]] = []
    try:
        return _read(files, columns, "per-peer recording", bad)
    except ReplayError:
        return None  # every per-peer file unreadable: the records still replay
    finally:
        if skipped is not None:
            skipped += bad


def codes(table: Any, name: str) -> tuple[np.ndarray, list[str]]:
    """A string column as integer codes and the names they stand for."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name).cast(pa.string()).combine_chunks()
    encoded = pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def _matrix(column: Any, world_size: int, what: str) -> np.ndarray:
    """A list column of ``world_size`` values per row as a ``[rows, P]`` matrix
    (``[rows, 0]`` when every list is empty)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths == 0).all():
        return flat.reshape(len(lengths), 0)
    if (lengths != world_size).any():
        raise ReplayError(f"per-peer column {what!r} has rows that are not {world_size} long")
    return flat.reshape(len(lengths), world_size)


def _peer_rows(peers: Any, world_size: int) -> PeerRows:
    rows = PeerRows(
        **{n: peers.column(n).to_numpy().astype(d) for n, d in PEER_KEY_DTYPES.items()},
        wait_s=_matrix(peers.column("wait_s"), world_size, "wait_s").astype(np.float64),
        send_bytes=_matrix(peers.column("send_bytes"), world_size, "send_bytes").astype(np.int64),
    )
    rows.validate(world_size)
    return rows


@dataclass(frozen=True)
class GroupRecording:
    """One EP group's part of a recording: its records and per-peer rows, each sorted
    by receive time."""

    name: str
    world_size: int
    records: Any
    peers: Any | None = None

    def peer_rows(self) -> PeerRows | None:
        """The group's per-peer rows, validated, or None when none were recorded."""
        import pyarrow as pa

        if self.peers is None or not self.peers.num_rows:
            return None
        try:
            return _peer_rows(self.peers, self.world_size)
        except (RecordError, ValueError, TypeError, pa.ArrowException) as err:
            raise ReplayError(f"EP group {self.name!r} per-peer rows: {err}") from None

    def batches(self) -> Iterator[tuple[RecordColumns, str, PeerRows | None]]:
        """The records as the collector ingested them, one batch per run of the same
        node, each with the per-peer rows received along with it (or just before)."""
        world, group = self.world_size, self.name
        node_code, node_names = codes(self.records, "node")
        # Recordings made before an optional column existed lack it (or, joined with
        # newer files, hold nulls there): from_arrays fills 0.
        cols = {
            name: self.records.column(name).fill_null(0).to_numpy()
            for name in RECORD_DTYPES
            if name in self.records.column_names
        }
        received = self.records.column("received_unix_ns").to_numpy()
        starts = np.flatnonzero(np.r_[True, node_code[1:] != node_code[:-1]])
        ends = [*starts[1:].tolist(), len(node_code)]
        peer_rows, bounds = self.peer_rows(), None
        if peer_rows is not None:
            t = self.peers.column("received_unix_ns").to_numpy()
            owner = np.clip(np.searchsorted(received[starts], t, side="right") - 1, 0, None)
            bounds = np.searchsorted(owner, np.arange(len(starts) + 1))
        for i, (start, end) in enumerate(zip(starts.tolist(), ends, strict=True)):
            try:
                records = RecordColumns.from_arrays(**{n: c[start:end] for n, c in cols.items()})
                records.validate(world)
            except (RecordError, ValueError, TypeError) as err:
                raise ReplayError(f"EP group {group!r}: {err}") from None
            rows = None
            if peer_rows is not None and bounds is not None and bounds[i + 1] > bounds[i]:
                rows = peer_rows.take(slice(bounds[i], bounds[i + 1]))
            yield records, node_names[node_code[start]], rows


def split_groups(table: Any, peers: Any | None = None) -> list[GroupRecording]:
    """The recording's EP groups, in the order they first appear."""
    import pyarrow.compute as pc

    code, names = codes(table, "ep_group")
    out = []
    for i in np.sort(np.unique(code, return_index=True)[1]).tolist():
        name = names[code[i]]
        records = table.filter(code == code[i])
        sizes = np.unique(records.column("world_size").to_numpy())
        if len(sizes) != 1:
            raise ReplayError(f"EP group {name!r} changes world size in the recording: {sizes}")
        theirs = None
        if peers is not None:
            theirs = peers.filter(pc.equal(peers.column("ep_group").cast("string"), name))
        out.append(GroupRecording(name, int(sizes[0]), records, theirs))
    return out


def replay_group(
    group: GroupRecording,
    config: EstimatorConfig | None = None,
    after_batch: Callable[[OfflineRun, int], None] | None = None,
) -> GroupReport:
    """One EP group through fresh estimators. ``after_batch(run, records)`` sees the
    run after each batch and once more, with 0 records, after the last steps are
    finalised (a report collecting the steps, progress)."""
    run = OfflineRun(group.name, group.world_size, config)
    for records, node, rows in group.batches():
        run.ingest(records, node, rows)
        if after_batch is not None:
            after_batch(run, len(records))
    report = run.finish()
    if after_batch is not None:
        after_batch(run, 0)
    return report


def replay(
    files: list[Path],
    config: EstimatorConfig | None = None,
    peers: list[Path] = (),
    skipped: list[tuple[Path, str]] | None = None,
) -> list[GroupReport]:
    """Run every recorded EP group through fresh estimators; one report per group.
    Unreadable files are left out and appended to ``skipped`` (path, why)."""
    groups = split_groups(read_recording(files, skipped), read_peers(list(peers), skipped))
    return [replay_group(g, config) for g in groups]
