"""Columns <-> protobuf, the agent's header+payload concatenation, and hook framing."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from epwatch import wire
from epwatch.frames import FrameError, encode_frame, hook_frame, read_frame
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import Entered, PeerRows, RecordError
from tests.helpers import make_records


def test_records_round_trip() -> None:
    records = make_records(100, world_size=8)
    batch = wire.encode_records("g", 8, records)
    back = wire.decode_records(pb.RecordBatch.FromString(batch.SerializeToString()))
    for name, arr in records.as_dict().items():
        np.testing.assert_array_equal(getattr(back, name), arr)


def test_peer_rows_and_entered_round_trip() -> None:
    p = 4
    rows = PeerRows(
        rank=np.array([0, 1], np.int32),
        step=np.array([3, 3], np.int64),
        layer=np.array([0, 0], np.int32),
        phase=np.array([0, 0], np.uint8),
        wait_s=np.arange(8, dtype=np.float64).reshape(2, 4),
        send_bytes=np.arange(8, dtype=np.int64).reshape(2, 4),
    )
    entered = Entered(
        rank=np.arange(4, dtype=np.int32),
        step=np.full(4, 9, np.int64),
        layer=np.full(4, 2, np.int32),
        phase=np.ones(4, np.uint8),
    )
    batch = wire.encode_records("g", p, make_records(0, p), rows, entered)
    batch = pb.RecordBatch.FromString(batch.SerializeToString())
    np.testing.assert_array_equal(wire.decode_peer_rows(batch).wait_s, rows.wait_s)
    np.testing.assert_array_equal(wire.decode_entered(batch).step, entered.step)


def test_dropped_tokens_travel_when_set_and_older_senders_mean_zero() -> None:
    plain = make_records(6, world_size=4)
    batch = wire.encode_records("g", 4, plain)
    assert not batch.dropped_tokens  # all zero: left out, as an older sender's batch
    assert wire.decode_batch(batch).records.dropped_tokens.tolist() == [0] * 6
    older = pb.RecordBatch.FromString(batch.SerializeToString())
    older.ClearField("dropped_tokens")
    assert wire.decode_records(older).dropped_tokens.dtype == np.dtype("<i8")

    dropped = np.array([0, 5, 0, 0, 7, 0])
    records = type(plain)(**{**plain.as_dict(), "dropped_tokens": dropped})
    back = wire.decode_batch(pb.RecordBatch.FromString(
        wire.encode_records("g", 4, records).SerializeToString()
    ))  # fmt: skip
    assert back.records.dropped_tokens.tolist() == dropped.tolist()

    short = wire.encode_records("g", 4, records)
    short.dropped_tokens = short.dropped_tokens[:8]
    with pytest.raises(RecordError) as err:
        wire.decode_batch(short)
    assert err.value.reason == "length_mismatch"
    negative = type(plain)(**{**plain.as_dict(), "dropped_tokens": -dropped})
    with pytest.raises(RecordError) as err:
        wire.decode_batch(wire.encode_records("g", 4, negative))
    assert err.value.reason == "negative_count"


def test_length_mismatch_is_a_record_error() -> None:
    batch = wire.encode_records("g", 8, make_records(10, 8))
    batch.count = 11
    with pytest.raises(RecordError) as err:
        wire.decode_records(batch)
    assert err.value.reason == "length_mismatch"


def test_header_and_payload_concatenate_into_one_message() -> None:
    """The agent serializes a batch once and prepends a small header per send."""
    payload = pb.AgentMessage(batch=wire.encode_records("g", 8, make_records(5, 8)))
    header = pb.AgentMessage(agent_id="a", node="n", seq=7, stats=pb.AgentStats(spool_records=3))
    msg = pb.AgentMessage.FromString(header.SerializeToString() + payload.SerializeToString())
    assert (msg.agent_id, msg.node, msg.seq, msg.stats.spool_records) == ("a", "n", 7, 3)
    assert msg.batch.count == 5 and msg.WhichOneof("payload") == "batch"


def test_frames_over_a_socket_pair() -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = hook_frame("g", 8, make_records(3, 8), pid=42, hook_records_dropped=5)
        a.sendall(frame + encode_frame(b"") + frame[:6])
        a.shutdown(socket.SHUT_WR)
        msg = pb.AgentMessage.FromString(read_frame(b) or b"")
        assert msg.agent_id == "hook:42" and msg.seq == 0
        assert msg.stats.hook_records_dropped == 5 and msg.batch.count == 3
        assert read_frame(b) == b""
        with pytest.raises(FrameError) as err:
            read_frame(b)
        assert err.value.reason == "truncated"


def test_oversized_frame_is_refused_before_reading_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall((1 << 30).to_bytes(4, "little"))
        with pytest.raises(FrameError) as err:
            read_frame(b, max_bytes=1 << 20)
        assert err.value.reason == "oversized"
