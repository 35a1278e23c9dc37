"""Counter mode in the collector: interval records through ingest, wire-schema gating,
and the attribution rules on hand-built wait matrices (each cause's signature)."""

from __future__ import annotations

import numpy as np
import pytest

from epwatch import wire
from epwatch.collector.estimators import EstimatorConfig, GroupEstimator
from epwatch.collector.estimators.counters import CounterMode
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import IntervalColumns, RecordError
from tests.test_collector_ingest import Rig

P, E = 8, 2


def interval_rows(
    wait_d: np.ndarray,
    wait_c: np.ndarray | None = None,
    tokens: np.ndarray | None = None,
    step: int = 10,
    t0_ns: int = 1_000_000_000,
    seconds: float = 0.25,
) -> IntervalColumns:
    """One interval per rank: ``wait_d[i, j]`` seconds rank i waited for j."""
    n = wait_d.shape[0]
    return IntervalColumns.from_arrays(
        P,
        E,
        rank=np.arange(n),
        start_ns=np.full(n, t0_ns),
        end_ns=np.full(n, t0_ns + int(seconds * 1e9)),
        step=np.full(n, step),
        dispatch_wait_s=wait_d,
        combine_wait_s=wait_d if wait_c is None else wait_c,
        expert_tokens=np.full((n, E), 100) if tokens is None else tokens,
    )


def message(rows: IntervalColumns, seq: int = 1, schema: int = wire.INTERVALS_SCHEMA) -> bytes:
    msg = pb.AgentMessage(
        agent_id="a",
        node="n0",
        seq=seq,
        intervals=wire.encode_intervals("cg", P, rows),
        schema=schema,
    )
    return msg.SerializeToString()


def healthy(rng: np.random.Generator, scale: float = 1e-3) -> np.ndarray:
    w = scale * rng.lognormal(0.0, 0.1, (P, P))
    np.fill_diagonal(w, 0.0)
    return w


def test_interval_batch_round_trip_and_validation() -> None:
    rows = interval_rows(healthy(np.random.default_rng(0)))
    back = wire.decode_intervals(wire.encode_intervals("cg", P, rows))
    np.testing.assert_array_equal(back.dispatch_wait_s, rows.dispatch_wait_s)
    assert back.local_experts == E and back.step.tolist() == [10] * P
    bad = wire.encode_intervals("cg", P, rows)
    bad.end_ns = np.full(P, 5, np.int64).tobytes()  # ends before it starts
    with pytest.raises(RecordError, match="ends before"):
        wire.decode_intervals(bad)
    wrapped = wire.encode_intervals("cg", P, rows)
    wrapped.start_ns = np.full(P, (1 << 63) - 1, np.int64).tobytes()  # no int64 wrap-around
    with pytest.raises(RecordError):
        wire.decode_intervals(wrapped)
    short = wire.encode_intervals("cg", P, rows)
    short.expert_tokens = short.expert_tokens[:-8]
    with pytest.raises(RecordError, match="expert_tokens"):
        wire.decode_intervals(short)


def test_ingest_accepts_intervals_and_refuses_what_it_does_not_speak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    rows = interval_rows(healthy(np.random.default_rng(1)))
    assert rig.ingestor.handle(message(rows, seq=1)).code == 0
    assert "epwatch_ingest_intervals_total" in rig.text()
    newer = rig.ingestor.handle(message(rows, seq=2, schema=wire.SCHEMA + 1))
    assert (newer.code, newer.reason) == (3, "unsupported_schema")
    # A payload field this collector does not know (what a newer agent might send).
    raw = pb.AgentMessage(agent_id="a", node="n0", seq=3).SerializeToString()
    unknown = rig.ingestor.handle(raw + bytes([(12 << 3) | 2, 2, 1, 2]))
    assert (unknown.code, unknown.reason) == (3, "unsupported_payload")
    # What a collector that speaks only schema 1 does with counter-mode records.
    monkeypatch.setattr(wire, "SCHEMA", 1)
    older = rig.ingestor.handle(message(rows, seq=4))
    assert older.code == 3 and "upgrade the collector" in older.message


def run_counters(
    make: callable, ticks: int = 30, hang_after_s: float = 5.0, seed: int = 7
) -> GroupEstimator:
    rng = np.random.default_rng(seed)
    est = GroupEstimator("cg", P, EstimatorConfig(hang_after_s=hang_after_s), clock=lambda: 0.0)
    for k in range(ticks):
        est.ingest_intervals(make(rng, k), "n0", now_s=0.0)
        est.update(now_s=0.0)
    return est


def flags(est: GroupEstimator) -> set[tuple[int, str]]:
    return {(s.rank, s.cause) for s in est.report(include_closed=True).stragglers}


def test_a_slow_sender_and_receiver_is_network() -> None:
    def make(rng: np.random.Generator, k: int) -> IntervalColumns:
        w = healthy(rng)
        w[:, 3] *= 1.6  # everyone waits longer for rank 3's data ...
        w[3, :] *= 1.6  # ... and rank 3 for everyone's: its NIC, both ways
        np.fill_diagonal(w, 0.0)
        return interval_rows(w, step=10 * k, t0_ns=10**9 + k * 250_000_000)

    est = run_counters(make)
    assert flags(est) == {(3, "network")}
    assert est.report().mode == "counters"


def test_late_into_combine_only_is_compute_and_a_hot_expert_is_routing() -> None:
    def make(rng: np.random.Generator, k: int) -> IntervalColumns:
        # Decode spends much of its time waiting: 50 ms per source and interval.
        wd, wc = healthy(rng, 0.05), healthy(rng, 0.05)
        wc[:, 5] *= 2.0  # peers wait for rank 5's expert output ...
        wc[5, :] *= 0.1  # ... because it arrives late into combine
        tokens = np.full((P, E), 100)
        tokens[2, 1] = 700  # rank 2's second expert is hot
        np.fill_diagonal(wd, 0.0)
        np.fill_diagonal(wc, 0.0)
        return interval_rows(wd, wc, tokens, step=10 * k, t0_ns=10**9 + k * 250_000_000)

    est = run_counters(make)
    assert flags(est) == {(5, "compute"), (2, "routing")}
    routing = next(s for s in est.report().stragglers if s.cause == "routing")
    assert routing.evidence[0].startswith(f"hot expert {2 * E + 1}:")


def test_a_stall_is_pinned_on_the_rank_whose_step_counter_stays_behind() -> None:
    def make(rng: np.random.Generator, k: int) -> IntervalColumns:
        frozen = k >= 10
        w = np.zeros((P, P)) if frozen else healthy(rng)
        tokens = np.zeros((P, E)) if frozen else None
        rows = interval_rows(w, None, tokens, step=min(k, 10), t0_ns=10**9 + k * 500_000_000,
                             seconds=0.5)  # fmt: skip
        if frozen:
            rows.step[6] = 9  # rank 6 never started step 10
        return rows

    est = run_counters(make, ticks=30, hang_after_s=3.0)
    assert flags(est) == {(6, "hang")}


def test_memory_is_checked_before_counter_mode_allocates() -> None:
    mode = CounterMode(4096, EstimatorConfig(buffer_bytes=64 << 20))
    rows = IntervalColumns.from_arrays(
        4096, 1, rank=[0], start_ns=[1], end_ns=[2], step=[0],
        dispatch_wait_s=np.zeros((1, 4096)), combine_wait_s=np.zeros((1, 4096)),
        expert_tokens=np.zeros((1, 1)),
    )  # fmt: skip
    with pytest.raises(RecordError, match="budget"):
        mode.ingest(rows, 0.0)


def test_a_network_flag_clears_once_the_nic_recovers_on_the_ranks_own_clocks() -> None:
    """Clearing needs clear_seconds of the run's time, measured by the intervals' own
    clocks: a flag that opened must close again when the rank is healthy."""
    rng = np.random.default_rng(3)
    est = GroupEstimator("cg", P, EstimatorConfig(), clock=lambda: 0.0)
    for k in range(160):
        w = healthy(rng, 0.05)
        if 10 <= k < 60:
            w[:, 3] *= 1.6
            w[3, :] *= 1.6
        np.fill_diagonal(w, 0.0)
        est.ingest_intervals(interval_rows(w, step=5 * k, t0_ns=10**9 + k * 250_000_000), "n0")
        est.update(now_s=0.0)
    (flag,) = est.report(include_closed=True).stragglers
    assert (flag.rank, flag.cause, flag.active) == (3, "network", False)
    assert 45 <= flag.first_step <= 60 and flag.last_step >= 5 * 60
    assert est.counter_mode is not None and est.counter_mode.run_time_s == pytest.approx(
        160 * 0.25, rel=0.05
    )


def test_no_local_experts_is_refused_before_anything_is_kept() -> None:
    rows = interval_rows(healthy(np.random.default_rng(2)))
    msg = wire.encode_intervals("cg", P, rows)
    msg.local_experts = 0
    msg.expert_tokens = b""
    with pytest.raises(RecordError, match="local experts"):
        wire.decode_intervals(msg)


def test_an_engine_restart_starts_the_step_counters_again() -> None:
    est = GroupEstimator("cg", P, EstimatorConfig(), clock=lambda: 0.0)
    rng = np.random.default_rng(4)
    for k, step in enumerate([100, 105, 110, 3, 8]):  # the engine restarted after 110
        est.ingest_intervals(interval_rows(healthy(rng), step=step, t0_ns=10**9 + k * 10**9))
    assert est.counter_mode is not None
    assert est.counter_mode.newest_step == 7  # steps started 8: the newest is step 7
    assert est.report().last_step == 7


def test_counter_mode_memory_counts_against_the_group_and_the_collector() -> None:
    """A group's counter mode (2 P x P accumulators and a pass's matrices) is part of
    what the group holds, and the collector-wide budget refuses what does not fit."""
    from epwatch.collector.groups import GroupTable

    cfg = EstimatorConfig()
    assembly = GroupEstimator("x", 1024, cfg).memory_bytes
    need = CounterMode.bytes_needed(1024, 8)
    assert need >= 8 * 1024 * 1024 * 8
    # Room for two groups' assembly and one group's counter mode, not two.
    budget = 2 * assembly + need + need // 2
    table = GroupTable(lambda g, ws: GroupEstimator(g, ws, cfg), memory_budget=budget)
    group = table.get("cg", 1024)
    before = group.memory_bytes
    assert group.estimator.counter_bytes_needed(8) == need
    table.make_room(group, need)
    rows = IntervalColumns.from_arrays(
        1024, 8, rank=[0], start_ns=[1], end_ns=[2], step=[1],
        dispatch_wait_s=np.zeros((1, 1024)), combine_wait_s=np.zeros((1, 1024)),
        expert_tokens=np.zeros((1, 8)),
    )  # fmt: skip
    group.estimator.ingest_intervals(rows, "n0", 0.0)
    assert group.memory_bytes == before + need
    assert group.estimator.counter_bytes_needed(8) == 0  # started: nothing more
    other = table.get("cg2", 1024)
    with pytest.raises(RecordError, match="counter mode needs"):
        table.make_room(other, other.estimator.counter_bytes_needed(8))


def test_a_counter_mode_group_is_established_without_completing_a_step() -> None:
    from epwatch.collector.groups import Group

    est = GroupEstimator("cg", P, EstimatorConfig(), clock=lambda: 0.0)
    est.ingest_intervals(interval_rows(healthy(np.random.default_rng(5))), "n0")
    est.update(now_s=0.0)
    group = Group("cg", P, est, report=est.report())
    assert group.report is not None and group.report.steps == 0
    assert group.established
