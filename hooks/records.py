"""Turn drained probe records into :mod:`epwatch.schema` columns (flusher thread).

The flusher shares the GIL with the engine, so the common case (host clock, plain
numbers) is converted column-wise by numpy at a few hundred nanoseconds per record;
only batches holding device values take the per-record path. Records whose device
stamps or counters are not ready yet wait here for a later tick. Anything the
collector would reject (a negative step, an exit before the enter, a per-peer vector of
the wrong length) is repaired or dropped and counted here, because the collector
rejects a whole batch for one bad record.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any

import numpy as np

from epwatch.hooks.deferred import Deferred
from epwatch.hooks.probe import Probe, Record
from epwatch.schema import (
    MAX_COUNT,
    MAX_DURATION_NS,
    MAX_LAYER,
    MAX_STEP,
    PEER_SEND_DTYPE,
    PEER_WAIT_DTYPE,
    PeerRows,
    RecordColumns,
)

_ENTER, _EXIT, _PEER_WAIT, _PEER_SEND = 3, 4, 9, 10
_INTS = 9  # step .. dropped_tokens
_Peer = tuple[int, int, int, np.ndarray | None, np.ndarray | None]


def _waiting(fields: tuple[object, ...]) -> bool:
    return any(isinstance(f, Deferred) and not f.ready() for f in fields)


def _value(v: object) -> Any:
    if isinstance(v, Deferred):
        out = v.value()
        v.release()
        return out
    return v


def _drop(v: object) -> None:
    if isinstance(v, Deferred):
        v.release()


def _int_columns(items: list[Record]) -> np.ndarray:
    """The nine integer fields as a (9, n) array. ``zip(*items)`` would be simpler but
    allocates one GC-tracked iterator per record, which ages into the old generation
    and makes the engine's thread pay for full collections."""
    flat = np.fromiter(
        chain.from_iterable(r[:_INTS] for r in items), dtype=np.int64, count=_INTS * len(items)
    )
    return flat.reshape(len(items), _INTS).T


def _any_peers(items: list[Record]) -> bool:
    return any(r[_PEER_WAIT] is not None or r[_PEER_SEND] is not None for r in items)


def _any_deferred_peers(items: list[Record]) -> bool:
    return any(
        isinstance(r[_PEER_WAIT], Deferred) or isinstance(r[_PEER_SEND], Deferred) for r in items
    )


class RecordResolver:
    """Per-probe state: records still waiting on the device, and problem counters."""

    def __init__(self, probe: Probe, max_pending: int) -> None:
        self.probe = probe
        self.max_pending = max_pending
        self.pending: list[Record] = []
        self.invalid_records = 0
        self.bad_peer_vectors = 0

    def resolve(self, drained: list[Record]) -> tuple[RecordColumns, list[PeerRows]]:
        """Columns of every record that is ready; the rest stay pending (bounded)."""
        items = self.pending + drained if self.pending else drained
        self.pending = []
        if not items:
            return RecordColumns.empty(), []
        has_peers = _any_peers(items)
        try:
            if has_peers and _any_deferred_peers(items):
                raise TypeError("device values among the peer vectors")
            ints = _int_columns(items)  # raises on any Deferred or None
            ready = items
        except (TypeError, ValueError, OverflowError):
            ready = self._resolve_slowly(items)
            if not ready:
                return RecordColumns.empty(), []
            has_peers = _any_peers(ready)
            try:
                ints = _int_columns(ready)
            except (TypeError, ValueError, OverflowError):  # e.g. a count beyond int64
                self.invalid_records += len(ready)
                return RecordColumns.empty(), []
        valid = self._valid(ints)
        peers = self._peers(ready, ints, valid) if has_peers else []
        return self._columns(ints[:, valid]), self._peer_rows(peers)

    def _resolve_slowly(self, items: list[Record]) -> list[Record]:
        """Per record: keep the unready ones pending, read the ready ones' values."""
        ready: list[Record] = []
        pending: list[Record] = []
        for rec in items:
            if _waiting(rec[_ENTER:]):
                pending.append(rec)
                continue
            try:
                plain = (
                    int(rec[0]),
                    int(rec[1]),
                    int(rec[2]),
                    *(int(_value(v)) for v in rec[_ENTER:_PEER_WAIT]),
                    _value(rec[_PEER_WAIT]),
                    _value(rec[_PEER_SEND]),
                )
            except Exception:
                self.invalid_records += 1
                for f in rec[_ENTER:]:
                    _drop(f)
                continue
            ready.append(plain)  # type: ignore[arg-type]
        self._keep_pending(pending)
        return ready

    def _valid(self, ints: np.ndarray) -> np.ndarray:
        """Mask of records within epwatch.schema's plausibility bounds, after repairs."""
        # Two CUDA stamps may straddle an anchor renewal; never ship a negative duration.
        np.maximum(ints[_EXIT], ints[_ENTER], out=ints[_EXIT])
        np.maximum(ints[5:_INTS], 0, out=ints[5:_INTS])
        step, layer, phase = ints[0], ints[1], ints[2]
        valid = (
            (step >= 0)
            & (step < MAX_STEP)
            & (layer >= 0)
            & (layer < MAX_LAYER)
            & (phase >= 0)
            & (phase <= 1)
            & (ints[_ENTER] >= 0)
            & (ints[_EXIT] - ints[_ENTER] <= MAX_DURATION_NS)  # an hour: garbage, or a hang
            & (ints[5:_INTS] < MAX_COUNT).all(axis=0)
        )
        self.invalid_records += int(len(valid) - valid.sum())
        return valid

    def _peers(self, ready: list[Record], ints: np.ndarray, valid: np.ndarray) -> list[_Peer]:
        out: list[_Peer] = []
        sample = self.probe.sample_peers
        for i, rec in enumerate(ready):
            w, s = rec[_PEER_WAIT], rec[_PEER_SEND]
            if w is None and s is None:
                continue
            step = int(ints[0, i])
            if not (valid[i] and sample(step, int(ints[1, i]))):
                _drop(w)
                _drop(s)
                continue
            wait, send = self._vector(w, PEER_WAIT_DTYPE), self._vector(s, PEER_SEND_DTYPE)
            if wait is not None or send is not None:
                out.append((step, int(ints[1, i]), int(ints[2, i]), wait, send))
        return out

    def _vector(self, v: object, dtype: str) -> np.ndarray | None:
        if v is None:
            return None
        try:
            arr = np.asarray(_value(v), dtype=dtype).reshape(-1)
        except Exception:
            self.bad_peer_vectors += 1
            return None
        arr = np.maximum(arr, 0)
        limit = MAX_DURATION_NS / 1e9 if dtype == PEER_WAIT_DTYPE else MAX_COUNT
        if arr.size != self.probe.world_size or not np.isfinite(arr).all() or arr.max() > limit:
            self.bad_peer_vectors += 1
            return None
        return arr

    def _keep_pending(self, pending: list[Record]) -> None:
        excess = len(pending) - self.max_pending
        if excess > 0:  # oldest first: a hung device must not grow memory without bound
            for rec in pending[:excess]:
                for f in rec:
                    _drop(f)
            self.probe.dropped_unsent += excess
            pending = pending[excess:]
        self.pending = pending

    def _columns(self, a: np.ndarray) -> RecordColumns:
        n = a.shape[1]
        return RecordColumns.from_arrays(
            rank=np.full(n, self.probe.rank),
            local_device=np.full(n, self.probe.local_device),
            step=a[0],
            layer=a[1],
            phase=a[2],
            enter_ns=a[3],
            exit_ns=a[4],
            send_bytes=a[5],
            recv_bytes=a[6],
            recv_tokens=a[7],
            dropped_tokens=a[8],
        )

    def _peer_rows(self, peers: list[_Peer]) -> list[PeerRows]:
        """One PeerRows per shape (wait only, send only, both): a matrix travels only
        when every row in its message has it."""
        groups: dict[tuple[bool, bool], list[_Peer]] = defaultdict(list)
        for p in peers:
            groups[(p[3] is not None, p[4] is not None)].append(p)
        out = []
        for (has_wait, has_send), group in groups.items():
            n = len(group)
            wait = (
                np.stack([g[3] for g in group]).astype(PEER_WAIT_DTYPE)  # type: ignore[misc]
                if has_wait
                else np.empty((n, 0), dtype=PEER_WAIT_DTYPE)
            )
            send = (
                np.stack([g[4] for g in group]).astype(PEER_SEND_DTYPE)  # type: ignore[misc]
                if has_send
                else np.empty((n, 0), dtype=PEER_SEND_DTYPE)
            )
            out.append(
                PeerRows(
                    rank=np.full(n, self.probe.rank, dtype="<i4"),
                    step=np.array([g[0] for g in group], dtype="<i8"),
                    layer=np.array([g[1] for g in group], dtype="<i4"),
                    phase=np.array([g[2] for g in group], dtype="<u1"),
                    wait_s=wait,
                    send_bytes=send,
                )
            )
        return out
