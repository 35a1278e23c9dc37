"""Collector ingest throughput through real gRPC, with the estimators running.

Starts ``epwatch collector`` as a subprocess and ``--senders`` sender processes. Each
sender owns one EP group of ``--ranks`` ranks x ``--layers`` layers, pre-encodes
``--cycle-steps`` steps of simulated records into batches of ``--batch-records``,
and streams them with up to ``--window`` unacknowledged, like an agent. To keep steps
advancing (the estimators must finalise every step, not drop stale ones) each cycle
appends a small override of the batch's ``step`` column to the pre-encoded bytes;
protobuf merges it, the collector still parses and validates every byte.

Measured from the collector's own ``epwatch_ingest_records_total`` over a window after
a warm-up. Prints figures, the last line as JSON with ``records_per_second``.
Goal: at least 1.25 M records/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from epwatch.cliargs import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _sum(text: str, name: str) -> float:
    """Sum of every sample called ``name`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


def _encode_cycle(group: str, args: argparse.Namespace) -> tuple[list[bytes], list, int]:
    """Pre-encoded batch payloads of one cycle, their step columns, steps per cycle."""
    import numpy as np

    from epwatch import wire
    from epwatch.protos import epwatch_pb2 as pb
    from epwatch.simulator.engine import Simulation
    from epwatch.simulator.scenario import load_scenario

    scenario = load_scenario(
        {
            "seed": 11,
            "steps": args.cycle_steps,
            "cluster": {"ranks": args.ranks, "ranks_per_node": 8, "ep_group": group},
            "model": {"layers": args.layers},
            "faults": [{"kind": "slow_gpu", "rank": 3, "start_step": 0, "factor": 1.2}],
        }
    )
    sim = Simulation(scenario)
    payloads, steps = [], []
    for chunk in sim.chunks():
        records = sim.records(chunk)
        for i in range(0, len(records), args.batch_records):
            part = records.take(slice(i, i + args.batch_records))
            batch = wire.encode_records(group, args.ranks, part)
            payloads.append(pb.AgentMessage(batch=batch).SerializeToString())
            steps.append(np.array(part.step))
    return payloads, steps, args.cycle_steps


def _sender(
    index: int, target: str, args: argparse.Namespace, ready: mp.Event, go: mp.Event
) -> None:
    import grpc

    from epwatch.protos import epwatch_pb2 as pb

    payloads, steps, cycle = _encode_cycle(f"bench{index}", args)
    agent_id = f"bench-{index}-{os.getpid()}"
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    stream = channel.stream_stream(
        "/epwatch.v1.Collector/Stream", response_deserializer=pb.Ack.FromString
    )
    window = threading.Semaphore(args.window)
    stop = threading.Event()

    def requests():
        seq, n = 0, 0
        while not stop.is_set():
            offset = (n // len(payloads)) * cycle
            i = n % len(payloads)
            n += 1
            seq += 1
            override = b""
            if offset:
                step = pb.RecordBatch(step=(steps[i] + offset).astype("<i8").tobytes())
                override = pb.AgentMessage(batch=step).SerializeToString()
            header = pb.AgentMessage(agent_id=agent_id, node=f"bench-node-{index}", seq=seq)
            while not window.acquire(timeout=0.5):
                if stop.is_set():
                    return
            yield header.SerializeToString() + payloads[i] + override

    ready.set()
    go.wait()
    rejected = 0
    call = stream(requests())
    try:
        for ack in call:
            window.release()
            if ack.code:
                rejected += 1
                if rejected < 3:
                    print(f"sender {index}: rejected seq {ack.seq}: {ack.message}", file=sys.stderr)
    except grpc.RpcError:
        pass
    finally:
        stop.set()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--senders", type=int, default=2)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--batch-records", type=int, default=16_384)
    p.add_argument("--cycle-steps", type=int, default=64)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args()

    grpc_port, metrics_port = free_port(), free_port()
    collector = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "epwatch.cli",
            "collector",
            f"--grpc-listen=127.0.0.1:{grpc_port}",
            f"--metrics-listen=127.0.0.1:{metrics_port}",
            "--log-level=WARNING",
        ],
        cwd=ROOT,
    )
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    senders, readies = [], []
    try:
        for i in range(args.senders):
            ready = ctx.Event()
            proc = ctx.Process(
                target=_sender, args=(i, f"127.0.0.1:{grpc_port}", args, ready, go), daemon=True
            )
            proc.start()
            senders.append(proc)
            readies.append(ready)
        deadline = time.monotonic() + 120
        for ready in readies:
            ready.wait(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                _scrape(metrics_port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        go.set()
        time.sleep(args.warmup)
        before = _scrape(metrics_port)
        t0, n0 = time.monotonic(), _sum(before, "epwatch_ingest_records_total")
        time.sleep(args.duration)
        text = _scrape(metrics_port)
        t1, n1 = time.monotonic(), _sum(text, "epwatch_ingest_records_total")
    finally:
        for proc in senders:
            proc.terminate()
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(15)
        except subprocess.TimeoutExpired:
            collector.kill()
    rate = (n1 - n0) / (t1 - t0)
    result = {
        "records_per_second": round(rate),
        "records": int(n1 - n0),
        "seconds": round(t1 - t0, 2),
        "senders": args.senders,
        "batch_records": args.batch_records,
        "ranks": args.ranks,
        "layers": args.layers,
        "steps_finalised": int(
            _sum(text, "epwatch_group_steps_total") - _sum(before, "epwatch_group_steps_total")
        ),
        "estimator_pass_seconds": round(_sum(text, "epwatch_estimator_duration_seconds"), 4),
        "rejected": int(_sum(text, "epwatch_ingest_rejected_total")),
        "cpus": os.cpu_count(),
    }
    print(
        f"ingest: {rate / 1e6:.2f} M records/s over {t1 - t0:.1f} s "
        f"({args.senders} senders, {args.batch_records}-record batches, estimators running)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
