"""The collector's diagnosis flags reach the estimators, and bad ones are refused."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from epwatch.cli import collector as cli
from epwatch.collector.groups import default_factory


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_diagnosis_flags_configure_every_new_group() -> None:
    args = parse(
        "--hang-after", "2.5", "--routing-min-effect", "1.3", "--enter-level", "12",
        "--exit-level", "4", "--clear-steps", "50", "--clear-seconds", "20",
        "--noise-window", "32",
        "--compute-threshold", "1.1",  # the old name of --compute-min-effect still works
    )  # fmt: skip
    estimator = default_factory(cli.estimator_config(args))("ep7", 16)
    assert estimator.cfg.hang_after_s == 2.5
    compute = estimator.trackers["compute"].test.p
    assert compute.min_effect == 1.1
    assert estimator.trackers["routing"].test.p.min_effect == 1.3
    assert (compute.enter, compute.exit, compute.clear_steps, compute.clear_s) == (12, 4, 50, 20)
    assert compute.window == 32


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--compute-min-effect", "0.9", "compute_min_effect must be > 1"),
     ("--exit-level", "20", "exit_level must be in [0, enter_level)"),
     ("--hang-after", "0", "hang_after_s must be > 0"),
     ("--window-steps", "0", "window_steps must be >= 1")],
)  # fmt: skip
def test_bad_thresholds_are_refused_before_anything_starts(flag, value, message) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "collector", flag, value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_recording_limits_default_to_the_recorders_own() -> None:
    args = parse("--record", "/tmp/x")
    assert args.record_max_bytes == 256 << 20
    assert args.record_max_seconds == 3600.0
