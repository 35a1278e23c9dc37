"""fairscale's GShard ``MOELayer`` on 4 gloo ranks, instrumented with the one-line patch
(``tests/fairscale_patch_worker.py``); the records go to a stand-in agent socket and then
through the collector's own estimators.

The gate favours rank 2's expert: fairscale keeps at most 2 S / E slots per source and
expert, so that rank's received rows are capped and only the drops the workers report
show how hot it is.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from epwatch.collector.offline import OfflineRun
from epwatch.schema import RecordColumns
from tests.fairscale_patch_worker import TOKENS
from tests.patched_ranks import positions, run_ranks

P, LAYERS, STEPS, HOT = 4, 2, 40, 2
CAPACITY = 2 * TOKENS // P  # slots per source and expert

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def records() -> RecordColumns:
    if importlib.util.find_spec("fairscale") is None:
        pytest.fail("fairscale is a test dependency: pip install -e '.[test]'")
    args = ["--steps", str(STEPS), "--layers", str(LAYERS), "--hot-rank", str(HOT)]
    expected = P * STEPS * LAYERS * 2
    return run_ranks(
        "tests.fairscale_patch_worker", P, args, expected, EPWATCH_EP_GROUP="fairscale"
    )


def test_every_rank_records_every_layer_dispatch_then_combine(records: RecordColumns) -> None:
    grid = {(s, layer, ph) for s in range(STEPS) for layer in range(LAYERS) for ph in (0, 1)}
    for rank in range(P):
        got = positions(records, rank)
        assert len(got) == len(grid) and set(got) == grid, f"rank {rank}"
        mine = records.take(records.rank == rank)
        # on each rank's own clock the combine starts after its dispatch ended
        order = np.lexsort((mine.phase, mine.layer, mine.step))
        enter, exit_ = mine.enter_ns[order].reshape(-1, 2), mine.exit_ns[order].reshape(-1, 2)
        assert (exit_[:, 0] <= enter[:, 1]).all()
        assert (mine.exit_ns >= mine.enter_ns).all()


def test_capacity_slabs_count_routed_rows_not_experts(records: RecordColumns) -> None:
    disp = records.take(records.phase == 0)
    slab_bytes = P * CAPACITY * 32 * 4  # [E, C, M] float32, whatever is routed
    assert set(disp.send_bytes.tolist()) == {slab_bytes}
    assert set(disp.recv_bytes.tolist()) == {slab_bytes}
    tokens = disp.recv_tokens
    assert tokens.min() > P and tokens.max() <= P * CAPACITY  # not E = 4 rows
    hot = disp.take(disp.rank == HOT)
    assert np.median(hot.recv_tokens) == P * CAPACITY  # full: every source hit capacity
    assert (hot.dropped_tokens > 0).mean() > 0.9
    cold = disp.take(disp.rank != HOT)
    assert np.median(cold.recv_tokens) < 0.8 * P * CAPACITY
    assert (cold.dropped_tokens == 0).mean() > 0.9


def test_the_collector_sees_the_biased_gate_as_routing_with_drops(
    records: RecordColumns,
) -> None:
    run = OfflineRun("fairscale", P, nodes={r: "node-a" for r in range(P)})
    run.ingest(records.take(np.argsort(records.step, kind="stable")), "node-a")
    report = run.finish()
    assert report.steps == STEPS
    load = np.array(report.load_ratio)
    assert int(np.argmax(load)) == HOT and load[HOT] > 1.5, load
    assert (np.delete(load, HOT) < 1.0).all(), load
    kept = records.take(records.phase == 0)
    kept_ratio = np.median(kept.recv_tokens[kept.rank == HOT]) / kept.recv_tokens.mean()
    assert kept_ratio < 1.5  # the received rows alone would not have shown it
    routing = [s for s in report.stragglers if s.cause == "routing"]
    assert [s.rank for s in routing] == [HOT], report.stragglers
    line = routing[0].evidence[0]
    assert line.startswith(f"rank {HOT} dropped ") and f"(capacity {P * CAPACITY})" in line
    assert report.dropped_fraction[HOT] > 0.2 and report.dropped_tokens_total[HOT] > 0
    assert all(report.dropped_fraction[r] == 0 for r in range(P) if r != HOT)
    # Equal [E, C, M] slabs on every call: the Hockney fit has nothing to separate.
    dispatch = report.phases["dispatch"]
    assert dispatch.regime == "unknown" and "too uniform" in dispatch.fit_problem
