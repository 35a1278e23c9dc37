"""Codec between :mod:`epwatch.schema` columns and the protobuf wire messages, and the
one decode-and-validate of a batch that the agent and the collector both run.

Array columns travel as little-endian bytes; decoding is ``np.frombuffer`` (no copy),
which is what keeps the collector's ingest loop cheap. Needs numpy and protobuf only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import (
    ENTERED_DTYPES,
    INTERVAL_KEY_DTYPES,
    INTERVAL_TOKENS_DTYPE,
    INTERVAL_WAIT_DTYPE,
    MAX_LOCAL_EXPERTS,
    MAX_WORLD_SIZE,
    OPTIONAL_RECORD_COLUMNS,
    PEER_KEY_DTYPES,
    PEER_SEND_DTYPE,
    PEER_WAIT_DTYPE,
    RECORD_DTYPES,
    Entered,
    IntervalColumns,
    PeerRows,
    RecordColumns,
    RecordError,
)

# The wire schema this code speaks (AgentMessage.schema): 1 records and samples,
# 2 adds interval records (counter mode).
SCHEMA = 2
INTERVALS_SCHEMA = 2


def _column(raw: bytes, dtype: str, count: int, name: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise RecordError(
            "length_mismatch",
            f"column {name!r} holds {len(raw) // itemsize if itemsize else 0} values "
            f"({len(raw)} bytes), batch count is {count}",
        )
    return np.frombuffer(raw, dtype=dtype)


def encode_records(
    ep_group: str,
    world_size: int,
    records: RecordColumns,
    peer_rows: PeerRows | None = None,
    entered: Entered | None = None,
) -> pb.RecordBatch:
    """Pack columns into a :class:`RecordBatch` message."""
    batch = pb.RecordBatch(ep_group=ep_group, world_size=world_size, count=len(records))
    for name, dtype in RECORD_DTYPES.items():
        column = getattr(records, name)
        if name in OPTIONAL_RECORD_COLUMNS and not column.any():
            continue  # all zero: absent on the wire, as from a sender that predates it
        setattr(batch, name, np.ascontiguousarray(column, dtype=dtype).tobytes())
    if peer_rows is not None and len(peer_rows):
        rows = batch.peer_rows
        rows.count = len(peer_rows)
        for name, dtype in PEER_KEY_DTYPES.items():
            setattr(rows, name, np.ascontiguousarray(getattr(peer_rows, name), dtype).tobytes())
        rows.wait_s = np.ascontiguousarray(peer_rows.wait_s, PEER_WAIT_DTYPE).tobytes()
        rows.send_bytes = np.ascontiguousarray(peer_rows.send_bytes, PEER_SEND_DTYPE).tobytes()
    if entered is not None and len(entered):
        hb = batch.entered
        hb.count = len(entered)
        for name, dtype in ENTERED_DTYPES.items():
            setattr(hb, name, np.ascontiguousarray(getattr(entered, name), dtype).tobytes())
    return batch


def decode_records(batch: pb.RecordBatch) -> RecordColumns:
    """Columns of a batch, zero-copy. Raises :class:`RecordError` on length mismatch.
    An optional column a batch does not carry (an older sender's) is all zero."""
    n = batch.count
    columns = {}
    for name, dtype in RECORD_DTYPES.items():
        raw = getattr(batch, name)
        if not raw and name in OPTIONAL_RECORD_COLUMNS:
            columns[name] = np.zeros(n, dtype=dtype)
        else:
            columns[name] = _column(raw, dtype, n, name)
    return RecordColumns(**columns)


def _matrix(raw: bytes, dtype: str, rows: int, world_size: int, name: str) -> np.ndarray:
    if not raw:
        return np.empty((rows, 0), dtype=dtype)
    flat = _column(raw, dtype, rows * world_size, name)
    return flat.reshape(rows, world_size)


def decode_peer_rows(batch: pb.RecordBatch) -> PeerRows:
    rows = batch.peer_rows
    n, p = rows.count, batch.world_size
    keys = {name: _column(getattr(rows, name), d, n, name) for name, d in PEER_KEY_DTYPES.items()}
    return PeerRows(
        **keys,
        wait_s=_matrix(rows.wait_s, PEER_WAIT_DTYPE, n, p, "wait_s"),
        send_bytes=_matrix(rows.send_bytes, PEER_SEND_DTYPE, n, p, "send_bytes"),
    )


def decode_entered(batch: pb.RecordBatch) -> Entered:
    hb = batch.entered
    return Entered(
        **{
            name: _column(getattr(hb, name), d, hb.count, name)
            for name, d in ENTERED_DTYPES.items()
        }
    )


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    ep_group: str
    world_size: int
    records: RecordColumns
    peer_rows: PeerRows | None
    entered: Entered | None


def decode_batch(batch: pb.RecordBatch) -> DecodedBatch:
    """Columns of a batch, fully validated: the agent runs this on every hook frame and
    the collector on every batch, so nothing of a bad batch is accepted anywhere.
    Raises :class:`RecordError` naming the first problem."""
    if not batch.ep_group:
        raise RecordError("missing_group", "batch has no ep_group")
    ws = batch.world_size
    records = decode_records(batch)
    records.validate(ws)
    peer_rows = None
    if batch.HasField("peer_rows"):
        peer_rows = decode_peer_rows(batch)
        peer_rows.validate(ws)
    entered = None
    if batch.HasField("entered"):
        entered = decode_entered(batch)
        entered.validate(ws)
    return DecodedBatch(
        batch.ep_group,
        ws,
        records,
        peer_rows if peer_rows is not None and len(peer_rows) else None,
        entered if entered is not None and len(entered) else None,
    )


def encode_intervals(ep_group: str, world_size: int, rows: IntervalColumns) -> pb.IntervalBatch:
    """Pack counter-mode interval records into an :class:`IntervalBatch`."""
    batch = pb.IntervalBatch(
        ep_group=ep_group,
        world_size=world_size,
        count=len(rows),
        local_experts=rows.local_experts,
    )
    for name, dtype in INTERVAL_KEY_DTYPES.items():
        setattr(batch, name, np.ascontiguousarray(getattr(rows, name), dtype).tobytes())
    batch.dispatch_wait_s = np.ascontiguousarray(
        rows.dispatch_wait_s, INTERVAL_WAIT_DTYPE
    ).tobytes()
    batch.combine_wait_s = np.ascontiguousarray(rows.combine_wait_s, INTERVAL_WAIT_DTYPE).tobytes()
    batch.expert_tokens = np.ascontiguousarray(rows.expert_tokens, INTERVAL_TOKENS_DTYPE).tobytes()
    return batch


def decode_intervals(batch: pb.IntervalBatch) -> IntervalColumns:
    """Interval records of a batch, validated (the agent and the collector both run
    this). Raises :class:`RecordError` naming the first problem."""
    if not batch.ep_group:
        raise RecordError("missing_group", "interval batch has no ep_group")
    n, p, e = batch.count, batch.world_size, batch.local_experts
    if not 0 < p <= MAX_WORLD_SIZE:
        raise RecordError("bad_world_size", f"world_size must be in [1, {MAX_WORLD_SIZE}]")
    if not 1 <= e <= MAX_LOCAL_EXPERTS:
        raise RecordError(
            "count_out_of_range", f"local experts must be 1..{MAX_LOCAL_EXPERTS}, got {e}"
        )
    keys = {
        name: _column(getattr(batch, name), d, n, name) for name, d in INTERVAL_KEY_DTYPES.items()
    }
    rows = IntervalColumns(
        **keys,
        dispatch_wait_s=_column(
            batch.dispatch_wait_s, INTERVAL_WAIT_DTYPE, n * p, "dispatch_wait_s"
        ).reshape(n, p),
        combine_wait_s=_column(
            batch.combine_wait_s, INTERVAL_WAIT_DTYPE, n * p, "combine_wait_s"
        ).reshape(n, p),
        expert_tokens=_column(
            batch.expert_tokens, INTERVAL_TOKENS_DTYPE, n * e, "expert_tokens"
        ).reshape(n, e),
    )
    rows.validate(p)
    return rows
