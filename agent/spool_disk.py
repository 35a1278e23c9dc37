"""``--spool-dir``: the spool on disk, so that a SIGKILLed or rebooted agent still
delivers every message it had accepted.

Modelled on the Prometheus agent's WAL and Vector's disk buffer: append-only segment
files of checksummed records, plus an append-only log of the seqs that are done
(acknowledged, rejected or dropped). Nothing is ever rewritten in place: a segment
whose messages are all done is deleted, and the done log is compacted by writing a
new file and renaming it over the old one. On start, a torn or corrupt tail (a crash
mid-write) is cut off and reported; every complete record before it is kept.

Data is written at once (a SIGKILL loses nothing written) and fdatasync'ed at most
every ``sync_interval_s`` and at every segment change (a power loss may lose that
much). The agent keeps its ``agent_id`` in the folder, so what it resends after a
restart carries the same (agent_id, seq) and the collector de-duplicates it.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from epwatch.durable import fsync_path

log = logging.getLogger(__name__)

_ENTRY = struct.Struct("<4sQIII")  # magic, seq, records, payload length, crc32(payload)
_ENTRY_MAGIC = b"EPWS"
_DONE = struct.Struct("<4sQI")  # magic, seq, crc32(seq bytes)
_DONE_MAGIC = b"EPWD"
SEGMENT_BYTES = 16 << 20
MAX_PAYLOAD = 1 << 30


@dataclass(frozen=True, slots=True)
class StoredEntry:
    seq: int
    records: int
    payload: bytes


class SpoolStoreError(OSError):
    """The spool folder cannot be used; the message says why."""


class SpoolStore:
    """Append-only segments + done log in one folder (one agent per folder)."""

    def __init__(self, directory: str | Path, sync_interval_s: float = 1.0) -> None:
        self.dir = Path(directory)
        self.sync_interval_s = sync_interval_s
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolStoreError(f"spool folder {self.dir} is not writable: {exc}") from None
        self.corrupt_tails = 0  # torn or corrupt records cut off at start
        self._segments: dict[int, set[int]] = {}  # first seq -> its live seqs
        self._done_in: dict[int, set[int]] = {}  # first seq -> its done seqs
        self._seq_segment: dict[int, int] = {}  # every seq of an existing segment
        self._active: int | None = None
        self._active_file = None
        self._active_bytes = 0
        self._done_file = None
        self._done_records = 0
        self._last_sync = 0.0
        self._dirty = False
        self._top_seq = 0

    # --- start ------------------------------------------------------------------------
    def agent_id(self, make: Callable[[], str]) -> str:
        """The folder's agent id (created once with ``make()``)."""
        path = self.dir / "agent-id"
        try:
            text = path.read_text().strip()
            if text:
                return text
        except FileNotFoundError:
            pass
        text = make()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(self.dir)
        return text

    def load(self) -> list[StoredEntry]:
        """Every message not done, in seq order; opens the files for appending."""
        done = set(self._read_done())
        self._top_seq = max(done, default=0)
        entries: list[StoredEntry] = []
        for first, path in self._segment_files():
            mine = list(self._read_segment(path))
            self._top_seq = max([self._top_seq, first, *(e.seq for e in mine)])
            live = {e.seq for e in mine if e.seq not in done}
            if not live:
                path.unlink()
                continue
            entries += [e for e in mine if e.seq in live]
            self._segments[first] = live
            self._done_in[first] = {e.seq for e in mine} - live
            self._seq_segment.update((e.seq, first) for e in mine)
        entries.sort(key=lambda e: e.seq)
        self._rewrite_done()
        return entries

    def next_seq(self) -> int:
        """A seq above every one this folder has used (after :meth:`load`)."""
        return self._top_seq + 1

    # --- running ----------------------------------------------------------------------
    def append(self, seq: int, records: int, payload: bytes) -> None:
        if self._active is None or self._active_bytes >= SEGMENT_BYTES:
            self._roll(seq)
        assert self._active_file is not None and self._active is not None
        head = _ENTRY.pack(_ENTRY_MAGIC, seq, records, len(payload), zlib.crc32(payload))
        self._active_file.write(head + payload)
        self._active_bytes += len(head) + len(payload)
        self._segments.setdefault(self._active, set()).add(seq)
        self._seq_segment[seq] = self._active
        self._dirty = True
        self._maybe_sync()

    def done(self, seqs: list[int]) -> None:
        """These messages need no resend (acknowledged, rejected or dropped)."""
        if self._done_file is None:
            self._done_file = open(self.dir / "done.log", "ab", buffering=0)  # noqa: SIM115
        out = bytearray()
        emptied = []
        for seq in seqs:
            first = self._seq_segment.get(seq)
            live = self._segments.get(first) if first is not None else None
            if live is None or seq not in live:
                continue
            out += _done_record(seq)
            live.discard(seq)
            self._done_in.setdefault(first, set()).add(seq)
            if not live and first != self._active:
                emptied.append(first)
        if out:
            self._done_file.write(bytes(out))
            self._done_records += len(out) // _DONE.size
            self._dirty = True
        for first in emptied:
            self._delete_segment(first)
        if self._done_records > 4 * max(64, len(self._seq_segment)):
            self._rewrite_done()
        self._maybe_sync()

    def _delete_segment(self, first: int) -> None:
        for seq in self._segments.pop(first, set()) | self._done_in.pop(first, set()):
            self._seq_segment.pop(seq, None)
        (self.dir / _segment_name(first)).unlink(missing_ok=True)

    def sync(self) -> None:
        for f in (self._active_file, self._done_file):
            if f is not None:
                os.fdatasync(f.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._dirty:
            self.sync()
        for f in (self._active_file, self._done_file):
            if f is not None:
                f.close()
        self._active_file = self._done_file = None

    # --- internals --------------------------------------------------------------------
    def _maybe_sync(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.sync()

    def _roll(self, seq: int) -> None:
        old = self._active
        if self._active_file is not None:
            os.fdatasync(self._active_file.fileno())
            self._active_file.close()
        self._active = seq
        path = self.dir / _segment_name(seq)
        self._active_file = open(path, "ab", buffering=0)  # noqa: SIM115
        self._active_bytes = 0
        fsync_path(self.dir)
        if old is not None and not self._segments.get(old):
            self._delete_segment(old)

    def _segment_files(self) -> Iterator[tuple[int, Path]]:
        found = []
        for path in self.dir.glob("seg-*.log"):
            try:
                found.append((int(path.stem.removeprefix("seg-")), path))
            except ValueError:
                continue
        yield from sorted(found)

    def _read_segment(self, path: Path, repair: bool = True) -> Iterator[StoredEntry]:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            bad = len(data) - pos < _ENTRY.size
            if not bad:
                magic, seq, records, length, crc = _ENTRY.unpack_from(data, pos)
                end = pos + _ENTRY.size + length
                payload = data[pos + _ENTRY.size : end]
                bad = (
                    magic != _ENTRY_MAGIC
                    or length > MAX_PAYLOAD
                    or end > len(data)
                    or zlib.crc32(payload) != crc
                )
            if bad:
                if repair:
                    self._cut(path, pos, len(data))
                return
            yield StoredEntry(seq, records, payload)
            pos = end

    def _read_done(self, repair: bool = True) -> Iterator[int]:
        path = self.dir / "done.log"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        usable = len(data) - len(data) % _DONE.size
        for pos in range(0, usable, _DONE.size):
            magic, seq, crc = _DONE.unpack_from(data, pos)
            if magic != _DONE_MAGIC or zlib.crc32(struct.pack("<Q", seq)) != crc:  # torn
                if repair:
                    self._cut(path, pos, len(data))
                return
            yield seq
        if usable != len(data) and repair:
            self._cut(path, usable, len(data))

    def _cut(self, path: Path, at: int, size: int) -> None:
        self.corrupt_tails += 1
        log.warning(
            "spool file %s: cutting a torn or corrupt tail at byte %d of %d "
            "(a crash while writing)",
            path.name,
            at,
            size,
        )
        with open(path, "r+b") as f:
            f.truncate(at)
            os.fsync(f.fileno())

    def _rewrite_done(self) -> None:
        """Compact the done log to the done seqs of segments that still exist."""
        if self._done_file is not None:
            self._done_file.close()
            self._done_file = None
        keep = sorted(s for done in self._done_in.values() for s in done)
        tmp = self.dir / "done.log.tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(_done_record(seq) for seq in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "done.log")
        fsync_path(self.dir)
        self._done_records = len(keep)


def _done_record(seq: int) -> bytes:
    return _DONE.pack(_DONE_MAGIC, seq, zlib.crc32(struct.pack("<Q", seq)))


def _segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:016d}.log"


def new_store_agent_id(node: str) -> str:
    """An agent id for a spool folder: kept across restarts of the agent."""
    return f"{node[:96]}:spool:{secrets.token_hex(4)}"
