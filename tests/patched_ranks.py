"""Run a third-party MoE layer on P gloo ranks as subprocesses (``tests/*_worker.py``)
with a stand-in agent socket, and hand back every record their patched collectives
sent. Shared by the fairscale and DeepSpeed tests and their workers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from epwatch.cliargs import free_port
from epwatch.schema import RecordColumns
from tests.hook_sink import FrameSink

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(
    worker: str, world_size: int, args: list[str], expected_records: int, **env: str
) -> RecordColumns:
    """Start ``python -m <worker> --rank R --world-size P --port N <args>`` for every
    rank, wait for all to exit 0, and return the records they shipped."""
    with tempfile.TemporaryDirectory(prefix="epw-ranks-") as tmp:
        sock = os.path.join(tmp, "agent.sock")
        with FrameSink(sock) as sink:
            environ = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                "EPWATCH_AGENT_SOCKET": sock,
                "EPWATCH_FLUSH_INTERVAL_MS": "50",
                **env,
            }
            environ.pop("EPWATCH_DISABLE", None)
            common = ["--world-size", str(world_size), "--port", str(free_port()), *args]
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", worker, "--rank", str(r), *common],
                    cwd=ROOT,
                    env=environ,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for r in range(world_size)
            ]
            outputs = []
            try:
                outputs = [p.communicate(timeout=180) for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.communicate()
            for p, (out, err) in zip(procs, outputs, strict=True):
                assert p.returncode == 0, f"{worker} failed:\n{out}\n{err[-3000:]}"
            sink.wait_for(lambda: len(sink.records()) >= expected_records, 10)
            return sink.records()


def positions(records: RecordColumns, rank: int) -> list[tuple[int, int, int]]:
    """(step, layer, phase) of every record of ``rank``, in arrival order."""
    mine = records.take(records.rank == rank)
    return list(zip(mine.step.tolist(), mine.layer.tolist(), mine.phase.tolist(), strict=True))


def worker_arguments(steps: int, hot_bias: float) -> argparse.Namespace:
    """What every worker is told: its rank, the group, the run and the biased gate."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hot-rank", type=int, default=None)
    ap.add_argument("--hot-bias", type=float, default=hot_bias)
    return ap.parse_args()


def finish_worker(patch: Any, rank: int) -> None:
    """Wait for every rank, say what was timed, unpatch and ship what is queued."""
    import torch.distributed as dist

    from epwatch.hooks import shutdown

    dist.barrier()
    print(f"DONE rank {rank} calls={patch.calls} probe={patch.probe!r}", flush=True)
    patch.unpatch()
    shutdown(timeout=5.0)
    dist.destroy_process_group()
