"""``epwatch replay``: a recording made by the collector's recorder gives the same
diagnosis as the live estimators did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from epwatch.cli.simrecord import record_scenario
from epwatch.collector.recorder import Recorder, RecorderConfig
from epwatch.simulator.engine import Simulation
from epwatch.simulator.scenario import load_scenario

pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.timeout(120)

SCENARIO = {
    "seed": 9,
    "steps": 120,
    "cluster": {"ranks": 16, "ranks_per_node": 8, "ep_group": "ep-rec"},
    "model": {"layers": 8},
    "faults": [
        {"kind": "slow_gpu", "rank": 3, "start_step": 30, "factor": 1.3},
        {"kind": "hot_expert", "expert": 200, "share": 0.08, "start_step": 50},
    ],
}


def record(directory: Path) -> None:
    """What `epwatch collector --record` writes, from two simulated nodes."""
    scenario = load_scenario(SCENARIO)
    sim = Simulation(scenario)
    recorder = Recorder(RecorderConfig(str(directory), flush_seconds=0.01), lambda n: None)
    recorder.start()
    for chunk in sim.chunks():
        records = sim.records(chunk)
        for node in range(2):
            mine = records.take(records.rank // 8 == node)
            recorder.put("ep-rec", f"node-{node}", 16, mine)
    recorder.stop()


def replay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "replay", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_replay_finds_the_recorded_stragglers(tmp_path: Path) -> None:
    record(tmp_path)
    out = replay_cli(str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    (group,) = json.loads(out.stdout)["groups"]
    assert group["ep_group"] == "ep-rec" and group["steps"] == 120
    found = {(s["rank"], s["node"], s["cause"]) for s in group["stragglers"]}
    assert found == {(3, "node-0", "compute"), (12, "node-1", "routing")}
    text = replay_cli(str(tmp_path))
    assert "rank 3 on node-0: compute" in text.stdout


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "no .parquet recordings found"),
        (lambda d: d / "missing.parquet", "no such file or folder"),
        (lambda d: (d / "x.parquet").write_text("not parquet") and d, "no readable recording"),
    ],
)
def test_replay_errors_are_clear(tmp_path: Path, make, message: str) -> None:
    out = replay_cli(str(make(tmp_path)))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_recorded_peer_rows_let_the_replay_find_a_slow_nic(tmp_path: Path) -> None:
    """The per-peer rows recorded beside the records go back in with their batch: the
    network attribution works offline as it did live. Without them (records only, as
    recordings made before per-peer rows were recorded) the replay still runs."""
    scenario = load_scenario(
        {
            "seed": 4,
            "steps": 160,
            "cluster": {"ranks": 16, "ranks_per_node": 8, "ep_group": "ep-net"},
            "model": {"layers": 8},
            "faults": [{"kind": "slow_nic", "rank": 11, "start_step": 40, "factor": 2.5}],
        }
    )
    record_scenario(scenario, tmp_path)
    assert list(tmp_path.glob("peers-*.parquet"))
    out = replay_cli(str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    (group,) = json.loads(out.stdout)["groups"]
    assert {(s["rank"], s["cause"]) for s in group["stragglers"]} == {(11, "network")}
    records_only = tmp_path / "records-only"
    records_only.mkdir()
    for f in tmp_path.glob("records-*.parquet"):
        f.rename(records_only / f.name)
    out = replay_cli(str(records_only), "--json")
    assert out.returncode == 0, out.stderr
    (group,) = json.loads(out.stdout)["groups"]
    assert group["steps"] == 160 and not any(s["cause"] == "network" for s in group["stragglers"])
