"""Host cost of the counter probe (decode under CUDA graphs), per interval.

Each interval the hooks' flusher thread snapshots DeepEP's cumulative statistics of one
rank (int64 [P] waits for dispatch and combine, int32 [local experts] tokens), turns the
deltas into an interval record and frames it. This measures that work, in thread CPU
time, on CPU tensors that a thread keeps adding to (as the kernels do; on a GPU the
copy itself is an async copy on the probe's own stream, and the host work is the same
plus one event query). Frames go to a reader process over a real Unix socket.

Goal: well under 1% of one core at 4 Hz (250 ms intervals) with P = 256.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from epwatch.hooks import flusher_of, get_probe, shutdown
from epwatch.hooks.deepep import CounterProbe

READER = """
import socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1]); srv.listen(4)
print("ready", flush=True)
conn, _ = srv.accept()
while conn.recv(1 << 20):
    pass
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=int, default=256, help="world size P (default 256)")
    p.add_argument("--local-experts", type=int, default=8, help="experts per rank (default 8)")
    p.add_argument("--intervals", type=int, default=2000, help="intervals measured")
    p.add_argument("--hz", type=float, default=4.0, help="sampling rate for the share (4)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="epw-bench-") as tmp:
        sock = os.path.join(tmp, "agent.sock")
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, sock], stdout=subprocess.PIPE, text=True
        )
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        # The flusher thread is stopped: this loop is the flusher's work, timed.
        probe = get_probe("bench", 0, args.ranks, socket_path=sock, flush_interval_s=3600)
        counters = CounterProbe(
            None, probe=probe, interval_ms=1e-3, num_local_experts=args.local_experts,
            sm_clock_hz=1.5e9,
        )  # fmt: skip
        assert counters.enabled, counters.reason
        flusher = flusher_of(probe)
        assert flusher is not None
        t = counters.tensors
        assert t is not None
        ones_p = torch.ones(args.ranks, dtype=torch.int64)
        ones_e = torch.ones(args.local_experts, dtype=torch.int32)
        costs = []
        for i in range(args.intervals + 1):
            t.dispatch_wait.add_(ones_p)  # the kernels' adds: not the probe's cost
            t.combine_wait.add_(ones_p)
            t.expert_tokens.add_(ones_e)
            counters.step()
            c0 = time.thread_time_ns()
            flusher._ship_source(counters)
            if i:
                costs.append(time.thread_time_ns() - c0)
        sent = flusher.transport.frames_sent
        counters.close()
        shutdown()
        reader.wait(10)
    per_interval = statistics.median(costs)
    share = per_interval * args.hz / 1e9
    print(f"P={args.ranks}, {args.local_experts} local experts: {per_interval / 1e3:.1f} us "
          f"per interval (median of {len(costs)}), {share * 100:.4f}% of a core at "
          f"{args.hz:g} Hz; {sent} frames sent")  # fmt: skip
    print(json.dumps({
        "ranks": args.ranks,
        "local_experts": args.local_experts,
        "ns_per_interval": round(per_interval),
        "p90_ns_per_interval": round(statistics.quantiles(costs, n=10)[-1]),
        "hz": args.hz,
        "core_share": round(share, 6),
        "goal_core_share": 0.01,
        "frames_sent": sent,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
