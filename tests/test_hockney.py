"""The robust Hockney fit and the ``fit`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epwatch import hockney

L_TRUE, BW_TRUE = 50e-6, 25e9


def points(n: int = 400, outliers: float = 0.0, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.uniform(64e3, 64e6, n)
    t = (L_TRUE + v / BW_TRUE) * rng.lognormal(0, 0.03, n)
    bad = rng.random(n) < outliers
    t[bad] *= rng.uniform(2, 5, bad.sum())  # stragglers and retries: far above the line
    return v, t


def test_clean_points_recover_latency_and_bandwidth() -> None:
    f = hockney.fit(*points())
    assert f.latency_s == pytest.approx(L_TRUE, rel=0.1)
    assert f.bandwidth_Bps == pytest.approx(BW_TRUE, rel=0.02)
    assert f.r2 > 0.99
    assert f.crossover_bytes == pytest.approx(f.latency_s * f.bandwidth_Bps)


def test_outliers_do_not_bend_the_fit_where_least_squares_does() -> None:
    v, t = points(outliers=0.15)
    f = hockney.fit(v, t)
    assert f.bandwidth_Bps == pytest.approx(BW_TRUE, rel=0.03)
    assert f.inliers < f.n  # the outliers got no weight
    slope, _ = np.polyfit(v, t, 1)
    assert abs(1 / slope / BW_TRUE - 1) > 0.1  # plain least squares is bent by them


@pytest.mark.parametrize(
    ("v", "t", "message"),
    [
        ([1.0, 2.0], [1.0, 2.0], "at least 3 points"),
        ([5.0, 5.0, 5.0], [1.0, 2.0, 3.0], "same byte count"),
        ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], "does not grow"),
    ],
)
def test_unfittable_points_raise(v, t, message) -> None:
    with pytest.raises(hockney.FitError, match=message):
        hockney.fit(np.array(v), np.array(t))


def fit_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "fit", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fit_cli_reads_a_csv(tmp_path: Path) -> None:
    v, t = points(outliers=0.1)
    csv = tmp_path / "pairs.csv"
    csv.write_text("bytes,seconds\n" + "".join(f"{a},{b}\n" for a, b in zip(v, t, strict=True)))
    out = fit_cli(csv)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert set(r) >= {"latency_s", "bandwidth_Bps", "r2", "n", "crossover_bytes"}
    assert r["n"] == 400
    assert r["bandwidth_Bps"] == pytest.approx(BW_TRUE, rel=0.03)
    assert r["fit_problem"] is None and "warning" not in out.stderr
    narrow = tmp_path / "narrow.csv"  # sizes within 1%: fitted, but flagged
    narrow.write_text("bytes,seconds\n" + "".join(
        f"{1e6 + i},{L_TRUE + (1e6 + i) / BW_TRUE + 1e-7 * (i % 3)}\n" for i in range(0, 5000, 50)
    ))  # fmt: skip
    out = fit_cli(narrow)
    assert out.returncode == 0 and json.loads(out.stdout)["fit_problem"].startswith(
        "message sizes too uniform"
    )
    assert "warning: not trustworthy: message sizes too uniform" in out.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("size,seconds\n1,2\n", "missing column(s) bytes"),
        ("bytes,seconds\n1,1\n2,2\n", "at least 3 points"),
        ("bytes,seconds\n5,1\n5,2\n5,3\n", "same byte count"),
        ("bytes,seconds\n1,x\n", "not a number"),
        (b"\xff\xfe\x00garbage", "not a text CSV"),
    ],
)
def test_fit_cli_errors_are_clear(tmp_path: Path, content, message: str) -> None:
    csv = tmp_path / "in.csv"
    if isinstance(content, bytes):
        csv.write_bytes(content)
    elif content is not None:
        csv.write_text(content)
    out = fit_cli(csv)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_trust_needs_spread_in_sizes_and_an_r2_floor() -> None:
    rng = np.random.default_rng(5)
    v = rng.uniform(1e6, 8e6, 200)
    good = hockney.fit(v, 50e-6 + v / 20e9 + rng.normal(0, 2e-6, 200))
    assert hockney.untrustworthy(v, good) is None
    # sizes within 2%: a line still fits, but L and BW trade off inside the noise
    narrow = 4e6 * (1 + rng.uniform(-0.01, 0.01, 200))
    loose = hockney.fit(narrow, 50e-6 + narrow / 20e9 + rng.normal(0, 0.5e-6, 200))
    why = hockney.untrustworthy(narrow, loose)
    assert why is not None and why.startswith("message sizes too uniform to separate L from BW")
    # spread enough, but the times hardly follow the sizes
    noisy_t = 300e-6 + v / 200e9 + rng.exponential(200e-6, 200)
    try:
        noisy = hockney.fit(v, noisy_t)
    except hockney.FitError:
        pytest.skip("no positive slope at all for this seed")
    assert noisy.r2 < hockney.MIN_R2
    assert "R^2" in (hockney.untrustworthy(v, noisy) or "")
