"""Run a scenario's records through the estimators, exactly as the collector would."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from collector.estimators import EstimatorConfig, GroupEstimator, GroupReport
from collector.evidence import NodeEvidence
from simulator.engine import Simulation
from simulator.node_samples import NodeSampleModel
from simulator.scenario import Scenario


@dataclass
class Truth:
    """What the simulator knows and the estimators must recover (for tests)."""

    gamma: list[np.ndarray] = field(default_factory=list)  # [S, L] per chunk
    latency_s: float = 0.0
    bandwidth_Bps: float = 0.0


def offline_config(scenario: Scenario, base: EstimatorConfig | None = None) -> EstimatorConfig:
    """Window statistics over the whole run, as a post-mortem wants them."""
    return dataclasses.replace(
        base or EstimatorConfig(), window_steps=scenario.steps, max_fit_points=1 << 20
    )


def run_scenario(
    scenario: Scenario,
    config: EstimatorConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[GroupReport, Truth]:
    """Simulate, ingest chunk by chunk, finalise, and return the run's report."""
    sim = Simulation(scenario)
    est = GroupEstimator(
        scenario.cluster.ep_group,
        scenario.cluster.ranks,
        offline_config(scenario, config),
        clock=lambda: 0.0,
    )
    est.set_nodes({r: scenario.node_of(r) for r in range(scenario.cluster.ranks)})
    truth = Truth(latency_s=sim.latency_s, bandwidth_Bps=sim.bandwidth_Bps)
    nodes = NodeSampleModel(scenario)
    evidence = NodeEvidence(clock=lambda: now)
    now = 0.0
    for chunk in sim.chunks():
        est.ingest(sim.records(chunk))
        est.ingest_peer_rows(chunk.peer_rows)
        est.ingest_entered(chunk.entered, now_s=0.0)
        est.update(now_s=0.0)
        # The agents sample their nodes about once per chunk of simulated time.
        end = float(chunk.exit_s[chunk.valid].max())
        for node, points in nodes.advance(int(chunk.steps[-1]), end - now).items():
            evidence.update(node, points, end)
        now = end
        truth.gamma.append(sim.true_gamma(chunk)[chunk.valid.all(axis=(2, 3))])
        if progress:
            progress(int(chunk.steps[-1]) + 1, sim.last_step + 1)
    est.update(now_s=0.0, final=True)
    return est.report(evidence=evidence.evidence_for, include_closed=True), truth
