"""A full round of the real samplers through a collector: every GPU and NIC series is
re-exposed with its node and /metrics stays promtool-clean. The NVIDIA sampler answers
from recorded NVML outputs (no GPU here); InfiniBand reads the fixture sysfs tree,
netdev both the fixture tree and this machine's real /sys/class/net."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from epwatch.agent.nodesample import NodeSampleEncoder
from epwatch.agent.samplers.infiniband import InfinibandSampler
from epwatch.agent.samplers.netdev import NetdevSampler
from epwatch.agent.samplers.nvidia import NvidiaSampler
from epwatch.agent.samplers.runner import collect_round
from epwatch.protos import epwatch_pb2 as pb
from tests.helpers import samples, scrape, start_collector, stub
from tests.recorded_nvml import RecordedNvml, load_recording

pytestmark = pytest.mark.timeout(60)
FIXTURE = Path(__file__).parent / "fixtures" / "sysfs"


def test_a_sampler_round_is_reexposed_per_node_and_promtool_clean() -> None:
    samplers = [
        NvidiaSampler(nvml=RecordedNvml(load_recording())),
        InfinibandSampler(FIXTURE),
        NetdevSampler(FIXTURE),
        NetdevSampler("/sys"),
    ]
    points, results = collect_round(samplers)
    encoded = NodeSampleEncoder().encode(123, points, results)
    sample = pb.AgentMessage.FromString(encoded).sample
    svc = start_collector(estimators=None, metrics=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
            msg = pb.AgentMessage(agent_id="a", node="gpu-node-7", seq=1, sample=sample)
            assert stub(ch).Push(msg, timeout=10).code == 0
        text = scrape(svc.metrics_port)
    finally:
        svc.stop(grace_s=0.2)
    sent = {p.name for p in sample.points}
    assert {
        "epwatch_gpu_sm_clock_hertz",
        "epwatch_gpu_clock_event_active",
        "epwatch_nic_transmit_bytes_total",
        "epwatch_nic_transmit_wait_total",
    } <= sent
    for name in sent:
        series = samples(text, name)
        assert series, f"{name} was sent but is not exposed"
        assert all(dict(labels)["node"] == "gpu-node-7" for labels in series), name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: apt-get install --no-install-recommends prometheus")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
