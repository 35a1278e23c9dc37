"""Raw bytes from an agent -> a parsed message, or a :class:`RecordError`.

The gRPC methods take raw bytes (identity deserializer) so that a garbage byte stream
becomes INVALID_ARGUMENT with a reason instead of gRPC's INTERNAL, and so that the
size limit is ours. The batch inside is decoded and validated by
:func:`epwatch.wire.decode_batch`, the same function the agent runs on hook frames.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from epwatch.names import check_name
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import MAX_COUNT, RecordError

_STATS_FIELDS = ("records_received", "records_dropped", "spool_records", "hook_records_dropped")


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


def check_header(msg: pb.AgentMessage) -> None:
    """The names and running totals every message carries: names bounded and
    label-safe, totals below 2^48 (an agent's real counters never get there; a forged
    2^64-1 would show on every dashboard)."""
    if msg.agent_id:
        check_name("agent_id", msg.agent_id)
    if msg.node:
        check_name("node", msg.node)
    if msg.HasField("stats"):
        for name in _STATS_FIELDS:
            if getattr(msg.stats, name) >= MAX_COUNT:
                raise RecordError("bad_stats", f"agent stats {name} is implausibly large")
