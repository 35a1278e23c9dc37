"""One driver for offline diagnosis: data that is not arriving live (a simulation, a
recording) goes through a group's estimators exactly as the collector feeds them, and
ends in the report of the whole run, flags that cleared included.

``epwatch simulate`` and ``epwatch replay`` both run through :class:`OfflineRun`; the
diagnosis JSON of every command (and of the live API) is :func:`diagnosis_json`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from epwatch.collector.estimators import EstimatorConfig, GroupEstimator, GroupReport
from epwatch.collector.estimators.evidence import NodeEvidence
from epwatch.collector.estimators.stats import StepStats
from epwatch.schema import Entered, IntervalColumns, PeerRows, RecordColumns

# Window statistics over (up to) the whole run, as a post-mortem wants them.
POST_MORTEM = EstimatorConfig(window_steps=10_000, max_fit_points=1 << 20)


def post_mortem_config(
    steps: int | None = None, base: EstimatorConfig | None = None
) -> EstimatorConfig:
    """``base`` (default: the live defaults) with windows over ``steps`` steps."""
    if base is None and steps is None:
        return POST_MORTEM
    return dataclasses.replace(
        base or EstimatorConfig(),
        window_steps=steps or POST_MORTEM.window_steps,
        max_fit_points=POST_MORTEM.max_fit_points,
    )


class OfflineRun:
    """One EP group's estimators fed from a finite source.

    The estimators' clock stands still (offline there is no wall time to measure a
    stall against; a hang shows as a rank whose heartbeat stays behind at the end),
    while node evidence follows the source's own timestamps given to
    :meth:`node_sample`.
    """

    def __init__(
        self,
        ep_group: str,
        world_size: int,
        config: EstimatorConfig | None = None,
        nodes: Mapping[int, str] | None = None,
    ) -> None:
        self.estimator = GroupEstimator(ep_group, world_size, config or POST_MORTEM, clock=_zero)
        if nodes:
            self.estimator.set_nodes(nodes)
        self.source_time_s = 0.0
        self.evidence = NodeEvidence(clock=lambda: self.source_time_s)
        self._steps_seen = 0

    def ingest(
        self,
        records: RecordColumns,
        node: str | None = None,
        peer_rows: PeerRows | None = None,
        entered: Entered | None = None,
    ) -> None:
        """One batch, as one Push would bring it; the estimators then catch up."""
        est = self.estimator
        est.ingest(records, node)
        if peer_rows is not None:
            est.ingest_peer_rows(peer_rows)
        if entered is not None:
            est.ingest_entered(entered, node, now_s=0.0)
        est.update(now_s=0.0)

    def ingest_intervals(self, rows: IntervalColumns, node: str | None, time_s: float) -> None:
        """Counter-mode interval records received at ``time_s`` (the source's clock: a
        counter-mode hang is timed by the probes' own clocks and by who went silent)."""
        self.source_time_s = max(self.source_time_s, time_s)
        self.estimator.ingest_intervals(rows, node, now_s=time_s)

    def update_counters(self) -> None:
        """One counter-mode estimator pass (the collector makes one about every second)."""
        self.estimator.update_counters(self.source_time_s)

    def node_sample(self, node: str, points: Iterable[Any], time_s: float) -> None:
        """A node's GPU/NIC sample points taken at ``time_s`` (the source's clock)."""
        self.source_time_s = time_s
        self.evidence.update(node, points, time_s)

    def new_steps(self) -> list[StepStats]:
        """The statistics of every step finalised since the last call, the estimators'
        own numbers, for a report that draws the run step by step (call it after each
        batch: the window keeps only its last ``window_steps``)."""
        est = self.estimator
        fresh = min(est.steps_done - self._steps_seen, len(est.window))
        self._steps_seen = est.steps_done
        return [est.window[-i] for i in range(fresh, 0, -1)]  # deque ends index in O(1)

    def finish(self) -> GroupReport:
        """Finalise every step still open and report the whole run."""
        self.estimator.update(now_s=0.0, final=True)
        return self.estimator.report(self.evidence.evidence_for, include_closed=True)


def _zero() -> float:
    return 0.0


def diagnosis_json(reports: Iterable[Any]) -> dict[str, Any]:
    """The diagnosis document of ``simulate --json``, ``replay --json``, the demo and
    the live API: one entry per EP group."""
    return {"groups": [r.to_json() for r in reports]}
