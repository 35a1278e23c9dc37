"""A real straggler on real gloo ranks fires the shipped ``EPStragglerRank`` alert in a
real Prometheus.

Four mini-MoE ranks (``tests/moe_worker.py``) run through a real agent and collector;
from step 60 rank 2 busy-spins 25% longer in its attention and experts. A real
Prometheus scrapes the collector every second with the committed rules, ``for:``
shortened to 10 s (production says 30 s; a flag that opened and cleared every few
seconds, as a per-window threshold did on such runs, would never satisfy either). The
flag must be one episode from its first scrape to the end of the run, the alert must
fire with cause ``compute`` on rank 2, and the collector must log the flag once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.gloo_cluster import GlooCluster
from tests.moe_worker import Scenario
from tests.promstack import INSTALL_HINT, PromStack, labels_match, missing_binaries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SLOW_RANK, ONSET, STEPS = 2, 60, 360
STRAGGLER = {"alertname": "EPStragglerRank", "ep_group": "live-slow", "rank": "2",
             "node": "node-a", "cause": "compute"}  # fmt: skip


def test_a_busy_spinning_rank_fires_the_straggler_alert_as_one_episode(tmp_path: Path) -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; {INSTALL_HINT}")
    plan = [Scenario(group="live-slow", steps=STEPS, fault_step=ONSET, slow_rank=SLOW_RANK,
                     slow_factor=1.25, slow_mode="spin")]  # fmt: skip
    fired_at = None
    with GlooCluster(plan, tmp_path) as cluster:
        target = f"127.0.0.1:{cluster.metrics_port}"
        with PromStack(tmp_path / "prom", [target], for_duration="10s") as stack:
            cluster.wait_for_event("ONSET live-slow", 120)
            while cluster.event("DONE live-slow") is None and fired_at is None:
                alerts = stack.prometheus.alerts()
                if any(a["state"] == "firing" and labels_match(a["labels"], STRAGGLER)
                       for a in alerts):  # fmt: skip
                    fired_at = time.monotonic()
                time.sleep(0.5)
            cluster.wait_for_event("DONE live-slow", 200)
    key = ("live-slow", SLOW_RANK, "compute")
    seen = cluster.observed
    assert seen.groups_flags("live-slow") == {(SLOW_RANK, "compute")}
    assert seen.episodes(key) == 1
    first = seen.first_seen(key)
    assert first is not None and first - cluster.events["ONSET live-slow"] <= 10.0
    assert fired_at is not None, f"EPStragglerRank never fired; flag first seen at {first}"
    flagged = [line for line in cluster.collector_log.splitlines() if "flagged as" in line]
    assert len(flagged) == 1 and "rank 2 on node-a flagged as compute straggler" in flagged[0]
