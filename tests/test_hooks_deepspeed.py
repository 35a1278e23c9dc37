"""DeepSpeed's ``AutoEPMoELayer`` on 4 gloo ranks, instrumented with the one-line patch
over ``torch.distributed`` and ``deepspeed.comm`` (``tests/deepspeed_patch_worker.py``).

AutoEP is dropless: a count exchange (a 1-D int tensor), the payload with split sizes,
the combine. The count exchange must join the dispatch, the two patched levels must
count each call once, and the gate's bias towards rank 1 must show as its load.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from epwatch.collector.offline import OfflineRun
from epwatch.schema import RecordColumns
from tests.deepspeed_patch_worker import D_MODEL, TOKENS
from tests.patched_ranks import positions, run_ranks

P, LAYERS, STEPS, HOT = 4, 2, 30, 1

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def records() -> RecordColumns:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is a test dependency: pip install -e '.[test]'")
    args = ["--steps", str(STEPS), "--layers", str(LAYERS), "--hot-rank", str(HOT)]
    return run_ranks(
        "tests.deepspeed_patch_worker", P, args, P * STEPS * LAYERS * 2, EPWATCH_EP_GROUP="autoep"
    )


def test_count_exchange_joins_the_dispatch_and_each_call_counts_once(
    records: RecordColumns,
) -> None:
    grid = [(s, layer, ph) for s in range(STEPS) for layer in range(LAYERS) for ph in (0, 1)]
    for rank in range(P):
        assert sorted(positions(records, rank)) == grid, f"rank {rank}"
    disp = records.take(records.phase == 0)
    # every token goes to its top 2 experts: what ranks receive adds up to what they sent
    for step in range(0, STEPS, 7):
        sel = disp.step == step
        assert disp.recv_tokens[sel].sum() == 2 * TOKENS * P * LAYERS
    row = D_MODEL * 4  # float32 tokens: bytes follow the split sizes, not the buffer
    assert set((disp.recv_bytes // np.maximum(disp.recv_tokens, 1)).tolist()) == {row}


def test_the_collector_sees_the_biased_gate_as_routing(records: RecordColumns) -> None:
    run = OfflineRun("autoep", P, nodes={r: "node-a" for r in range(P)})
    run.ingest(records.take(np.argsort(records.step, kind="stable")), "node-a")
    report = run.finish()
    load = np.array(report.load_ratio)
    assert int(np.argmax(load)) == HOT and load[HOT] > 1.5, load
    routing = [s.rank for s in report.stragglers if s.cause == "routing"]
    assert routing == [HOT], report.stragglers
    assert sum(report.dropped_tokens_total) == 0  # dropless
