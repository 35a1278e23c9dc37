"""The foundation's acceptance suite: every injected fault is found with the right rank
and cause, soon after onset; clean clusters list no straggler; the fits and gamma
recover the simulator's truth."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from epwatch.cli.simulate import run_scenario
from epwatch.simulator.scenario import load_scenario

ONSET = 60
EXPERTS = 256


def scenario(ranks: int, routing: str = "uniform", steps: int = 200, faults=(), seed: int = 0):
    return load_scenario(
        {
            "seed": seed or ranks,
            "steps": steps,
            "cluster": {"ranks": ranks, "ranks_per_node": 8},
            "model": {"layers": 24, "experts": EXPERTS, "topk": 8, "hidden": 7168},
            "workload": {"batch_tokens": 64 * ranks, "batch_jitter": 0.8, "routing": routing},
            "network": {"latency_us": 60, "bandwidth_gbps": 25, "noise_cv": 0.05},
            "compute": {"ns_per_token": 40, "noise_cv": 0.05},
            "faults": list(faults),
        }
    )


@functools.cache
def run(ranks: int, routing: str, fault: tuple | None, steps: int = 200):
    faults = [dict(fault)] if fault else []
    return run_scenario(scenario(ranks, routing, steps, faults))


def _fault(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def hot_rank(expert: int, ranks: int) -> int:
    return expert // (EXPERTS // ranks)


CASES = [
    # (ranks, routing, fault, expected rank, expected cause)
    *[
        (p, "uniform", _fault(kind="slow_gpu", rank=p // 3, start_step=ONSET, factor=1.05))
        for p in (16, 64, 256)
    ],
    (64, "uniform", _fault(kind="slow_gpu", rank=5, start_step=ONSET, factor=1.3)),
    *[
        (p, "zipf", _fault(kind="slow_gpu", rank=p - 1, start_step=ONSET, factor=1.05))
        for p in (16, 64, 256)
    ],
    *[
        (p, r, _fault(kind="slow_nic", rank=p // 2 + 1, start_step=ONSET, factor=2.0))
        for p, r in ((16, "uniform"), (64, "uniform"), (256, "uniform"), (64, "zipf"))
    ],
    *[
        (p, r, _fault(kind="hot_expert", expert=37, share=0.05, start_step=ONSET))
        for p, r in ((16, "uniform"), (64, "uniform"), (256, "uniform"), (64, "zipf"))
    ],
    *[
        (p, r, _fault(kind="hang", rank=p // 4, start_step=120, layer=5))
        for p, r in ((16, "uniform"), (64, "uniform"), (256, "uniform"), (64, "zipf"))
    ],
]

EXPECTED_CAUSE = {
    "slow_gpu": "compute",
    "slow_nic": "network",
    "hot_expert": "routing",
    "hang": "hang",
}


def _ids(case) -> str:
    p, routing, fault = case
    f = dict(fault)
    return f"P{p}-{routing}-{f['kind']}-{f.get('factor', f.get('share', ''))}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_injected_fault_is_found_with_rank_and_cause(case) -> None:
    ranks, routing, fault = case
    f = dict(fault)
    report, _ = run(ranks, routing, fault)
    expected_rank = hot_rank(f["expert"], ranks) if f["kind"] == "hot_expert" else f["rank"]
    cause = EXPECTED_CAUSE[f["kind"]]
    found = [(s.rank, s.cause) for s in report.stragglers]
    assert found == [(expected_rank, cause)], report.stragglers
    straggler = report.stragglers[0]
    assert straggler.node == f"node-{expected_rank // 8}"
    if f["kind"] == "hang":
        # The rank hung before layer 5's dispatch of step 120: its last step is 120.
        assert straggler.first_step == f["start_step"]
    else:
        assert f["start_step"] <= straggler.first_step <= f["start_step"] + 30
    if f["kind"] == "slow_gpu":
        assert straggler.slowdown == pytest.approx(f["factor"], rel=0.02)
    if f["kind"] == "slow_nic":
        assert straggler.slowdown > 1.3
    if f["kind"] == "hot_expert" and routing == "uniform":
        # Its load over the mean: share + (1 - share) / P of the slots, P times the mean.
        expected = (f["share"] + (1 - f["share"]) / ranks) * ranks
        assert straggler.slowdown == pytest.approx(expected, rel=0.05)
    if f["kind"] == "hot_expert":
        assert straggler.slowdown > 1.5


@pytest.mark.parametrize("ranks", [16, 64, 256])
@pytest.mark.parametrize("routing", ["uniform", "zipf"])
def test_clean_cluster_of_1000_steps_lists_no_straggler(ranks: int, routing: str) -> None:
    report, _ = run(ranks, routing, None, steps=1000)
    assert report.steps == 1000
    assert report.stragglers == ()
    assert report.suspect_links == ()


@pytest.mark.parametrize("ranks", [16, 64, 256])
def test_hockney_fit_recovers_latency_and_bandwidth(ranks: int) -> None:
    report, truth = run(ranks, "uniform", None, steps=1000)
    for phase in ("dispatch", "combine"):
        fit = report.phases[phase]
        assert fit.latency_s == pytest.approx(truth.latency_s, rel=0.05), phase
        assert fit.bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=0.05), phase
        assert fit.r2 > 0.9


@pytest.mark.parametrize("ranks", [16, 64, 256])
def test_bandwidth_fit_holds_under_zipf_routing(ranks: int) -> None:
    """With zipf routing the busiest receiver sets V; the bandwidth must still hold."""
    report, truth = run(ranks, "zipf", None, steps=1000)
    for phase in ("dispatch", "combine"):
        assert report.phases[phase].bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=0.05)


@pytest.mark.parametrize(
    ("ranks", "routing", "fault"),
    [
        (64, "uniform", None),
        (16, "zipf", None),
        (64, "uniform", _fault(kind="slow_gpu", rank=5, start_step=ONSET, factor=1.3)),
        (64, "uniform", _fault(kind="hot_expert", expert=37, share=0.05, start_step=ONSET)),
    ],
)
def test_gamma_matches_the_true_straggler_factor(ranks, routing, fault) -> None:
    report, truth = run(ranks, routing, fault, steps=1000 if fault is None else 200)
    true_gamma = np.concatenate([g.ravel() for g in truth.gamma])
    assert report.gamma_median == pytest.approx(np.median(true_gamma), rel=0.02)
    assert report.gamma_p99 == pytest.approx(np.percentile(true_gamma, 99), rel=0.02)


def test_hot_expert_raises_gamma_and_skew_but_is_never_compute() -> None:
    report, _ = run(
        64, "uniform", _fault(kind="hot_expert", expert=37, share=0.05, start_step=ONSET)
    )
    clean, _ = run(64, "uniform", None, steps=1000)
    assert report.skew_max > 3 * clean.skew_max
    assert report.gamma_p99 > clean.gamma_p99
    assert "compute" not in {s.cause for s in report.stragglers}
    assert report.balancedness < clean.balancedness


@pytest.mark.parametrize("ranks", [16, 64])
def test_a_slow_link_is_a_suspect_link_not_a_straggler(ranks: int) -> None:
    """Design §4: a single cell of the wait matrix far above its row and column."""
    a, b = 3, ranks - 2
    report, _ = run(ranks, "uniform", _fault(kind="slow_link", rank=a, peer=b, factor=2.5,
                                             start_step=ONSET))  # fmt: skip
    assert report.stragglers == ()
    assert {(link.src, link.dst) for link in report.suspect_links} == {(a, b), (b, a)}
    for link in report.suspect_links:
        assert ONSET <= link.first_step <= ONSET + 30
        assert link.slowdown == pytest.approx(2.5, rel=0.1)
