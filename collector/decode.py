"""Raw bytes from an agent -> a validated message, or a :class:`RecordError`.

The gRPC methods take raw bytes (identity deserializer) so that a garbage byte stream
becomes INVALID_ARGUMENT with a reason instead of gRPC's INTERNAL, and so that the
size limit is ours. Columns are ``np.frombuffer`` views and every check is vectorised:
no Python work per record on the ingest path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from epwatch import wire
from epwatch.schema import Entered, PeerRows, RecordColumns, RecordError
from protos import epwatch_pb2 as pb

MAX_WORLD_SIZE = 1 << 16
# Plausibility bounds beyond epwatch.schema's checks: values past these are garbage
# and would overflow the estimators' int64 keys and sums.
MAX_LAYER = 1 << 12
MAX_STEP = 1 << 44
MAX_DURATION_NS = 3600 * 10**9
MAX_COUNT = 1 << 48


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
    if ws > MAX_WORLD_SIZE:
        raise RecordError("bad_world_size", f"world_size {ws} exceeds {MAX_WORLD_SIZE}")
    records = wire.decode_records(batch)
    records.validate(ws)
    _check_records(records)
    peer_rows = None
    if batch.HasField("peer_rows"):
        peer_rows = wire.decode_peer_rows(batch)
        peer_rows.validate(ws)
        _check_keys("peer row", peer_rows.step, peer_rows.layer, peer_rows.phase)
        if peer_rows.send_bytes.size and peer_rows.send_bytes.min() < 0:
            raise RecordError("negative_count", "peer send_bytes has a negative value")
        if peer_rows.wait_s.size and peer_rows.wait_s.max() > MAX_DURATION_NS / 1e9:
            raise RecordError("duration_out_of_range", "peer wait time above an hour")
    entered = None
    if batch.HasField("entered"):
        entered = wire.decode_entered(batch)
        entered.validate(ws)
        _check_keys("heartbeat", entered.step, entered.layer, entered.phase)
    return DecodedBatch(
        batch.ep_group,
        ws,
        records,
        peer_rows if peer_rows is not None and len(peer_rows) else None,
        entered if entered is not None and len(entered) else None,
    )


def _check_keys(what: str, step: np.ndarray, layer: np.ndarray, phase: np.ndarray) -> None:
    if not len(step):
        return
    if step.min() < 0 or step.max() >= MAX_STEP:
        raise RecordError("step_out_of_range", f"{what} step outside [0, {MAX_STEP})")
    if layer.min() < 0 or layer.max() >= MAX_LAYER:
        raise RecordError("layer_out_of_range", f"{what} layer outside [0, {MAX_LAYER})")
    if phase.max() > 1:
        raise RecordError("bad_phase", f"{what} phase {int(phase.max())} is not 0 or 1")


def _check_records(r: RecordColumns) -> None:
    """Bounds that keep the estimators' arithmetic exact (validate() ran first)."""
    if not len(r):
        return
    _check_keys("record", r.step, r.layer, r.phase)
    if r.enter_ns.min() < 0:
        raise RecordError("negative_time", "enter_ns must be a non-negative clock reading")
    if (r.exit_ns - r.enter_ns).max() > MAX_DURATION_NS:
        i = int(np.argmax(r.exit_ns - r.enter_ns))
        raise RecordError(
            "duration_out_of_range",
            f"record {i} (rank {int(r.rank[i])}) lasts more than an hour",
        )
    for name in ("send_bytes", "recv_bytes", "recv_tokens"):
        if getattr(r, name).max() >= MAX_COUNT:
            raise RecordError("count_out_of_range", f"column {name!r} has an implausible value")
