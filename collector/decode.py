"""Raw bytes from an agent -> a validated message, or a :class:`RecordError`.

The gRPC methods take raw bytes (identity deserializer) so that a garbage byte stream
becomes INVALID_ARGUMENT with a reason instead of gRPC's INTERNAL, and so that the
size limit is ours. Columns are ``np.frombuffer`` views and every check (those of
``epwatch.schema``, shared with the agent) is vectorised: no Python work per record on
the ingest path.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from epwatch import wire
from epwatch.schema import Entered, PeerRows, RecordColumns, RecordError
from protos import epwatch_pb2 as pb


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    ep_group: str
    world_size: int
    records: RecordColumns
    peer_rows: PeerRows | None
    entered: Entered | None


def parse_message(raw: bytes) -> pb.AgentMessage:
    """Parse an AgentMessage; garbage raises RecordError."""
    try:
        msg = pb.AgentMessage.FromString(raw)
    except DecodeError as exc:
        raise RecordError(
            "garbage", f"message of {len(raw)} bytes is not an epwatch.v1.AgentMessage"
        ) from exc
    if msg.seq and not msg.agent_id:
        raise RecordError("missing_agent_id", "a sequenced message needs an agent_id")
    return msg


def check_size(raw: bytes, max_bytes: int) -> None:
    """Our own limit, below gRPC's transport limit, so that an oversized message gets
    an INVALID_ARGUMENT (with its seq, parsed anyway) instead of a dead stream."""
    if len(raw) > max_bytes:
        raise RecordError(
            "oversized", f"message of {len(raw)} bytes exceeds the limit of {max_bytes} bytes"
        )


def decode_batch(batch: pb.RecordBatch) -> DecodedBatch:
    """Columns of a batch, fully validated (nothing of it is ingested otherwise)."""
    if not batch.ep_group:
        raise RecordError("missing_group", "batch has no ep_group")
    ws = batch.world_size
    records = wire.decode_records(batch)
    records.validate(ws)
    peer_rows = None
    if batch.HasField("peer_rows"):
        peer_rows = wire.decode_peer_rows(batch)
        peer_rows.validate(ws)
    entered = None
    if batch.HasField("entered"):
        entered = wire.decode_entered(batch)
        entered.validate(ws)
    return DecodedBatch(
        batch.ep_group,
        ws,
        records,
        peer_rows if peer_rows is not None and len(peer_rows) else None,
        entered if entered is not None and len(entered) else None,
    )
