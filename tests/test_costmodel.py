"""The cost model against the reference article's figures, and the model CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from epwatch import costmodel

V3 = costmodel.Workload(batch_tokens=128_000, ranks=64, topk=8, hidden=7168, bytes_per_elem=1)


def epwatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_article_figures_from_the_cli() -> None:
    out = epwatch(
        "model",
        "--batch",
        "128000",
        "--ranks",
        "64",
        "--topk",
        "8",
        "--hidden",
        "7168",
        "--bytes-per-elem",
        "1",
        "--layers",
        "61",
        "--steps-per-second",
        "10",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["tokens_per_rank"] == 2000
    assert r["payload_bytes_per_rank"] == pytest.approx(114.7e6, rel=1e-3)
    assert r["bytes_per_forward_per_rank"] == pytest.approx(14.0e9, rel=5e-3)
    assert r["nic_bytes_per_second"] == pytest.approx(140e9, rel=5e-3)
    assert "regime" not in r  # no L and BW given


def test_regime_and_crossover_with_latency_and_bandwidth() -> None:
    out = epwatch(
        "model",
        "--batch",
        "128000",
        "--ranks",
        "64",
        "--topk",
        "8",
        "--hidden",
        "7168",
        "--bytes-per-elem",
        "1",
        "--latency-us",
        "150",
        "--bandwidth-gbps",
        "40",
        "--json",
    )
    r = json.loads(out.stdout)
    assert r["crossover_bytes"] == pytest.approx(150e-6 * 40e9)
    assert r["per_peer_message_bytes"] == pytest.approx(114_688_000 / 63)
    assert r["regime"] == "latency-bound"  # 1.8 MB per peer < 6 MB crossover
    assert r["t_comm_seconds"] == pytest.approx(2 * (150e-6 + 114_688_000 / 40e9))
    # The batch that would reach the crossover is bandwidth-bound, and just below is not.
    b = r["batch_for_bandwidth_bound"]
    w = costmodel.Workload(b * 1.01, 64, 8, 7168, 1)
    peer = costmodel.per_peer_message_bytes(costmodel.payload_bytes_per_rank(w), 64)
    assert costmodel.regime(peer, 150e-6, 40e9) == costmodel.BANDWIDTH_BOUND
    w = costmodel.Workload(b * 0.99, 64, 8, 7168, 1)
    peer = costmodel.per_peer_message_bytes(costmodel.payload_bytes_per_rank(w), 64)
    assert costmodel.regime(peer, 150e-6, 40e9) == costmodel.LATENCY_BOUND


def test_widening_ep_at_fixed_batch_falls_into_the_latency_trap() -> None:
    """The article's trap: same B, more P, smaller per-peer messages."""
    regimes = []
    for p in (8, 64, 512):
        w = costmodel.Workload(16_384, p, 8, 7168, 1)
        peer = costmodel.per_peer_message_bytes(costmodel.payload_bytes_per_rank(w), p)
        regimes.append(costmodel.regime(peer, 100e-6, 40e9))
    assert regimes == ["bandwidth-bound", "latency-bound", "latency-bound"]


def test_compute_and_epsilon() -> None:
    assert costmodel.compute_seconds(V3, ns_per_token=50, gamma=1.1) == pytest.approx(
        1.1 * 16_000 * 50e-9
    )
    taxed = costmodel.Workload(128_000, 64, 8, 7168, 1, epsilon=0.1)
    assert costmodel.payload_bytes_per_rank(taxed) == pytest.approx(1.1 * 114_688_000)
    assert costmodel.straggler_seconds_per_step([3.0, 2.0], [2.0, 2.0]) == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ranks", "0"], "ranks must be positive"),
        (["--latency-us", "100"], "both --latency-us and --bandwidth-gbps"),
        (["--epsilon", "-1"], "epsilon"),
    ],
)
def test_bad_model_arguments_get_a_clear_error(args: list[str], message: str) -> None:
    base = [
        "model",
        "--batch",
        "1000",
        "--ranks",
        "8",
        "--topk",
        "8",
        "--hidden",
        "7168",
        "--bytes-per-elem",
        "1",
    ]
    out = epwatch(*base, *args)
    assert out.returncode != 0
    assert message in out.stderr


def test_workload_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="topk"):
        costmodel.Workload(1000, 8, 0, 7168, 1)


def test_what_if_scales_volume_and_compute_with_batch_over_ranks() -> None:
    now = costmodel.what_if(100e-6, 40e9, volume_bytes=8e6, ranks=64, compute_s=300e-6)
    assert now.t_comm_s == pytest.approx(2 * (100e-6 + 8e6 / 40e9))
    assert not now.overlap_covers_comm  # 300 us of compute < 600 us of comm
    wider = costmodel.what_if(100e-6, 40e9, 8e6, 64, 300e-6, ranks_scale=2.0)
    assert wider.per_peer_message_bytes == pytest.approx(4e6 / 127)
    assert wider.t_compute_s == pytest.approx(150e-6)
    bigger = costmodel.what_if(100e-6, 40e9, 8e6, 64, 300e-6, batch_scale=4.0)
    assert bigger.t_compute_s == pytest.approx(1200e-6)
    assert bigger.t_comm_s == pytest.approx(2 * (100e-6 + 32e6 / 40e9))
    assert not bigger.overlap_covers_comm  # 1.2 ms of compute vs 1.8 ms of comm
    assert costmodel.what_if(100e-6, 40e9, 8e6, 64, 700e-6).overlap_covers_comm
