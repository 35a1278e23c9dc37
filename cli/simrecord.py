"""A scenario written as the collector's ``--record`` would hold it: what ``epwatch
simulate --record`` writes, so ``replay`` and ``report`` can be tried (and tested, and
benchmarked) on a recording without running a cluster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from epwatch.collector.recorder import RecorderConfig, Recording
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import Scenario


def record_scenario(scenario: Scenario, directory: Path, start_ns: int | None = None) -> int:
    """Simulate ``scenario`` and record it into ``directory``: one batch per node and
    step, received when the step ends in simulated time (from ``start_ns``, default
    now). Returns the number of records written."""
    sim = Simulation(scenario)
    start_ns = time.time_ns() if start_ns is None else start_ns
    group, world = scenario.cluster.ep_group, scenario.cluster.ranks
    node_of = np.array([scenario.node_of(r) for r in range(world)], dtype=object)
    # Everything simulated is in memory already: let the queue take the whole run.
    config = RecorderConfig(str(directory), flush_seconds=3600, queue_records=1 << 27)
    recording = Recording(config, _dropped)
    recording.start()
    written = 0
    try:
        for chunk in sim.chunks():
            records = sim.records(chunk)
            rows = chunk.peer_rows
            ends = chunk.exit_s.reshape(len(chunk.steps), -1).max(axis=1)
            for i, step in enumerate(chunk.steps.tolist()):
                at = start_ns + round(float(ends[i]) * 1e9)
                for node in dict.fromkeys(node_of):
                    ranks = np.flatnonzero(node_of == node)
                    mine = records.take((records.step == step) & np.isin(records.rank, ranks))
                    peers = rows.take((rows.step == step) & np.isin(rows.rank, ranks))
                    recording.put(group, str(node), world, mine, peers, received_ns=at)
                    written += len(mine)
    finally:
        recording.stop()
    return written


def _dropped(count: int) -> None:
    raise RuntimeError(f"the recorder's queue overflowed ({count} records)")
