"""``epwatch replay`` on real recordings: four gloo ranks of the dropless mini-MoE
(count exchange, variable splits; ``moe-*``), of fairscale's ``MOELayer`` +
``Top2Gate`` (real CPU compute, nothing slept; ``fs-*``) and of DeepSpeed's dropless
``AutoEPMoELayer`` instrumented by ``patch_all_to_all`` (``ds-*``), recorded by
``epwatch collector --record`` with ``tests/gloo_recordings.py`` (each file's ``.json``
says what was injected and what the live collector showed). Real runs on two shared cores
are noisy: OS preemption, gloo's own jitter, a busy-spinning rank competing for a
core, and with fairscale a rank that the host slows by 20-30% for a second or two.

- healthy: nothing is flagged;
- a rank 1.25x and one 1.2x slower (busy-spun): found within 10 s of onset, as one
  episode that lasts to the end, cause ``compute``, slowdown with an interval;
- a hot expert: ``routing`` on its rank, never ``compute``;
- one rank with a 1.3x larger batch: ``batch``, never ``compute``;
- DeepSpeed's layers are the noisiest (a rank's per-step cost swings by 25%): a rank
  1.25x slower is one compute episode to the end, found later (about 20 s after onset
  when it sleeps; when it busy-spins, the host's other ranks lose the core it spins
  on, and its measured cost rises only some 300 steps after onset);
- a hang: the recording holds records only (no heartbeats), so a replay cannot pin
  it; it must not invent a straggler before it (the live hang is
  ``test_hooks_e2e``'s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epwatch.collector.estimators import GroupReport
from epwatch.collector.replay import replay

pq = pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.timeout(180)

DATA = Path(__file__).resolve().parent / "data" / "recordings"


@cache
def replayed(name: str) -> tuple[GroupReport, dict[str, Any], dict[int, float]]:
    """The replay's report, the recording's truth and each step's start (rank 0's
    clock, seconds)."""
    path = DATA / f"{name}.parquet"
    (report,) = replay([path])
    meta = json.loads((DATA / f"{name}.json").read_text())
    t = pq.read_table(path, columns=["rank", "step", "layer", "phase", "enter_ns"])
    first = (
        (t.column("rank").to_numpy() == 0)
        & (t.column("layer").to_numpy() == 0)
        & (t.column("phase").to_numpy() == 0)
    )
    steps = t.column("step").to_numpy()[first]
    starts = t.column("enter_ns").to_numpy()[first] * 1e-9
    return report, meta, dict(zip(steps.tolist(), starts.tolist(), strict=True))


def test_every_recording_is_small() -> None:
    files = sorted(DATA.glob("*.parquet"))
    assert {f.stem for f in files} >= {"moe-healthy", "moe-slow", "moe-hot", "moe-hang",
                                       "ds-healthy", "ds-slow", "ds-hot"}  # fmt: skip
    assert all(f.stat().st_size < 2_000_000 for f in files)


@pytest.mark.parametrize("name", ["moe-healthy", "fs-healthy", "ds-healthy"])
def test_a_healthy_run_flags_nothing(name: str) -> None:
    report, meta, _ = replayed(name)
    assert report.steps >= 0.95 * meta["truth"]["scenario"]["steps"]
    assert report.stragglers == ()
    assert meta["live"] == {}  # nor did the live collector


@pytest.mark.parametrize(
    ("name", "factor"), [("moe-slow", 1.25), ("moe-slow-1.2", 1.2), ("fs-slow", 1.3)]
)
def test_a_slow_rank_is_one_compute_episode_found_within_10s(name: str, factor: float) -> None:
    report, meta, start_s = replayed(name)
    sc, onset = meta["truth"]["scenario"], meta["truth"]["onset_step"]
    assert [(s.rank, s.cause) for s in report.stragglers] == [(sc["slow_rank"], "compute")]
    (s,) = report.stragglers
    assert s.active and s.last_step == report.last_step  # held to the end: one episode
    assert onset - 5 <= s.first_step <= s.opened_step
    assert start_s[s.opened_step] - start_s[onset] <= 10.0
    assert 1.0 < s.slowdown_low <= s.slowdown <= s.slowdown_high
    assert s.slowdown == pytest.approx(factor, abs=0.08)
    live = meta["live"][f"{sc['slow_rank']} compute"]
    assert live["episodes_in_scrapes"] == 1 and live["first_seen_s_after_onset"] <= 10.0


@pytest.mark.parametrize("name", ["ds-slow-sleep", "ds-slow"])
def test_a_slow_deepspeed_rank_is_one_compute_episode_to_the_end(name: str) -> None:
    report, meta, _ = replayed(name)
    sc, onset = meta["truth"]["scenario"], meta["truth"]["onset_step"]
    assert [(s.rank, s.cause) for s in report.stragglers] == [(sc["slow_rank"], "compute")]
    (s,) = report.stragglers
    assert s.active and s.last_step == report.last_step
    assert s.first_step >= onset - 5
    assert 1.15 < s.slowdown_low <= s.slowdown <= s.slowdown_high < 1.6
    live = meta["live"][f"{sc['slow_rank']} compute"]
    assert live["episodes_in_scrapes"] == 1


@pytest.mark.parametrize("name", ["moe-hot", "fs-hot", "ds-hot"])
def test_a_hot_expert_is_routing_never_compute(name: str) -> None:
    report, meta, _ = replayed(name)
    hot = meta["truth"]["scenario"]["hot_rank"]
    assert [(s.rank, s.cause) for s in report.stragglers] == [(hot, "routing")]
    assert report.stragglers[0].first_step >= meta["truth"]["onset_step"] - 5


def test_a_larger_data_parallel_batch_is_batch_never_compute() -> None:
    report, meta, _ = replayed("moe-batch")
    sc = meta["truth"]["scenario"]
    assert [(s.rank, s.cause) for s in report.stragglers] == [(sc["batch_rank"], "batch")]
    assert report.stragglers[0].slowdown == pytest.approx(sc["batch_factor"], rel=0.05)
    assert np.nanargmax(report.batch_ratio) == sc["batch_rank"]


def test_a_hang_leaves_no_false_straggler_and_the_live_collector_pinned_it() -> None:
    report, meta, _ = replayed("moe-hang")
    sc = meta["truth"]["scenario"]
    assert report.stragglers == ()
    assert sc["hang_step"] - 2 <= report.last_step <= sc["hang_step"]
    live = meta["live"][f"{sc['hang_rank']} hang"]
    assert live["first_seen_s_after_onset"] <= 10.0 and live["episodes_in_scrapes"] == 1


def test_replay_cli_explains_the_recorded_straggler() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "replay", str(DATA / "moe-slow.parquet")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "rank 2 on node-a: compute, since step" in out.stdout
    assert "per-token expert compute 1.2" in out.stdout
