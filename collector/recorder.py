"""``--record DIR``: accepted raw hook records appended to Parquet for post-mortems.

The ingest path only puts columns on a bounded queue (never blocks; what does not fit
is counted); a writer thread accumulates row groups and rotates files by size and age.
Files being written end in ``.parquet.partial``; a file is renamed to its final name
only once its footer is written and it is fsync'ed, so a reader never opens a file
without its footer. A write that fails (a full disk) closes the file if it can, else
deletes it and counts its records as dropped; partial files left by a dead collector
are removed at start, and an unwritable folder is an error at start, not at the
first write.

Each kind of table has files of its own, named by a prefix: ``records-*`` (the hook
records) and ``peers-*`` (the sampled per-peer wait rows that the network attribution
and the report's wait matrix need). :class:`Recording` writes both.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from epwatch.durable import fsync_path
from epwatch.schema import (
    PEER_KEY_DTYPES,
    PEER_SEND_DTYPE,
    PEER_WAIT_DTYPE,
    RECORD_DTYPES,
    PeerRows,
    RecordColumns,
)

log = logging.getLogger(__name__)
# File numbers, unique in the process: two recorders writing one folder in the same
# second (a test, a tool) must not take each other's file names.
_FILE_SEQ = itertools.count(1)


def _batch_fields() -> list[tuple[str, Any]]:
    """Columns every kind of table starts with: where the batch came from and when."""
    import pyarrow as pa

    return [
        ("ep_group", pa.dictionary(pa.int32(), pa.string())),
        ("node", pa.dictionary(pa.int32(), pa.string())),
        ("world_size", pa.int32()),
        ("received_unix_ns", pa.int64()),
    ]


@cache
def _schema() -> Any:
    """pyarrow is imported only when recording is on (the collector runs without it)."""
    import pyarrow as pa

    return pa.schema(
        [
            *_batch_fields(),
            *[(name, pa.from_numpy_dtype(np.dtype(dt))) for name, dt in RECORD_DTYPES.items()],
        ]
    )


@cache
def _peer_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            *_batch_fields(),
            *[(name, pa.from_numpy_dtype(np.dtype(dt))) for name, dt in PEER_KEY_DTYPES.items()],
            ("wait_s", pa.list_(pa.from_numpy_dtype(np.dtype(PEER_WAIT_DTYPE)))),
            ("send_bytes", pa.list_(pa.from_numpy_dtype(np.dtype(PEER_SEND_DTYPE)))),
        ]
    )


@dataclass(frozen=True, slots=True)
class RecorderConfig:
    directory: str
    max_file_bytes: int = 256 << 20
    max_file_seconds: float = 3600.0
    row_group_records: int = 256 * 1024
    flush_seconds: float = 5.0
    queue_records: int = 4 << 20


def _batch_columns(group: str, node: str, ws: int, t_ns: int, n: int) -> dict[str, Any]:
    import pyarrow as pa

    return {
        "ep_group": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [group]),
        "node": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [node]),
        "world_size": pa.array(np.full(n, ws, np.int32)),
        "received_unix_ns": pa.array(np.full(n, t_ns, np.int64)),
    }


def _table(group: str, node: str, ws: int, t_ns: int, r: RecordColumns) -> Any:
    import pyarrow as pa

    cols = _batch_columns(group, node, ws, t_ns, len(r))
    cols.update({name: pa.array(arr) for name, arr in r.as_dict().items()})
    return pa.table(cols, schema=_schema())


class RecorderError(OSError):
    """The recording folder cannot be used; the message says why."""


def prepare_directory(directory: str) -> int:
    """Create the folder, prove it writable, remove partial files of collectors that
    are gone; returns how many were removed. RecorderError if it is not writable."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"epwatch")
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as exc:
        raise RecorderError(
            f"--record folder {directory} is not writable: {exc.strerror or exc}"
        ) from None
    removed = 0
    for name in os.listdir(directory):
        if not name.endswith(".parquet.partial"):
            continue
        pid = _writer_pid(name)
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue  # a live collector (or another recorder of this one) is writing it
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    if removed:
        log.warning(
            "removed %d unfinished recording(s) left in %s by a collector that died while writing",
            removed,
            directory,
        )
    return removed


def _writer_pid(name: str) -> int | None:
    """The pid in ``records-<stamp>-<pid>-<seq>.parquet.partial``."""
    parts = name.split("-")
    return int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _matrix_column(m: np.ndarray, dtype: str) -> Any:
    """A ``[rows, P]`` matrix as a list column (empty lists when the matrix is absent)."""
    import pyarrow as pa

    rows = m.shape[0]
    width = m.shape[1] if m.size else 0
    offsets = np.arange(rows + 1, dtype=np.int32) * width
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(m.reshape(-1).astype(dtype)))


def _peer_table(group: str, node: str, ws: int, t_ns: int, rows: PeerRows) -> Any:
    import pyarrow as pa

    cols = _batch_columns(group, node, ws, t_ns, len(rows))
    cols.update({name: pa.array(getattr(rows, name)) for name in PEER_KEY_DTYPES})
    cols["wait_s"] = _matrix_column(rows.wait_s, PEER_WAIT_DTYPE)
    cols["send_bytes"] = _matrix_column(rows.send_bytes, PEER_SEND_DTYPE)
    return pa.table(cols, schema=_peer_schema())


@dataclass(frozen=True, slots=True)
class TableKind:
    """One kind of recorded table: its file prefix, its schema, how a queued batch
    becomes a table, and how many record's worth of queue memory a batch takes."""

    prefix: str
    schema: Callable[[], Any]
    table: Callable[[str, str, int, int, Any], Any]
    weight: Callable[[Any], int]


RECORDS = TableKind("records", _schema, _table, len)
# A per-peer row holds 2 P values (16 P bytes), about P / 4 records' worth.
PEERS = TableKind(
    "peers", _peer_schema, _peer_table, lambda r: len(r) * (1 + r.wait_s.shape[1] // 4)
)


class Recorder:
    """Background Parquet writer of one kind of table; ``put`` is safe and cheap on
    the ingest path."""

    def __init__(
        self,
        config: RecorderConfig,
        on_drop: Callable[[int], None],
        kind: TableKind = RECORDS,
    ) -> None:
        self.config = config
        self.kind = kind
        self._on_drop = on_drop
        kind.schema()  # fail at start-up, not at the first write, when pyarrow is missing
        prepare_directory(config.directory)
        self._file_rows = 0  # rows in the file being written
        self._queue: queue.Queue[tuple[str, str, int, int, Any, int] | None] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._writer: Any = None
        self._path = ""
        self._opened_s = 0.0
        self.files: list[str] = []
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(
        self,
        group: str,
        node: str,
        world_size: int,
        records: Any,
        received_ns: int | None = None,
    ) -> None:
        """Queue one batch (records, or rows of this recorder's kind); what does not
        fit in the queue is counted as dropped, by its length."""
        weight = self.kind.weight(records)
        with self._lock:
            if self._queued + weight > self.config.queue_records:
                self._on_drop(len(records))
                return
            self._queued += weight
        t_ns = time.time_ns() if received_ns is None else received_ns
        self._queue.put((group, node, world_size, t_ns, records, weight))

    def stop(self) -> None:
        """Write what is queued, close the file (and name it final)."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import pyarrow as pa

        pending: list[Any] = []
        rows = 0
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            if item is None:
                break
            if item:
                group, node, ws, t_ns, records, weight = item
                with self._lock:
                    self._queued -= weight
                pending.append(self.kind.table(group, node, ws, t_ns, records))
                rows += len(records)
            now = time.monotonic()
            if pending and (
                rows >= self.config.row_group_records
                or now - last_flush >= self.config.flush_seconds
            ):
                self._write(pa.concat_tables(pending).unify_dictionaries())
                pending, rows, last_flush = [], 0, now
        if pending:
            self._write(pa.concat_tables(pending).unify_dictionaries())
        self._close()

    def _write(self, table: Any) -> None:
        import pyarrow as pa

        try:
            if self._writer is not None and self._due():
                self._close()
            if self._writer is None:
                self._open()
            assert self._writer is not None
            self._writer.write_table(table)
            self._file_rows += table.num_rows
        except (OSError, pa.ArrowException) as exc:
            log.error("recording %d records failed: %s", table.num_rows, exc)
            self._on_drop(table.num_rows)
            self._close()  # keep what the file holds if its footer can still be written

    def _due(self) -> bool:
        too_big = os.path.getsize(self._path) >= self.config.max_file_bytes
        too_old = time.monotonic() - self._opened_s >= self.config.max_file_seconds
        return too_big or too_old

    def _open(self) -> None:
        import pyarrow.parquet as pq

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        seq = next(_FILE_SEQ)
        name = f"{self.kind.prefix}-{stamp}-{os.getpid()}-{seq:04d}.parquet.partial"
        self._path = os.path.join(self.config.directory, name)
        self._writer = pq.ParquetWriter(self._path, self.kind.schema(), compression="zstd")
        self._opened_s = time.monotonic()

    def _close(self) -> None:
        """Finish the file: footer, fsync, then its final name. If that fails the file
        is deleted and its records are counted as dropped (never a final name on a
        file without a footer). Once renamed, the file is finished and counted in
        ``files``; a failing fsync of the folder after that is only logged (the rename
        may not survive a power loss, but no row is lost to a reader now)."""
        import pyarrow as pa

        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        rows, self._file_rows = self._file_rows, 0
        final = self._path.removesuffix(".partial")
        try:
            writer.close()
            fsync_path(self._path)
            os.replace(self._path, final)
        except (OSError, pa.ArrowException) as exc:
            log.error(
                "cannot finish recording %s (%s): deleted, %d records lost", self._path, exc, rows
            )
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._on_drop(rows)
            return
        self.files.append(final)
        log.info("recorded %s", final)
        try:
            fsync_path(self.config.directory)
        except OSError as exc:
            log.warning(
                "recorded %s, but syncing the folder %s failed (%s): the file's name may "
                "not survive a power loss",
                final,
                self.config.directory,
                exc,
            )


class Recording:
    """What ``--record DIR`` writes: the accepted records and the sampled per-peer
    rows, each kind to its own files in DIR, stamped with the same receive time so a
    replay can feed them to the estimators in the order the collector did."""

    def __init__(self, config: RecorderConfig, on_drop: Callable[[int], None]) -> None:
        self.records = Recorder(config, on_drop, RECORDS)
        self.peers = Recorder(config, on_drop, PEERS)

    def start(self) -> None:
        self.records.start()
        self.peers.start()

    def put(
        self,
        group: str,
        node: str,
        world_size: int,
        records: RecordColumns,
        peer_rows: PeerRows | None = None,
        received_ns: int | None = None,
    ) -> None:
        t_ns = time.time_ns() if received_ns is None else received_ns
        if len(records):
            self.records.put(group, node, world_size, records, t_ns)
        if peer_rows is not None and len(peer_rows) and peer_rows.wait_s.size:
            self.peers.put(group, node, world_size, peer_rows, t_ns)

    def stop(self) -> None:
        self.records.stop()
        self.peers.stop()

    @property
    def files(self) -> list[str]:
        return self.records.files + self.peers.files
