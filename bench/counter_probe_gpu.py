"""GPU check of the counter probe: counters written inside CUDA-graph replays are read
while the replays run, without synchronising the replay stream. Needs one CUDA GPU.

A toy kernel sequence stands in for DeepEP's low-latency kernels: a few matmuls (time
on the GPU) and in-place adds into the probe's int64 wait counters and int32 token
counters, captured once in a CUDA graph. The script enqueues every replay up front
(seconds of GPU work) and then only waits on the host while the hooks' flusher thread
snapshots the counters every ``--interval-ms`` on its own stream and ships interval
records to a local reader. If the probe synchronised the replay stream (or the
device), its first snapshot would already show all the enqueued work done; what it
must show instead is counters advancing through intermediate values, interval after
interval, while the replays are still queued.

Run: ``python bench/counter_probe_gpu.py`` on a machine with a GPU. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from epwatch import wire
from epwatch.hooks import get_probe, shutdown
from epwatch.hooks.deepep import CounterProbe
from epwatch.protos import epwatch_pb2 as pb

P, E_LOCAL = 8, 4


class Reader(threading.Thread):
    """The agent's end of the socket, reduced to decoding interval frames."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.rows: list = []

    def run(self) -> None:
        conn, _ = self.srv.accept()
        buf = b""
        while chunk := conn.recv(1 << 20):
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack("<I", buf[:4])[0]:
                n = struct.unpack("<I", buf[:4])[0]
                msg = pb.AgentMessage.FromString(buf[4 : 4 + n])
                buf = buf[4 + n :]
                if msg.WhichOneof("payload") == "intervals":
                    self.rows.append(wire.decode_intervals(msg.intervals))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--replays", type=int, default=400, help="replays enqueued (default 400)")
    p.add_argument("--matmuls", type=int, default=20, help="matmuls per replay (default 20)")
    p.add_argument("--size", type=int, default=4096, help="matmul size (default 4096)")
    p.add_argument("--interval-ms", type=float, default=50.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("counter_probe_gpu: no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory(prefix="epw-gpu-") as tmp:
        path = os.path.join(tmp, "agent.sock")
        reader = Reader(path)
        reader.start()
        probe = get_probe("gpu-check", 0, P, local_device=0, socket_path=path,
                          flush_interval_s=0.01)  # fmt: skip
        counters = CounterProbe(
            None, probe=probe, interval_ms=args.interval_ms, num_local_experts=E_LOCAL,
            start=False,
        )  # fmt: skip
        assert counters.enabled, counters.reason
        t = counters.tensors
        assert t is not None and t.dispatch_wait.is_cuda
        inc = torch.arange(1, P + 1, dtype=torch.int64, device="cuda") * 1000
        tok = torch.arange(1, E_LOCAL + 1, dtype=torch.int32, device="cuda")
        a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
        replay_stream = torch.cuda.Stream()

        def kernels() -> None:
            x = a
            for _ in range(args.matmuls):
                x = x @ a
                t.dispatch_wait.add_(inc)
                t.combine_wait.add_(inc)
                t.expert_tokens.add_(tok)

        with torch.cuda.stream(replay_stream):  # warm up outside the graph
            kernels()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=replay_stream):
            kernels()
        for x in (t.dispatch_wait, t.combine_wait, t.expert_tokens):
            x.zero_()  # before sampling starts; the probe itself never resets them
        torch.cuda.synchronize()
        counters.resume()  # sampling starts only after capture
        t0 = time.perf_counter()
        with torch.cuda.stream(replay_stream):
            for _ in range(args.replays):
                graph.replay()
        enqueue_s = time.perf_counter() - t0
        done = torch.cuda.Event()
        done.record(replay_stream)
        while not done.query():  # the host waits without a sync; the probe samples
            time.sleep(0.01)
        gpu_s = time.perf_counter() - t0
        time.sleep(4 * args.interval_ms / 1e3)  # one more snapshot after the end
        final = int(t.dispatch_wait[0].item())  # the script's own read, after the end
        counters.close()
        shutdown()
        reader.join(2)
    rows = reader.rows
    waits = np.concatenate([r.dispatch_wait_s for r in rows]) if rows else np.empty((0, P))
    cumulative = np.cumsum(waits[:, 0])
    total = cumulative[-1] if len(cumulative) else 0.0
    intermediate = int(((cumulative > 0) & (cumulative < 0.999 * total)).sum())
    per_rank = waits.sum(0)
    expected = np.arange(1, P + 1)
    ratio_ok = bool(total > 0 and np.allclose(per_rank / per_rank[0], expected, rtol=1e-6))
    result = {
        "replays": args.replays,
        "enqueue_s": round(enqueue_s, 4),
        "gpu_s": round(gpu_s, 3),
        "intervals": len(waits),
        "intermediate_snapshots": intermediate,
        "final_counter": final,
        "per_source_ratios_exact": ratio_ok,
        "no_sync_evidence": intermediate >= 3 and enqueue_s < 0.5 * gpu_s,
    }
    print(
        f"{args.replays} replays enqueued in {enqueue_s * 1e3:.0f} ms, done on the GPU after "
        f"{gpu_s:.2f} s; the probe shipped {len(waits)} intervals, {intermediate} of them "
        f"with counters between zero and their final value (read while replays were queued)"
    )
    print(json.dumps(result))
    return 0 if result["no_sync_evidence"] and ratio_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
