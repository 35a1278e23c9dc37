"""Sampler flags, construction, the round runner and --sample-once output.

Also checks that on this machine, which has no GPU library, the NVIDIA and AMD
samplers say so (sampler_up 0 with a reason) while the network samplers still return
points from the real /sys/class/net.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from epwatch.agent.nodesample import NodeSampleEncoder
from epwatch.agent.samplers.amd import AmdSampler
from epwatch.agent.samplers.base import Sampler
from epwatch.agent.samplers.infiniband import InfinibandSampler
from epwatch.agent.samplers.netdev import NetdevSampler
from epwatch.agent.samplers.nvidia import NvidiaSampler
from epwatch.agent.samplers.registry import add_sampler_arguments, build_samplers, sample_once
from epwatch.agent.samplers.runner import RoundRunner, collect_round
from epwatch.catalogue import METRICS, Kind, Point, metric
from epwatch.protos import epwatch_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    return parser.parse_args(list(argv))


def _nvml_loads() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


def _amd_present() -> bool:
    try:
        import amdsmi  # noqa: F401
    except Exception:
        return shutil.which("rocm-smi") is not None
    return True


class Boom(Sampler):
    name = "boom"

    def collect(self) -> list[Point]:
        raise RuntimeError("sensor on fire")


class Fixed(Sampler):
    name = "fixed"

    def collect(self) -> list[Point]:
        return [metric("epwatch_gpu_lost", 0, gpu="0")]


class Blocking(Sampler):
    name = "blocking"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def collect(self) -> list[Point]:
        self.release.wait(5)
        return [metric("epwatch_gpu_lost", 0, gpu="1")]


def test_flags_enable_and_disable():
    names = [s.name for s in build_samplers(_parse())]
    assert names == ["nvidia", "amd", "netdev", "infiniband"]
    names = [s.name for s in build_samplers(_parse("--no-sampler.nvidia", "--no-sampler.amd"))]
    assert names == ["netdev", "infiniband"]
    assert [s.name for s in build_samplers({"sampler_netdev": False})] == [
        "nvidia",
        "amd",
        "infiniband",
    ]
    assert len(build_samplers(None)) == 4


def test_sysfs_root_and_local_ranks_reach_the_samplers():
    samplers = build_samplers(_parse("--sysfs-root", str(SYSFS), "--gpu-local-ranks", "2,3"))
    by_name = {s.name: s for s in samplers}
    assert isinstance(by_name["netdev"], NetdevSampler)
    assert by_name["netdev"].base == SYSFS / "class" / "net"
    assert isinstance(by_name["infiniband"], InfinibandSampler)
    assert by_name["infiniband"].base == SYSFS / "class" / "infiniband"
    assert isinstance(by_name["nvidia"], NvidiaSampler)
    assert by_name["nvidia"].local_ranks.local_rank(3) == 1
    assert isinstance(by_name["amd"], AmdSampler)
    assert by_name["amd"].local_ranks.local_rank(2) == 0
    points, _ = collect_round([by_name["infiniband"]])
    assert any(p.labels.get("device") == "mlx5_0" for p in points)


def test_bad_local_rank_list_is_a_usage_error():
    with pytest.raises(SystemExit):
        _parse("--gpu-local-ranks", "0,zero")


def test_this_machine_without_gpu_libraries():
    if _nvml_loads() or _amd_present():
        pytest.skip("this machine has a GPU library")
    samplers = build_samplers(_parse())
    points, results = collect_round(samplers)
    status = {r.name: r for r in results}
    assert not status["nvidia"].ok
    assert status["nvidia"].error == "NVML unavailable: libnvidia-ml.so.1 not found"
    assert not status["amd"].ok
    assert status["amd"].error.startswith("AMD SMI unavailable: amdsmi:")
    assert status["netdev"].ok
    up = {p.labels["sampler"]: p.value for p in points if p.name == "epwatch_sampler_up"}
    assert up == {
        "nvidia": 0.0,
        "amd": 0.0,
        "netdev": 1.0,
        "infiniband": 1.0 if status["infiniband"].ok else 0.0,
    }
    net = [p for p in points if p.name == "epwatch_nic_receive_bytes_total"]
    real = {d.name for d in Path("/sys/class/net").iterdir() if d.name != "lo"}
    assert net and {p.labels["device"] for p in net} <= real


def test_one_failing_sampler_never_aborts_the_others():
    points, results = collect_round([Boom(), Fixed()])
    assert [(r.name, r.ok) for r in results] == [("boom", False), ("fixed", True)]
    assert results[0].error == "RuntimeError: sensor on fire"
    names = {(p.name, p.labels.get("sampler")) for p in points}
    assert ("epwatch_sampler_up", "boom") in names
    assert ("epwatch_sampler_duration_seconds", "fixed") in names
    assert any(p.name == "epwatch_gpu_lost" for p in points)


def test_overrunning_sampler_is_reported_and_not_restarted():
    blocking = Blocking()
    runner = RoundRunner([blocking, Fixed()], timeout_s=0.2)
    first = {r.name: r for r in runner.run()}
    assert not first["blocking"].ok and "timed out" in first["blocking"].error
    assert first["fixed"].ok and first["fixed"].points
    second = {r.name: r for r in runner.run()}
    assert "still running" in second["blocking"].error
    blocking.release.set()
    assert runner.wait_idle(5)
    third = {r.name: r for r in runner.run()}
    assert third["blocking"].ok


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("epwatch-sampler-")]


def test_round_runner_keeps_one_worker_thread_per_sampler():
    before = set(_sampler_threads())
    runner = RoundRunner([Fixed(), Boom()], timeout_s=1.0)
    seen = []
    for _ in range(5):
        assert [r.ok for r in runner.run()] == [True, False]
        seen.append(set(_sampler_threads()) - before)
    assert len(seen[0]) == 2 and all(s == seen[0] for s in seen)
    runner.close()
    for t in seen[0]:
        t.join(5)
        assert not t.is_alive()


class Counting(Blocking):
    """Blocks until released; its point's value is the number of the call."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def collect(self) -> list[Point]:
        self.calls += 1
        call = self.calls
        self.release.wait(5)
        return [metric("epwatch_gpu_lost", call, gpu="1")]


def test_stuck_sampler_keeps_its_one_thread_and_is_restarted_after_it_returns():
    before = set(_sampler_threads())
    stuck = Counting()
    runner = RoundRunner([stuck], timeout_s=0.05)
    assert "timed out" in runner.run()[0].error
    for _ in range(3):
        assert "still running" in runner.run()[0].error
    assert stuck.calls == 1
    assert len(set(_sampler_threads()) - before) == 1
    stuck.release.set()
    assert runner.wait_idle(5)
    # the next round runs it again and reports that call, not the late first one
    runner.timeout_s = 5.0
    result = runner.run()[0]
    assert result.ok and [p.value for p in result.points] == [2.0]
    runner.close()


class Timed(Sampler):
    """Records when its collect() ran; sleeps ``seconds`` in it."""

    def __init__(self, name: str, seconds: float, log: list[tuple[str, float, float]]) -> None:
        super().__init__()
        self.name, self.seconds, self.log = name, seconds, log

    def collect(self) -> list[Point]:
        start = time.monotonic()
        time.sleep(self.seconds)
        self.log.append((self.name, start, time.monotonic()))
        return []


def test_quick_samplers_run_one_after_another_a_slow_one_only_delays_the_next():
    log: list[tuple[str, float, float]] = []
    quick = [Timed(f"q{i}", 0.01, log) for i in range(3)]
    runner = RoundRunner(quick, timeout_s=2.0)
    assert all(r.ok for r in runner.run())
    spans = sorted((a, b) for _, a, b in log)
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))
    runner.close()
    log.clear()
    slow = Timed("slow", 1.0, log)
    runner = RoundRunner([slow, *quick], timeout_s=2.0)  # grace: 2.0 / (2 * 4) = 0.25 s
    began = time.monotonic()
    results = runner.run()
    assert all(r.ok for r in results)
    starts = {name: a - began for name, a, _ in log}
    assert starts["q0"] < 0.6 and starts["q2"] < 0.9  # not after the slow one's 1 s
    runner.close()


def test_replaced_sampler_gets_a_fresh_worker():
    first, second = Fixed(), Fixed()
    runner = RoundRunner([first], timeout_s=1.0)
    assert runner.run()[0].ok
    runner.samplers = [second]
    assert runner.run()[0].ok
    assert len(runner._workers) == 1
    runner.close()


def test_agent_round_has_every_point_and_status_and_releases_the_samplers():
    """What `epwatch agent` (and bench/agent_footprint.py) runs once per interval."""
    from epwatch.cli.agent import make_sample_round

    class Closing(Fixed):
        closed = False

        def close(self) -> None:
            self.closed = True

    closing = Closing()
    one_round, close = make_sample_round([Boom(), closing], interval_s=1.0)
    points, results = one_round()
    assert [(r.name, r.ok) for r in results] == [("boom", False), ("fixed", True)]
    names = [(p.name, p.labels.get("sampler")) for p in points]
    assert names == [
        ("epwatch_sampler_up", "boom"),
        ("epwatch_sampler_duration_seconds", "boom"),
        ("epwatch_gpu_lost", None),
        ("epwatch_sampler_up", "fixed"),
        ("epwatch_sampler_duration_seconds", "fixed"),
    ]
    close()
    assert closing.closed


def test_sample_once_is_json_ready():
    samplers = [Boom(), NetdevSampler(SYSFS), InfinibandSampler(SYSFS)]
    out = json.loads(json.dumps(sample_once(samplers)))
    by_name = {s["name"]: s for s in out["samplers"]}
    assert by_name["boom"] == {
        "name": "boom",
        "ok": False,
        "duration_s": by_name["boom"]["duration_s"],
        "error": "RuntimeError: sensor on fire",
        "skipped": [],
        "points": [],
    }
    ib = by_name["infiniband"]
    assert ib["ok"] and any("VL15_dropped" in s for s in ib["skipped"])
    point = next(
        p
        for p in ib["points"]
        if p["name"] == "epwatch_nic_transmit_bytes_total"
        and p["labels"] == {"device": "mlx5_0", "port": "1"}
    )
    assert point == {
        "name": "epwatch_nic_transmit_bytes_total",
        "labels": {"device": "mlx5_0", "port": "1"},
        "value": 123456789 * 4,
        "kind": "counter",
    }


def test_node_sample_on_the_wire():
    points, results = collect_round([Boom(), InfinibandSampler(SYSFS)])
    back = pb.AgentMessage.FromString(NodeSampleEncoder().encode(123, points, results)).sample
    assert back.time_unix_ns == 123
    assert [s.name for s in back.samplers] == ["boom", "infiniband"]
    assert back.samplers[0].error == "RuntimeError: sensor on fire" and not back.samplers[0].ok
    xmit = [p for p in back.points if p.name == "epwatch_nic_transmit_wait_total"]
    assert xmit and all(p.kind == pb.MetricPoint.COUNTER and p.help for p in xmit)
    up = [p for p in back.points if p.name == "epwatch_sampler_up"]
    assert {p.labels["sampler"]: p.value for p in up} == {"boom": 0.0, "infiniband": 1.0}


def _contract_table() -> dict[str, str]:
    """name -> type from the "Node samples" table of docs/contracts.md."""
    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("Node samples (from", 1)[1].split("\n\n", 2)[1]
    table: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_.]+)`", cells[0])
        first = names[0]
        for name in names:
            if name.startswith("..."):  # `..._receive_...` shorthand: swap the middle word
                word = name.strip("._")
                name = re.sub(r"_(transmit|receive)_", f"_{word}_", first)
            table[name] = cells[1]
    return table


def test_catalogue_matches_the_contract():
    table = _contract_table()
    assert "epwatch_gpu_nvlink_receive_bytes_total" in table
    assert set(METRICS) <= set(table), set(METRICS) - set(table)
    for name, (kind, _) in METRICS.items():
        assert table[name] == ("counter" if kind is Kind.COUNTER else "gauge"), name
        assert name.endswith("_total") == (kind is Kind.COUNTER), name


def test_absent_hardware_is_info_once_and_a_failure_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from epwatch.agent.samplers.base import SamplerUnavailable, run_sampler

    class Absent(Sampler):
        name = "absent-hw-test"

        def collect(self):  # type: ignore[no-untyped-def]
            raise SamplerUnavailable("no /sys/class/infiniband")

    class Broken(Sampler):
        name = "broken-hw-test"

        def collect(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("sensor on fire")

    with caplog.at_level("DEBUG", logger="epwatch"):
        for _ in range(3):
            run_sampler(Absent())
            run_sampler(Broken())
    absent = [r for r in caplog.records if "absent-hw-test" in r.getMessage()]
    assert [r.levelname for r in absent] == ["INFO", "DEBUG", "DEBUG"]
    broken = [r for r in caplog.records if "broken-hw-test" in r.getMessage()]
    assert [r.levelname for r in broken] == ["WARNING", "DEBUG", "DEBUG"]
