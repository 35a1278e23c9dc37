"""Cut a batch message that is too large for the collector into smaller ones.

A collector refuses a message over its ``--max-message-bytes`` (it says its limit when
a stream opens, and in the reason of a refusing Ack). Resending it would be refused
forever and hold everything behind it, so the agent splits it: records, per-peer rows
and heartbeats are cut in halves until every part fits. A single record or per-peer
row larger than the limit cannot be cut; the caller drops that message and counts it.
"""

from __future__ import annotations

from epwatch import wire
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import Entered, PeerRows, RecordColumns, RecordError

HEADER_ROOM = 1024  # agent_id, node, seq and stats, prepended when the message is sent


def split_payload(payload: bytes, limit: int) -> list[tuple[bytes, int]] | None:
    """Parts of ``payload`` (a serialized AgentMessage with a batch) of at most
    ``limit - HEADER_ROOM`` bytes each, with their record counts; None if it cannot
    be split that small (or is not a batch)."""
    try:
        msg = pb.AgentMessage.FromString(payload)
        if msg.WhichOneof("payload") != "batch":
            return None
        d = wire.decode_batch(msg.batch)
    except (RecordError, ValueError):
        return None
    budget = limit - HEADER_ROOM
    out: list[tuple[bytes, int]] = []
    todo = [(d.records, d.peer_rows, d.entered)]
    while todo:
        records, rows, entered = todo.pop()
        encoded = pb.AgentMessage(
            batch=wire.encode_records(d.ep_group, d.world_size, records, rows, entered)
        ).SerializeToString()
        if len(encoded) <= budget:
            out.append((encoded, len(records)))
            continue
        halves = _halves(records, rows, entered)
        if halves is None:
            return None
        todo += halves
    return out[::-1]


Part = tuple[RecordColumns, PeerRows | None, Entered | None]


def _halves(
    records: RecordColumns, rows: PeerRows | None, entered: Entered | None
) -> list[Part] | None:
    """Two smaller parts: records first, then per-peer rows, then heartbeats."""
    if rows is not None and len(rows) and len(records):
        return [(records, None, entered), (RecordColumns.empty(), rows, None)]
    if len(records) > 1:
        mid = len(records) // 2
        return [
            (records.take(slice(0, mid)), None, entered),
            (records.take(slice(mid, None)), None, None),
        ]
    if rows is not None and len(rows) > 1:
        mid = len(rows) // 2
        first, second = (_rows(rows, slice(0, mid)), _rows(rows, slice(mid, None)))
        return [(records, first, entered), (RecordColumns.empty(), second, None)]
    if entered is not None and len(entered) > 1 and not len(records) and rows is None:
        mid = len(entered) // 2
        return [
            (records, None, _entered(entered, slice(0, mid))),
            (records, None, _entered(entered, slice(mid, None))),
        ]
    return None


def _rows(rows: PeerRows, sel: slice) -> PeerRows:
    return PeerRows(
        rank=rows.rank[sel],
        step=rows.step[sel],
        layer=rows.layer[sel],
        phase=rows.phase[sel],
        wait_s=rows.wait_s[sel],
        send_bytes=rows.send_bytes[sel],
    )


def _entered(e: Entered, sel: slice) -> Entered:
    return Entered(rank=e.rank[sel], step=e.step[sel], layer=e.layer[sel], phase=e.phase[sel])
