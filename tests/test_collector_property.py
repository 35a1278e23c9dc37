"""Property-based: random batches and random bytes through real gRPC ``Push``.

Never a crash (only OK or INVALID_ARGUMENT), every valid batch accepted and counted,
every invalid one rejected. Validity is decided by an independent, per-record
reference check written here, not by the code under test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from epwatch.collector.service import CollectorService
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RECORD_DTYPES
from tests.helpers import raw_push, start_collector, value

pytestmark = pytest.mark.timeout(300)

FIXED_GROUP, FIXED_WS = "prop-fixed", 16
I64 = (-(1 << 63), (1 << 63) - 1)
_seq = itertools.count(1)
_group = itertools.count()


@pytest.fixture(scope="module")
def rig() -> Iterator[tuple[CollectorService, grpc.UnaryUnaryMultiCallable]]:
    svc = start_collector(max_groups=100_000)
    ch = grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}")
    push = raw_push(ch)  # hypothesis builds byte strings, valid or not
    first = pb.AgentMessage(
        agent_id="prop",
        node="n",
        seq=next(_seq),
        batch=pb.RecordBatch(ep_group=FIXED_GROUP, world_size=FIXED_WS),
    )
    push(first.SerializeToString(), timeout=5)  # the fixed group exists with P = 16
    yield svc, push
    ch.close()
    svc.stop(grace_s=0.2)


# value ranges per column: (valid range, wider range used when the column is "bad")
RANGES = {
    "rank": ((0, 15), (-3, 40)),
    "local_device": ((0, 7), (-(1 << 31), (1 << 31) - 1)),
    "step": ((0, 1 << 40), (-5, 1 << 50)),
    "layer": ((0, 60), (-5, 5000)),
    "phase": ((0, 1), (0, 255)),
    "enter_ns": ((0, 1 << 40), (-10, 1 << 40)),
    "send_bytes": ((0, 1 << 30), (-10, 1 << 50)),
    "recv_bytes": ((0, 1 << 30), (-10, 1 << 50)),
    "recv_tokens": ((0, 1 << 20), (-10, 1 << 50)),
    "dropped_tokens": ((0, 1 << 20), (-10, 1 << 50)),
}


@st.composite
def batches(draw: st.DrawFn) -> tuple[pb.RecordBatch, dict]:
    n = draw(st.integers(0, 24))
    group = draw(st.sampled_from([FIXED_GROUP, "new"]))
    ws = draw(st.sampled_from([FIXED_WS, FIXED_WS, 8, 40, 0]))
    bad = draw(st.sampled_from([None, None, None, "length", "duration", *RANGES]))
    cols: dict[str, list[int]] = {}
    for name, (good, wide) in RANGES.items():
        lo, hi = wide if bad == name else good
        if name == "rank":
            hi = min(hi, ws - 1) if bad != name else hi
            lo = min(lo, hi)
        cols[name] = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    dur_hi = (1 << 43) if bad == "duration" else 10**9
    durations = draw(
        st.lists(st.integers(-3 if bad == "duration" else 0, dur_hi), min_size=n, max_size=n)
    )
    cols["exit_ns"] = [min(e + d, I64[1]) for e, d in zip(cols["enter_ns"], durations, strict=True)]
    if bad == "length":
        victim = draw(st.sampled_from(sorted(RECORD_DTYPES)))
        cols[victim] = cols[victim] + [0] if draw(st.booleans()) or not n else cols[victim][:-1]
    batch = pb.RecordBatch(
        ep_group=group if group == FIXED_GROUP else f"prop-{next(_group)}",
        world_size=ws,
        count=n,
    )
    if bad != "dropped_tokens" and draw(st.booleans()):
        cols["dropped_tokens"] = []  # an older sender's batch: no such column
    for name, dtype in RECORD_DTYPES.items():
        setattr(batch, name, np.asarray(cols[name], dtype=dtype).tobytes())
    return batch, cols


def reference_valid(batch: pb.RecordBatch, cols: dict) -> bool:
    """An independent statement of the ingest rules, one record at a time."""
    n, ws = batch.count, batch.world_size
    if not batch.ep_group or not 1 <= ws <= 1 << 16:
        return False
    if batch.ep_group == FIXED_GROUP and ws != FIXED_WS:
        return False
    if not cols["dropped_tokens"]:  # optional: absent means 0
        cols = {**cols, "dropped_tokens": [0] * n}
    if any(len(cols[name]) != n for name in RECORD_DTYPES):
        return False
    for i in range(n):
        c = {k: v[i] for k, v in cols.items()}
        dur = c["exit_ns"] - c["enter_ns"]
        if not (
            0 <= c["rank"] < ws
            and c["phase"] in (0, 1)
            and 0 <= c["step"] < 1 << 44
            and 0 <= c["layer"] < 1 << 12
            and c["enter_ns"] >= 0
            and 0 <= dur <= 3600 * 10**9
            and all(
                0 <= c[k] < 1 << 48
                for k in ("send_bytes", "recv_bytes", "recv_tokens", "dropped_tokens")
            )
        ):
            return False
    return True


def push(rig, message: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        ack = rig[1](message, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details()
    assert ack.code == 0
    return grpc.StatusCode.OK, ""


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_random_batches(rig, case: tuple[pb.RecordBatch, dict]) -> None:
    batch, cols = case
    svc = rig[0]
    before = value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group=batch.ep_group)
    msg = pb.AgentMessage(agent_id="prop", node="n", seq=next(_seq), batch=batch)
    code, details = push(rig, msg.SerializeToString())
    valid = reference_valid(batch, cols)
    event("valid" if valid else "invalid")
    if valid:
        assert code == grpc.StatusCode.OK, details
        after = value(svc.metrics_text(), "epwatch_ingest_records_total", ep_group=batch.ep_group)
        assert (after or 0) - (before or 0) == batch.count
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details and ":" in details


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(rig, data: bytes) -> None:
    code, details = push(rig, data)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=16, max_size=16))
def test_peer_wait_rows_must_be_finite_and_plausible(rig, waits: list[float]) -> None:
    rows = pb.PeerRows(
        count=1,
        rank=np.zeros(1, "<i4").tobytes(),
        step=np.zeros(1, "<i8").tobytes(),
        layer=np.zeros(1, "<i4").tobytes(),
        phase=np.zeros(1, "<u1").tobytes(),
        wait_s=np.asarray(waits, "<f8").tobytes(),
    )
    batch = pb.RecordBatch(ep_group=FIXED_GROUP, world_size=FIXED_WS, peer_rows=rows)
    msg = pb.AgentMessage(agent_id="prop", node="n", seq=next(_seq), batch=batch)
    code, _ = push(rig, msg.SerializeToString())
    ok = all(math.isfinite(w) and 0 <= w <= 3600 for w in waits)
    assert code == (grpc.StatusCode.OK if ok else grpc.StatusCode.INVALID_ARGUMENT)
