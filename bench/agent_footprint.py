"""The agent's footprint on a loaded node: CPU share of one core and peak RSS.

A real ``epwatch collector`` runs in one process; the agent runs in a child process
that samples 8 GPUs through NVML (an injected backend answering from the recorded
H100 outputs in tests/fixtures/gpu: there is no GPU here) and 8 HCA ports (copies of
the fixture sysfs tree's ConnectX port) at 1 Hz, and ships every round to the
collector. The child's CPU time and peak RSS come from the kernel (wait4 rusage).
Prints the figures, the last line as JSON. Goal: under 1% of a core and under 80 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from epwatch.cliargs import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "sysfs"


def sysfs_with_eight_hcas(dest: Path) -> Path:
    """A sysfs tree with mlx5_0..mlx5_7, each a copy of the fixture's mlx5_0."""
    ib = dest / "class" / "infiniband"
    for i in range(8):
        shutil.copytree(FIXTURE / "class" / "infiniband" / "mlx5_0", ib / f"mlx5_{i}")
    shutil.copytree(FIXTURE / "class" / "net", dest / "class" / "net")
    return dest


def child(collector: str, sysfs: str, seconds: float) -> None:
    """The agent process under measurement."""
    sys.path.insert(0, str(ROOT))
    from epwatch.agent.daemon import Agent, AgentConfig
    from epwatch.agent.samplers.infiniband import InfinibandSampler
    from epwatch.agent.samplers.netdev import NetdevSampler
    from epwatch.agent.samplers.nvidia import NvidiaSampler
    from epwatch.cli.agent import make_sample_round
    from tests.recorded_nvml import RecordedNvml, load_recording

    samplers = [
        NvidiaSampler(nvml=RecordedNvml(load_recording())),
        InfinibandSampler(sysfs),
        NetdevSampler(sysfs),
    ]
    one_round, close = make_sample_round(samplers, interval_s=1.0)  # what `epwatch agent` runs

    with tempfile.TemporaryDirectory(prefix="epwatch-bench-") as sockdir:
        sock = os.path.join(sockdir, "agent.sock")
        agent = Agent(AgentConfig(collector=collector, node="bench-node", socket_path=sock),
                      one_round)  # fmt: skip
        agent.start()
        time.sleep(2.0)  # first rounds: NVML init, event set, first connection
        cpu0, t0 = time.process_time(), time.perf_counter()
        time.sleep(seconds)
        steady = (time.process_time() - cpu0) / (time.perf_counter() - t0)
        agent.stop()
        points = len(one_round()[0])
        close()
    print(json.dumps({"points_per_round": points, "steady_share": steady}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=30.0, help="how long the agent runs")
    p.add_argument("--child", nargs=3, metavar=("COLLECTOR", "SYSFS", "SECONDS"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], float(args.child[2]))
        return
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listen = ["--grpc-listen", f"127.0.0.1:{grpc_port}"]
    listen += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    collector = subprocess.Popen(
        [sys.executable, "-m", "epwatch.cli", "collector", *listen],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sysfs = sysfs_with_eight_hcas(Path(tmp))
            start = time.perf_counter()
            agent = subprocess.Popen(
                [sys.executable, __file__, "--child", f"127.0.0.1:{grpc_port}", str(sysfs),
                 str(args.seconds)],
                env=env, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            _, status, usage = os.wait4(agent.pid, 0)
            wall = time.perf_counter() - start
            out = agent.stdout.read() if agent.stdout else ""
        if status != 0:
            raise SystemExit(f"agent child failed with status {status}")
        rounds = json.loads(out.strip().splitlines()[-1])
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        collector.terminate()
        collector.wait(10)
    gpu_series = sum(1 for line in metrics.splitlines() if line.startswith("epwatch_gpu_sm_clock"))
    cpu = usage.ru_utime + usage.ru_stime
    # Start-up (importing grpc, numpy, pynvml) is a one-off; the steady share is what a
    # node pays all day, so both are shown.
    result = {
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 3),
        "cpu_share_of_core": round(rounds["steady_share"], 4),
        "cpu_share_of_core_incl_startup": round(cpu / wall, 4),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "points_per_round": rounds["points_per_round"],
        "gpu_series_at_collector": gpu_series,
        "goal_cpu_share": 0.01,
        "goal_peak_rss_mb": 80,
    }
    print(
        f"agent: {100 * rounds['steady_share']:.2f}% of a core steady ({cpu:.2f} s CPU over "
        f"{wall:.1f} s = {100 * cpu / wall:.2f}% with start-up), peak RSS "
        f"{result['peak_rss_mb']} MB, {rounds['points_per_round']} points per 1 Hz round; "
        f"the collector shows SM clocks of {gpu_series} GPUs (the recording has one lost GPU)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
