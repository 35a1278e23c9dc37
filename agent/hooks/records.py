"""Turn drained probe records into :mod:`epwatch.schema` columns (flusher thread).

Records whose device stamps or counters are not ready yet wait here for a later tick.
Anything the collector would reject (a negative step, an exit before the enter, a
per-peer vector of the wrong length) is repaired or dropped and counted here, because
the collector rejects a whole batch for one bad record.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from agent.hooks.deferred import Deferred
from agent.hooks.probe import Probe, Record
from epwatch.schema import PEER_SEND_DTYPE, PEER_WAIT_DTYPE, PeerRows, RecordColumns


def _pending(fields: tuple[object, ...]) -> bool:
    return any(isinstance(f, Deferred) and not f.ready() for f in fields)


def _value(v: object) -> object:
    if isinstance(v, Deferred):
        out = v.value()
        v.release()
        return out
    return v


def _drop(v: object) -> None:
    if isinstance(v, Deferred):
        v.release()


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
        pending: list[Record] = []
        rows: list[tuple[int, ...]] = []
        peers: list[tuple[int, int, int, np.ndarray | None, np.ndarray | None]] = []
        for rec in items:
            token = rec[0]
            if token is None:  # begin() failed; already counted there
                for f in rec[1:]:
                    _drop(f)
                continue
            fields = (token[3], *rec[1:])
            if _pending(fields):
                pending.append(rec)
                continue
            try:
                row, wait, send = self._convert(token, rec)
            except Exception:
                self.invalid_records += 1
                for f in fields:
                    _drop(f)
                continue
            if row is None:
                continue
            rows.append(row)
            if wait is not None or send is not None:
                peers.append((row[0], row[1], row[2], wait, send))
        self._keep_pending(pending)
        return self._columns(rows), self._peer_rows(peers)

    def _convert(
        self, token: tuple, rec: Record
    ) -> tuple[tuple[int, ...] | None, np.ndarray | None, np.ndarray | None]:
        step, layer, phase, enter = token
        enter_ns = int(_value(enter))  # type: ignore[arg-type]
        exit_ns = int(_value(rec[1]))  # type: ignore[arg-type]
        counts = [max(0, int(_value(v))) for v in rec[2:5]]  # type: ignore[arg-type]
        step, layer, phase = int(step), int(layer), int(phase)
        keep_peers = self.probe.sample_peers(step)
        wait = self._vector(rec[5], PEER_WAIT_DTYPE) if keep_peers else _drop(rec[5])
        send = self._vector(rec[6], PEER_SEND_DTYPE) if keep_peers else _drop(rec[6])
        if step < 0 or layer < 0 or phase not in (0, 1):
            self.invalid_records += 1
            return None, None, None
        # Two CUDA stamps may straddle an anchor renewal; never ship a negative duration.
        exit_ns = max(exit_ns, enter_ns)
        return (step, layer, phase, enter_ns, exit_ns, *counts), wait, send

    def _vector(self, v: object, dtype: str) -> np.ndarray | None:
        if v is None:
            return None
        try:
            arr = np.asarray(_value(v), dtype=dtype).reshape(-1)
        except Exception:
            self.bad_peer_vectors += 1
            return None
        if arr.size != self.probe.world_size or not np.isfinite(arr).all():
            self.bad_peer_vectors += 1
            return None
        return np.maximum(arr, 0)

    def _keep_pending(self, pending: list[Record]) -> None:
        excess = len(pending) - self.max_pending
        if excess > 0:  # oldest first: a hung device must not grow memory without bound
            for rec in pending[:excess]:
                for f in rec:
                    _drop(f)
            self.probe.dropped_unsent += excess
            pending = pending[excess:]
        self.pending = pending

    def _columns(self, rows: list[tuple[int, ...]]) -> RecordColumns:
        if not rows:
            return RecordColumns.empty()
        a = np.array(rows, dtype=np.int64)
        n = len(rows)
        return RecordColumns.from_arrays(
            rank=np.full(n, self.probe.rank),
            local_device=np.full(n, self.probe.local_device),
            step=a[:, 0],
            layer=a[:, 1],
            phase=a[:, 2],
            enter_ns=a[:, 3],
            exit_ns=a[:, 4],
            send_bytes=a[:, 5],
            recv_bytes=a[:, 6],
            recv_tokens=a[:, 7],
        )

    def _peer_rows(
        self, peers: list[tuple[int, int, int, np.ndarray | None, np.ndarray | None]]
    ) -> list[PeerRows]:
        """One PeerRows per shape (wait only, send only, both): a matrix travels only
        when every row in its message has it."""
        groups: dict[tuple[bool, bool], list] = defaultdict(list)
        for p in peers:
            groups[(p[3] is not None, p[4] is not None)].append(p)
        out = []
        p_size = self.probe.world_size
        for (has_wait, has_send), group in groups.items():
            n = len(group)
            keys = {
                "rank": np.full(n, self.probe.rank, dtype="<i4"),
                "step": np.array([g[0] for g in group], dtype="<i8"),
                "layer": np.array([g[1] for g in group], dtype="<i4"),
                "phase": np.array([g[2] for g in group], dtype="<u1"),
            }
            wait = (
                np.stack([g[3] for g in group]).astype(PEER_WAIT_DTYPE)
                if has_wait
                else np.empty((n, 0), dtype=PEER_WAIT_DTYPE)
            )
            send = (
                np.stack([g[4] for g in group]).astype(PEER_SEND_DTYPE)
                if has_send
                else np.empty((n, 0), dtype=PEER_SEND_DTYPE)
            )
            assert wait.shape[1] in (0, p_size) and send.shape[1] in (0, p_size)
            out.append(PeerRows(**keys, wait_s=wait, send_bytes=send))
        return out
