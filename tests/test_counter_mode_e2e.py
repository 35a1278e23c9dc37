"""Counter mode end to end: CounterProbes on CPU tensors -> a real agent -> a real
collector (both `epwatch` processes on 127.0.0.1) -> /metrics.

No GPU here, so a thread MIMICS DeepEP's low-latency kernels: each simulated step it
adds wait cycles per source rank into every rank's int64 counters and tokens into its
int32 per-expert counters, in place, as the kernels' atomic adds do inside graph
replays. Rank 3's NIC is slow both ways: its peers wait longer for its data and it
waits longer for theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from epwatch.cliargs import free_port
from epwatch.hooks import get_probe, shutdown
from epwatch.hooks.deepep import CounterProbe
from tests.helpers import get_json, samples, scrape, wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
P, E_LOCAL, SLOW = 8, 2, 3
SM_HZ = 1e9


class MimicKernels(threading.Thread):
    """DeepEP's cumulative adds for every rank of the group, one step at a time."""

    def __init__(self, probes: list[CounterProbe]) -> None:
        super().__init__(daemon=True)
        self.probes = probes
        self.stop = threading.Event()
        self.rng = np.random.default_rng(3)

    def run(self) -> None:
        while not self.stop.wait(0.005):
            wait = 20_000 * self.rng.lognormal(0.0, 0.1, (2, P, P))  # cycles, [phase, i, j]
            wait[:, :, SLOW] *= 1.6
            wait[:, SLOW, :] *= 1.6
            for i, probe in enumerate(self.probes):
                t = probe.tensors
                assert t is not None
                probe.step()
                t.dispatch_wait.add_(torch.from_numpy(wait[0, i].astype(np.int64)))
                t.combine_wait.add_(torch.from_numpy(wait[1, i].astype(np.int64)))
                t.expert_tokens.add_(torch.tensor([50, 50], dtype=torch.int32))


@pytest.fixture
def stack() -> Iterator[tuple[int, str]]:
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="epw-") as tmp:
        sock = os.path.join(tmp, "agent.sock")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "epwatch.cli", "collector",
                 f"--grpc-listen=127.0.0.1:{grpc_port}",
                 f"--metrics-listen=127.0.0.1:{metrics_port}",
                 "--update-interval=0.5", "--log-level=WARNING"],
                env=env,
            ),
            subprocess.Popen(
                [sys.executable, "-m", "epwatch.cli", "agent",
                 f"--collector=127.0.0.1:{grpc_port}", "--node=node-a", f"--socket={sock}",
                 "--flush-interval=0.1", "--log-level=WARNING", "--no-sampler.nvidia",
                 "--no-sampler.amd", "--no-sampler.netdev", "--no-sampler.infiniband"],
                env=env,
            ),
        ]  # fmt: skip
        try:
            wait_for(lambda: os.path.exists(sock), 60, "the agent's socket")
            wait_for(lambda: bool(scrape(metrics_port, timeout=1.0)), 60, "/metrics")
            yield metrics_port, sock
        finally:
            shutdown()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


def test_a_slow_nic_seen_only_through_kernel_counters(stack: tuple[int, str]) -> None:
    metrics_port, sock = stack
    fast = {"flush_interval_s": 0.05, "reconnect_interval_s": 0.1}
    probes = []
    for rank in range(P):
        probe = get_probe("graphs", rank, P, socket_path=sock, **fast)
        counters = CounterProbe(
            None, probe=probe, interval_ms=100, num_local_experts=E_LOCAL, sm_clock_hz=SM_HZ
        )
        assert counters.enabled, counters.reason
        probes.append(counters)
    kernels = MimicKernels(probes)
    kernels.start()

    def flagged() -> dict:
        text = scrape(metrics_port)
        return {
            dict(k)["rank"]: dict(k)["cause"]
            for k in samples(text, "epwatch_straggler")
            if dict(k).get("ep_group") == "graphs"
        }

    try:
        wait_for(lambda: flagged() == {str(SLOW): "network"}, 60, "rank 3 flagged network")
        text = scrape(metrics_port)
        mode = samples(text, "epwatch_group_mode")
        assert mode == {(("ep_group", "graphs"), ("mode", "counters")): 1.0}
        intervals = samples(text, "epwatch_ingest_intervals_total")
        assert intervals[(("ep_group", "graphs"),)] >= P * 10
        status, doc = get_json(metrics_port, "/api/v1/diagnosis?ep_group=graphs")
        assert status == 200
        (group,) = doc["groups"]
        assert group["mode"] == "counters"
        assert [(s["rank"], s["cause"]) for s in group["stragglers"]] == [(SLOW, "network")]
        assert group["gamma"]["median"] is None  # no per-collective times under graphs
    finally:
        kernels.stop.set()
        kernels.join()
        for c in probes:
            c.close()
