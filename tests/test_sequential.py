"""The sequential test behind every flag (design §5), on synthetic log-ratio series:
heavy-tailed noise raises nothing, a persistent straggler is one episode, a recovered
one clears only after the minimum clear time in steps and in seconds, and 4 ranks are
judged like 256."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from epwatch.collector.estimators.sequential import (
    SequentialParams,
    SequentialTest,
    slowdown_interval,
)
from epwatch.collector.estimators.tracker import CauseTracker, Flag, LinkTracker

PARAMS = SequentialParams(min_effect=1.03, clear_steps=30, clear_s=10.0)


def noisy(rng: np.random.Generator, steps: int, ranks: int, sd: float = 0.04) -> np.ndarray:
    """[steps, ranks] log-ratios with Student-t(3) noise and 2-5x spikes on 0.5%."""
    y = sd * rng.standard_t(3, (steps, ranks)) / math.sqrt(3)
    spikes = rng.random((steps, ranks)) < 0.005
    return np.where(spikes, np.log(rng.uniform(2, 5, (steps, ranks))), y)


def run(test: SequentialTest, y: np.ndarray, dt_s: float = 0.1) -> list[tuple[int, str, int]]:
    """Feed every step; (step, "open"/"clear", series) events."""
    events = []
    for step, row in enumerate(y):
        opened, cleared = test.observe(step, step * dt_s, row)
        events += [(step, "open", int(i)) for i in opened]
        events += [(step, "clear", int(i)) for i in cleared]
    return events


@pytest.mark.parametrize("ranks", [4, 256])
def test_heavy_tailed_noise_flags_nothing(ranks: int) -> None:
    rng = np.random.default_rng(ranks)
    steps = {4: 10_000, 256: 1500}[ranks]
    assert run(SequentialTest(ranks, PARAMS), noisy(rng, steps, ranks)) == []


@pytest.mark.parametrize("ranks", [4, 256])
def test_a_persistent_straggler_is_one_episode_from_onset_to_the_end(ranks: int) -> None:
    rng = np.random.default_rng(1)
    y = noisy(rng, 1500, ranks)
    y[300:, 1] += math.log(1.15)
    test = SequentialTest(ranks, PARAMS)
    events = run(test, y)
    assert [(e, r) for _, e, r in events] == [("open", 1)]
    opened_at = events[0][0]
    assert 300 + PARAMS.hold_steps <= opened_at <= 360
    assert 290 <= test.run_start[1] <= opened_at  # the change point, not the alarm
    assert test.flagged.tolist() == [r == 1 for r in range(ranks)]


def test_a_recovered_rank_clears_after_the_clear_time_in_steps_and_seconds() -> None:
    rng = np.random.default_rng(2)
    y = noisy(rng, 3000, 8)
    y[200:1000, 3] += math.log(1.3)
    # 10 steps a second: 30 steps pass in 3 s, the 10 s clear time is what binds.
    events = run(SequentialTest(8, PARAMS), y, dt_s=0.1)
    assert [(e, r) for _, e, r in events] == [("open", 3), ("clear", 3)]
    cleared_at = events[1][0]
    assert 1000 + 100 <= cleared_at <= 1000 + 400  # a spike restarts the quiet time
    # 1 step a second: now the 30 steps bind.
    events = run(SequentialTest(8, PARAMS), y, dt_s=1.0)
    assert 1000 + 30 <= events[1][0] <= 1000 + 300


def test_a_straggler_wandering_across_its_threshold_is_still_one_episode() -> None:
    """The issue's fairscale run: a 1.28x rank whose per-window ratio crossed a fixed
    line 29 times. Here its slowdown swings between 1.05x and 1.5x every few steps,
    with noise on top."""
    rng = np.random.default_rng(3)
    y = noisy(rng, 2000, 4, sd=0.08)
    swing = np.log(1.28) + 0.18 * np.sin(np.arange(1700) / 3.0)
    y[300:, 2] += swing
    events = run(SequentialTest(4, PARAMS), y)
    assert [(e, r) for _, e, r in events] == [("open", 2)]


def test_a_burst_shorter_than_the_hold_passes_a_persistent_straggler_does_not() -> None:
    """A rank 1.5x slower for 25 steps (a contended host) would be flagged without
    the hold; with it (30 steps, or --hold-seconds) only the persistent one is."""
    rng = np.random.default_rng(8)
    y = noisy(rng, 1500, 4)
    y[300:325, 1] += math.log(1.5)
    y[800:, 2] += math.log(1.3)
    at_once = run(SequentialTest(4, dataclasses.replace(PARAMS, hold_steps=1)), y)
    assert ("open", 1) in [(e, r) for _, e, r in at_once]
    held = run(SequentialTest(4, PARAMS), y)
    assert [(e, r) for _, e, r in held] == [("open", 2)]
    assert held[0][0] >= 830
    by_time = run(SequentialTest(4, dataclasses.replace(PARAMS, hold_s=6.0)), y, dt_s=0.1)
    assert [(e, r) for _, e, r in by_time] == [("open", 2)]
    assert by_time[0][0] >= 860


def test_noise_comes_from_each_ranks_history_not_the_spread_across_ranks() -> None:
    """Two quiet ranks and two noisy ones: the quiet ones are judged by the group's
    typical noise at least, the noisy ones by their own."""
    rng = np.random.default_rng(4)
    sd = np.array([0.01, 0.01, 0.2, 0.2])
    y = rng.normal(0, 1, (400, 4)) * sd
    test = SequentialTest(4, PARAMS)
    run(test, y)
    noise = test.noise()
    assert noise[2] == pytest.approx(0.2, rel=0.25) and noise[3] == pytest.approx(0.2, rel=0.25)
    assert noise[0] == noise[1] > 3 * 0.01  # the group's typical noise, not their own
    assert noise[0] < noise[2]


def test_supplied_noise_needs_no_history() -> None:
    params = SequentialParams(min_effect=1.2, warmup=1, hold_steps=1)
    test = SequentialTest(3, params, history=False)
    opened = []
    for step in range(10):
        o, _ = test.observe(step, float(step), np.log([1.0, 1.5, 1.1]), noise=0.05)
        opened += o.tolist()
    assert opened == [1]


def test_the_slowdown_interval_covers_the_truth_and_a_flag_never_reports_below_1() -> None:
    rng = np.random.default_rng(5)
    logs = math.log(1.25) + rng.normal(0, 0.1, 600)
    mid, low, high = slowdown_interval(logs)
    assert low < 1.25 < high and high - low < 0.05
    assert mid == pytest.approx(1.25, rel=0.02)
    flag = Flag(0, "compute", 0, 10)
    flag.values.extend([0.97, 0.98, 0.99, 0.985])
    assert flag.interval() == (1.0, 1.0, 1.0)


def test_cause_tracker_reports_the_episode_with_its_change_point() -> None:
    rng = np.random.default_rng(6)
    tracker = CauseTracker("compute", 16, PARAMS)
    ratios = np.exp(noisy(rng, 600, 16, sd=0.02))
    ratios[200:, 9] *= 1.1
    for step, row in enumerate(ratios):
        tracker.push(step, step * 0.05, row)
    (flag,) = tracker.flags(include_closed=True)
    assert (flag.rank, flag.cause, flag.active) == (9, "compute", True)
    assert 190 <= flag.first_step <= 205 and flag.first_step <= flag.opened_step <= 245
    slowdown, low, high = flag.interval()
    assert low <= 1.1 <= high and slowdown == pytest.approx(1.1, rel=0.02)
    opened, cleared = tracker.take_changes()
    assert opened == [flag] and cleared == [] and tracker.take_changes() == ([], [])


def test_suspect_links_are_followed_in_a_bounded_number_of_slots() -> None:
    """P x P cells, a handful of slots: a slow link still takes one and keeps it."""
    rng = np.random.default_rng(7)
    tracker = LinkTracker(128, SequentialParams(min_effect=1.25, warmup=1), slots=8)
    for step in range(120):
        cells = np.exp(rng.normal(0, 0.05, (128, 128)))
        if step >= 20:
            cells[5, 7] *= 1.4  # receiver 5 waits longer for sender 7
        tracker.push(step, step * 0.1, cells)
    assert [(f.src, f.dst, f.active) for f in tracker.flags(True)] == [(7, 5, True)]
    assert tracker.flags(True)[0].slowdown == pytest.approx(1.4, rel=0.05)
    assert tracker.test.size == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"min_effect": 1.0}, "min_effect must be > 1"),
     ({"enter": 3.0, "exit": 3.0}, "need 0 <= exit < enter"),
     ({"clear_steps": 0}, "clear_steps must be >= 1"),
     ({"clear_s": -1.0}, "clear_s must be >= 0")],
)  # fmt: skip
def test_bad_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SequentialParams(**kwargs)
