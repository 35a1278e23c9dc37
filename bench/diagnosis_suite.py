"""Precision, recall, flag episodes and time to detect of the diagnosis, over clean and
faulty simulated clusters at P in {4, 8, 16, 64, 256}.

Each scenario runs through a group's estimators with the live collector's defaults
(``EstimatorConfig()``), one step at a time as a collector sees them; the estimators
pass and the set of active flags is read every ``UPDATE_EVERY`` steps. An *episode*
is one opening of a flag for a (rank, cause) (or a suspect link); a flag that opens
and clears ten times is ten episodes. Two noise profiles:

* ``iid``: the simulator's defaults, independent 5% lognormal noise;
* ``real``: what real clusters add: 10% independent noise, a 10% factor shared by
  every rank in a step, a slow 1% per-rank drift, 2-5x spikes on 0.3% of
  (step, layer, rank) and on 0.2% of whole rank-steps, network bursts, a 10% spread
  of the ranks' own batches, and zipf(s=1) routing in the clean runs.

Faults start at step 100 of 400 (clean runs: 1000 steps):

* ``slow_gpu`` x1.05 and x1.3 (cause ``compute``), also x1.05 under zipf routing;
* ``slow_nic`` x1.3 (``network``), per-peer messages below the crossover at P = 256;
* ``hot_expert`` at 1.25x and 1.45x the mean load on its rank (``routing``);
* ``batch_imbalance`` x1.2 (``batch``: the rank's data-parallel batch);
* ``slow_link`` x1.3 between two ranks (a suspect link, no rank);
* ``hang`` (offline, the hang shows at the end of the run; its timing is tested live).

Precision counts flagged (rank, cause) pairs: the expected one is right, any other is
wrong. Time to detect is the step (and simulated seconds) at which the right flag
first opened, after the onset. Prints one table row per run, a summary per fault, and
the summary as JSON on the last line.

    .venv/bin/python bench/diagnosis_suite.py [--quick] [--ranks 4 16] [--profile real]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from epwatch.cli.simulate import feed_counter_reads
from epwatch.collector.estimators import EstimatorConfig
from epwatch.collector.offline import OfflineRun
from epwatch.simulator.counters import CounterStream
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import load_scenario

RANKS = (4, 8, 16, 64, 256)
ONSET, FAULT_STEPS, CLEAN_STEPS = 100, 400, 1000
EXPERTS, LAYERS = 256, 16
UPDATE_EVERY = 4  # steps between estimator passes (and flag readings)

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "iid": {},
    "real": {
        "compute": {
            "noise_cv": 0.10,
            "shared_cv": 0.10,
            "drift_cv": 0.005,
            "drift_steps": 300,
            "spike_prob": 0.003,
            "rank_spike_prob": 0.002,
        },
        "attention": {"noise_cv": 0.10},
        "network": {"noise_cv": 0.05, "link_noise_cv": 0.03, "spike_prob": 0.002},
        "workload": {"rank_batch_jitter": 0.10},
    },
}

EXPECTED_CAUSE = {
    "slow_gpu": "compute",
    "slow_nic": "network",
    "hot_expert": "routing",
    "batch_imbalance": "batch",
    "hang": "hang",
    "slow_link": "link",
}


def hot_share(load: float, ranks: int) -> float:
    """The share of all slots one expert must get for its rank to carry ``load`` times
    the mean (uniform routing): load = share * P + (1 - share)."""
    return (load - 1.0) / (ranks - 1)


def faults(p: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, routing, fault) for P ranks."""
    hot = EXPERTS // p * (p - 2)  # an expert of rank P - 2
    return [
        ("slow_gpu x1.05", "uniform", {"kind": "slow_gpu", "rank": p // 3, "factor": 1.05}),
        ("slow_gpu x1.05 zipf", "zipf", {"kind": "slow_gpu", "rank": p - 1, "factor": 1.05}),
        ("slow_gpu x1.3", "uniform", {"kind": "slow_gpu", "rank": 1, "factor": 1.3}),
        ("slow_nic x1.3", "uniform", {"kind": "slow_nic", "rank": p // 2 + 1, "factor": 1.3}),
        ("hot_expert 1.25x", "uniform",
         {"kind": "hot_expert", "expert": hot, "share": hot_share(1.25, p)}),
        ("hot_expert 1.45x", "uniform",
         {"kind": "hot_expert", "expert": hot, "share": hot_share(1.45, p)}),
        ("batch_imbalance x1.2", "uniform",
         {"kind": "batch_imbalance", "rank": p // 4 + 1, "factor": 1.2}),
        ("slow_link x1.3", "uniform",
         {"kind": "slow_link", "rank": 1, "peer": p - 1, "factor": 1.3}),
        ("hang", "uniform", {"kind": "hang", "rank": p // 4, "layer": 5,
                             "start_step": FAULT_STEPS - 100}),
    ]  # fmt: skip


def scenario(
    p: int,
    profile: str,
    routing: str,
    steps: int,
    fault: dict | None,
    seed: int,
    probe: str = "records",
):
    noise = PROFILES[profile]
    data: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "cluster": {"ranks": p, "ranks_per_node": 8},
        "model": {"layers": LAYERS, "experts": EXPERTS, "topk": 8, "hidden": 7168},
        "workload": {"batch_tokens": 64 * p, "batch_jitter": 0.5, "routing": routing,
                     "zipf_s": 1.0, **noise.get("workload", {})},
        "network": {"latency_us": 60, "bandwidth_gbps": 25, **noise.get("network", {})},
        "compute": {"ns_per_token": 40, **noise.get("compute", {})},
        "attention": noise.get("attention", {}),
        "probe": {"mode": probe},
        "faults": [] if fault is None else [{"start_step": ONSET, **fault}],
    }  # fmt: skip
    return load_scenario(data)


@dataclass
class Outcome:
    """What the diagnosis said over one run, step by step."""

    episodes: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))
    first_seen: dict[tuple, int] = field(default_factory=dict)
    step_time_s: dict[int, float] = field(default_factory=dict)
    regime: str = "?"
    wall_s: float = 0.0


def diagnose(sc: Any) -> Outcome:
    """Feed the run step by step and note every flag as it opens."""
    sim = Simulation(sc)
    P = sc.cluster.ranks
    run = OfflineRun(sc.cluster.ep_group, P, EstimatorConfig(),
                     nodes={r: sc.node_of(r) for r in range(P)})  # fmt: skip
    est = run.estimator
    out = Outcome()
    active: set[tuple] = set()
    start = time.perf_counter()

    def observe(report: Any, step: int | None = None) -> None:
        nonlocal active
        now = {(s.rank, s.cause) for s in report.stragglers}
        now |= {((link.src, link.dst), "link") for link in report.suspect_links}
        for key in now - active:
            out.episodes[key] += 1
            out.first_seen.setdefault(key, report.last_step if step is None else step)
        active = now

    if sc.probe.mode == "counters":
        return _diagnose_counters(sim, run, out, observe, start)
    for chunk in sim.chunks():
        records = sim.records(chunk)
        est.ingest_peer_rows(chunk.peer_rows)
        for i, step in enumerate(chunk.steps.tolist()):
            out.step_time_s[step] = float(chunk.exit_s[i][chunk.valid[i]].max(initial=0.0))
            est.ingest(records.take(records.step == step))
            if step % UPDATE_EVERY == 0:  # a live collector's pass, about once a second
                est.update(now_s=0.0)
                observe(est.report())
        est.ingest_entered(chunk.entered, now_s=0.0)
    observe(run.finish())
    fit = run.finish().phases.get("dispatch")
    out.regime = fit.regime if fit is not None else "?"
    out.wall_s = time.perf_counter() - start
    return out


def _diagnose_counters(
    sim: Simulation, run: OfflineRun, out: Outcome, observe: Any, start: float
) -> Outcome:
    """Counter mode: only the interval records a counter probe would send, one
    estimator pass per read (every ``counter_interval_steps``)."""
    sc = sim.s
    stream = CounterStream(sim)

    def after_read(t: float, rows: Any) -> None:
        step = int(rows.step.max())
        out.step_time_s.setdefault(step, t)
        observe(run.estimator.report(), step)

    for chunk in sim.chunks():
        feed_counter_reads(run, sc, stream.intervals(chunk), after_read)
    if sim.hang is not None:
        feed_counter_reads(run, sc, stream.frozen(3 * run.estimator.cfg.hang_after_s), after_read)
    observe(run.finish(), int(sim.last_step))
    out.regime = "counters"
    out.wall_s = time.perf_counter() - start
    return out


@dataclass
class Row:
    profile: str
    ranks: int
    name: str
    expected: tuple | None
    found: bool
    episodes: int  # of the expected flag
    false_pairs: int
    false_episodes: int
    ttd_steps: float
    ttd_s: float
    regime: str
    wall_s: float


def expected_key(p: int, fault: dict | None) -> tuple | None:
    if fault is None:
        return None
    kind = fault["kind"]
    if kind == "hot_expert":
        return (fault["expert"] // (EXPERTS // p), "routing")
    if kind == "slow_link":
        return (fault["rank"], fault["peer"]), "link"
    return (fault["rank"], EXPECTED_CAUSE[kind])


def score(profile: str, p: int, name: str, fault: dict | None, out: Outcome) -> Row:
    want = expected_key(p, fault)
    right = {want}
    if want is not None and want[1] == "link":  # either direction of the link is right
        (a, b), _ = want
        right.add(((b, a), "link"))
    hits = [k for k in out.episodes if k in right]
    wrong = [k for k in out.episodes if k not in right]
    onset = ONSET if fault is None else fault.get("start_step", ONSET)
    ttd_steps = ttd_s = float("nan")
    if hits and fault is not None and fault["kind"] != "hang":
        seen = min(out.first_seen[k] for k in hits)
        ttd_steps = seen - onset
        ttd_s = out.step_time_s.get(seen, np.nan) - out.step_time_s.get(onset, np.nan)
    return Row(
        profile=profile,
        ranks=p,
        name=name,
        expected=want,
        found=bool(hits),
        episodes=max((out.episodes[k] for k in hits), default=0),
        false_pairs=len(wrong),
        false_episodes=sum(out.episodes[k] for k in wrong),
        ttd_steps=ttd_steps,
        ttd_s=ttd_s,
        regime=out.regime,
        wall_s=out.wall_s,
    )


def _fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)


def print_row(r: Row) -> None:
    print(
        f"{r.profile:<5} P={r.ranks:<4} {r.name:<22} "
        f"{'found' if r.found else ('-' if r.expected is None else 'MISSED'):<7}"
        f"ep={r.episodes:<3} false={r.false_pairs}/{r.false_episodes:<4} "
        f"ttd={_fmt(r.ttd_steps, '.0f'):>4} steps {_fmt(r.ttd_s * 1e3, '.0f'):>5} ms  "
        f"{r.regime:<16} {r.wall_s:5.1f} s",
        flush=True,
    )


def summarise(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per fault (all P together): recall, precision, episodes, time to detect."""
    out: dict[str, dict[str, Any]] = {}
    by_name: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_name[f"{r.profile} {r.name}"].append(r)
    for name, rs in by_name.items():
        tp = sum(r.found for r in rs)
        fp = sum(r.false_pairs for r in rs)
        faulty = [r for r in rs if r.expected is not None]
        ttd = [r.ttd_steps for r in rs if r.ttd_steps == r.ttd_steps]
        ttd_s = [r.ttd_s for r in rs if r.ttd_s == r.ttd_s]
        out[name] = {
            "runs": len(rs),
            "recall": tp / len(faulty) if faulty else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "false_pairs": fp,
            "false_episodes": sum(r.false_episodes for r in rs),
            "episodes_of_right_flag": [r.episodes for r in rs if r.expected is not None],
            "ttd_steps_median": float(np.median(ttd)) if ttd else None,
            "ttd_steps_max": float(np.max(ttd)) if ttd else None,
            "ttd_s_median": float(np.median(ttd_s)) if ttd_s else None,
        }
    return out


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'fault':<29}{'runs':>5}{'recall':>8}{'precision':>10}{'false':>7}"
          f"{'false ep':>9}  episodes of the right flag   ttd steps (med/max)")  # fmt: skip
    for name, s in summary.items():
        recall = "-" if s["recall"] is None else f"{s['recall']:.2f}"
        precision = "-" if s["precision"] is None else f"{s['precision']:.2f}"
        eps = ",".join(map(str, s["episodes_of_right_flag"])) or "-"
        ttd = "-" if s["ttd_steps_median"] is None else (
            f"{s['ttd_steps_median']:.0f}/{s['ttd_steps_max']:.0f}")  # fmt: skip
        print(f"{name:<29}{s['runs']:>5}{recall:>8}{precision:>10}{s['false_pairs']:>7}"
              f"{s['false_episodes']:>9}  {eps:<28} {ttd}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    ap.add_argument("--profile", choices=sorted(PROFILES), nargs="+", default=["iid", "real"])
    ap.add_argument("--quick", action="store_true", help="clean runs of 400 steps")
    ap.add_argument("--only", default="", help="run only faults whose name contains this")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean runs")
    ap.add_argument(
        "--probe",
        choices=("records", "counters"),
        default="records",
        help="what the ranks send: per-collective records, or only the kernels' "
        "counters (decode under CUDA graphs; γ and the Hockney fit are not measured)",
    )
    args = ap.parse_args()
    rows: list[Row] = []
    for profile in args.profile:
        for p in args.ranks:
            if not args.no_clean and not args.only:
                routing = "zipf" if profile == "real" else "uniform"
                steps = FAULT_STEPS if args.quick else CLEAN_STEPS
                sc = scenario(p, profile, routing, steps, None, seed=p, probe=args.probe)
                rows.append(score(profile, p, f"clean {routing}", None, diagnose(sc)))
                print_row(rows[-1])
            for name, routing, fault in faults(p):
                if args.only and args.only not in name:
                    continue
                sc = scenario(p, profile, routing, FAULT_STEPS, fault, seed=p + 1, probe=args.probe)
                rows.append(score(profile, p, name, fault, diagnose(sc)))
                print_row(rows[-1])
    summary = summarise(rows)
    print_summary(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
