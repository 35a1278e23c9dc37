"""Raw bytes from an agent -> a parsed message, or a :class:`RecordError`.

The gRPC methods take raw bytes (identity deserializer) so that a garbage byte stream
becomes INVALID_ARGUMENT with a reason instead of gRPC's INTERNAL, and so that the
size limit is ours. The batch inside is decoded and validated by
:func:`epwatch.wire.decode_batch`, the same function the agent runs on hook frames.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RecordError


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
