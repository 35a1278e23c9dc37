"""The diagnosis' acceptance suite on simulated clusters with the noise real ones have
(heavy-tailed 2-5x spikes, a factor shared by every rank in a step, a slow per-rank
drift, jittered data-parallel batches): every injected fault is found with the right
rank and cause, as exactly one episode, soon after onset, with its size; clean
clusters of 1000 steps list nothing at P = 4 to 256; the fits and gamma recover the
simulator's truth. ``bench/diagnosis_suite.py`` runs the wider grid and prints
precision, recall and episodes."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from epwatch.cli.simulate import run_scenario
from epwatch.simulator.scenario import load_scenario

ONSET = 60
EXPERTS = 256
REAL_NOISE = {
    "compute": {"noise_cv": 0.10, "shared_cv": 0.10, "drift_cv": 0.005, "drift_steps": 300,
                "spike_prob": 0.003, "rank_spike_prob": 0.002},
    "attention": {"noise_cv": 0.10},
    "network": {"noise_cv": 0.05, "link_noise_cv": 0.03, "spike_prob": 0.002},
    "workload": {"rank_batch_jitter": 0.10},
}  # fmt: skip


def scenario(
    ranks: int, routing: str = "uniform", steps: int = 200, faults=(), seed: int = 0,
    noise: dict = REAL_NOISE,
):  # fmt: skip
    return load_scenario(
        {
            "seed": seed or ranks,
            "steps": steps,
            "cluster": {"ranks": ranks, "ranks_per_node": 8},
            "model": {"layers": 16, "experts": EXPERTS, "topk": 8, "hidden": 7168},
            "workload": {"batch_tokens": 64 * ranks, "batch_jitter": 0.5, "routing": routing,
                         **noise.get("workload", {})},
            "network": {"latency_us": 60, "bandwidth_gbps": 25, **noise.get("network", {})},
            "compute": {"ns_per_token": 40, **noise.get("compute", {})},
            "attention": noise.get("attention", {}),
            "faults": list(faults),
        }
    )  # fmt: skip


@functools.cache
def run(ranks: int, routing: str, fault: tuple | None, steps: int = 200, iid: bool = False):
    """One scenario's report and truth; ``iid``: the simulator's plain 5% noise."""
    faults = [dict(fault)] if fault else []
    return run_scenario(scenario(ranks, routing, steps, faults, noise={} if iid else REAL_NOISE))


def _fault(**kw) -> tuple:
    return tuple(sorted({"start_step": ONSET, **kw}.items()))


def hot_rank(expert: int, ranks: int) -> int:
    return expert // (EXPERTS // ranks)


def hot_share(load: float, ranks: int) -> float:
    """One expert's share of all slots that gives its rank ``load`` x the mean."""
    return (load - 1.0) / (ranks - 1)


def _hot(ranks: int, load: float) -> tuple:
    return _fault(kind="hot_expert", expert=EXPERTS // ranks * (ranks - 2) + 1,
                  share=hot_share(load, ranks))  # fmt: skip


CASES = [
    # (ranks, routing, fault)
    # At P = 4 with 16 layers of 10% noise a step's ratio wanders by 5%: 1.1 there.
    (4, "uniform", _fault(kind="slow_gpu", rank=1, factor=1.1)),
    *[(p, "uniform", _fault(kind="slow_gpu", rank=p // 3, factor=1.05)) for p in (16, 256)],
    (64, "zipf", _fault(kind="slow_gpu", rank=63, factor=1.05)),
    (64, "uniform", _fault(kind="slow_gpu", rank=5, factor=1.3)),
    *[(p, "uniform", _fault(kind="slow_nic", rank=p // 2 + 1, factor=1.3)) for p in (16, 256)],
    (64, "zipf", _fault(kind="slow_nic", rank=33, factor=2.0)),
    (8, "uniform", _hot(8, 1.25)),
    (256, "uniform", _hot(256, 1.25)),
    (64, "uniform", _hot(64, 1.45)),
    *[(p, "uniform", _fault(kind="batch_imbalance", rank=p // 4 + 1, factor=1.2))
      for p in (4, 64)],
    *[(p, "uniform", _fault(kind="hang", rank=p // 4, start_step=120, layer=5)) for p in (16, 256)],
]  # fmt: skip

EXPECTED_CAUSE = {
    "slow_gpu": "compute",
    "slow_nic": "network",
    "hot_expert": "routing",
    "batch_imbalance": "batch",
    "hang": "hang",
}


def _ids(case) -> str:
    p, routing, fault = case
    f = dict(fault)
    size = f.get("factor", round(f["share"] * (p - 1) + 1, 2) if "share" in f else "")
    return f"P{p}-{routing}-{f['kind']}-{size}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_injected_fault_is_found_with_rank_and_cause_as_one_episode(case) -> None:
    ranks, routing, fault = case
    f = dict(fault)
    report, _ = run(ranks, routing, fault)
    expected_rank = hot_rank(f["expert"], ranks) if f["kind"] == "hot_expert" else f["rank"]
    cause = EXPECTED_CAUSE[f["kind"]]
    found = [(s.rank, s.cause) for s in report.stragglers]
    assert found == [(expected_rank, cause)], report.stragglers  # one episode, nothing else
    straggler = report.stragglers[0]
    assert straggler.node == f"node-{expected_rank // 8}"
    assert straggler.active
    if f["kind"] == "hang":
        # The rank hung before layer 5's dispatch of step 120: its last step is 120.
        assert straggler.first_step == f["start_step"]
        return
    # Per-peer waits (network) are sampled every 10th step: fewer observations.
    late = 80 if f["kind"] == "slow_nic" else 30
    assert f["start_step"] - 10 <= straggler.first_step <= f["start_step"] + late
    # The flag opens once the evidence has held for 30 steps (hold_steps).
    assert straggler.first_step + 29 <= straggler.opened_step <= f["start_step"] + late + 120
    assert straggler.slowdown_low <= straggler.slowdown <= straggler.slowdown_high
    if f["kind"] in ("slow_gpu", "batch_imbalance"):
        assert straggler.slowdown == pytest.approx(f["factor"], rel=0.03)
    if f["kind"] == "slow_nic":  # the NIC's own slowdown, not diluted by the latency
        assert straggler.slowdown == pytest.approx(f["factor"], rel=0.1)
    if f["kind"] == "hot_expert":
        # Its load over the mean: share + (1 - share) / P of the slots, P times the mean.
        expected = (f["share"] + (1 - f["share"]) / ranks) * ranks
        assert straggler.slowdown == pytest.approx(expected, rel=0.05)


def test_a_slow_nic_at_p256_is_found_below_the_crossover() -> None:
    """The case the whole link time missed: small per-peer messages, latency-bound."""
    report, _ = run(256, "uniform", _fault(kind="slow_nic", rank=129, factor=1.3))
    assert report.phases["dispatch"].regime == "latency-bound"
    assert [(s.rank, s.cause) for s in report.stragglers] == [(129, "network")]


@pytest.mark.parametrize("ranks", [16, 64])
def test_a_slow_link_is_a_suspect_link_not_a_straggler(ranks: int) -> None:
    """Design §4: a single cell of the wait matrix far above its row and column."""
    a, b = 3, ranks - 2
    report, _ = run(ranks, "uniform", _fault(kind="slow_link", rank=a, peer=b, factor=1.3))
    assert report.stragglers == ()
    assert {(link.src, link.dst) for link in report.suspect_links} == {(a, b), (b, a)}
    for link in report.suspect_links:
        assert ONSET - 10 <= link.first_step <= ONSET + 40
        assert link.slowdown > 1.25 and link.active


CLEAN = [(4, "uniform"), (8, "zipf"), (16, "uniform"), (64, "zipf"), (256, "uniform")]


@pytest.mark.parametrize(("ranks", "routing"), CLEAN)
def test_clean_cluster_of_1000_steps_lists_no_straggler(ranks: int, routing: str) -> None:
    report, _ = run(ranks, routing, None, steps=1000)
    assert report.steps == 1000
    assert report.stragglers == ()
    assert report.suspect_links == ()


@pytest.mark.parametrize("ranks", [16, 256])
def test_hockney_fit_recovers_latency_and_bandwidth(ranks: int) -> None:
    """On the simulator's plain noise: network bursts of 2-5x bias L and BW_eff by a
    few percent (the fit's business, not the diagnosis')."""
    report, truth = run(ranks, "uniform", None, steps=1000, iid=True)
    for phase in ("dispatch", "combine"):
        fit = report.phases[phase]
        assert fit.latency_s == pytest.approx(truth.latency_s, rel=0.05), phase
        assert fit.bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=0.05), phase
        assert fit.r2 > 0.9


def test_bandwidth_fit_holds_under_zipf_routing() -> None:
    """With zipf routing the busiest receiver sets V; the bandwidth must still hold."""
    report, truth = run(64, "zipf", None, steps=1000, iid=True)
    assert report.stragglers == ()
    for phase in ("dispatch", "combine"):
        assert report.phases[phase].bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=0.05)


@pytest.mark.parametrize(
    ("ranks", "routing", "fault"),
    [
        (64, "zipf", None),
        (16, "uniform", None),
        (64, "uniform", _fault(kind="slow_gpu", rank=5, factor=1.3)),
        (64, "uniform", _hot(64, 1.45)),
    ],
)
def test_gamma_matches_the_true_straggler_factor(ranks, routing, fault) -> None:
    report, truth = run(ranks, routing, fault, steps=1000 if fault is None else 200)
    true_gamma = np.concatenate([g.ravel() for g in truth.gamma])
    assert report.gamma_median == pytest.approx(np.median(true_gamma), rel=0.02)
    assert report.gamma_p99 == pytest.approx(np.percentile(true_gamma, 99), rel=0.02)


def test_hot_expert_raises_gamma_and_skew_but_is_never_compute() -> None:
    report, _ = run(64, "uniform", _hot(64, 1.45))
    clean, _ = run(64, "zipf", None, steps=1000)
    uniform, _ = run(16, "uniform", None, steps=1000)
    assert report.skew_max > uniform.skew_max
    assert report.gamma_p99 > uniform.gamma_p99
    assert "compute" not in {s.cause for s in report.stragglers}
    assert report.balancedness < uniform.balancedness
    assert clean.stragglers == ()
