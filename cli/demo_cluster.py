"""The demo's simulated cluster: ``epwatch agent`` subprocesses (one per simulated
node), simulated ranks that send hook frames over the agents' sockets in real time,
and the nodes' GPU/NIC samples, consistent with the injected faults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from epwatch.frames import FrameSender, hook_frame
from epwatch.protos import epwatch_pb2 as pb
from epwatch.protos import epwatch_pb2_grpc as pb_grpc
from epwatch.schema import Entered, RecordColumns
from epwatch.simulator.engine import Simulation, StepChunk
from epwatch.simulator.node_samples import NodeSampleModel
from epwatch.simulator.scenario import Scenario

AGENT_FLAGS = [f"--no-sampler.{n}" for n in ("nvidia", "amd", "netdev", "infiniband")]


class Agents:
    """``epwatch agent`` subprocesses, one per simulated node."""

    def __init__(self, nodes: list[str], collector: str, workdir: str) -> None:
        self.sockets = {node: os.path.join(workdir, f"{node}.sock") for node in nodes}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "epwatch.cli",
                    "agent",
                    f"--collector={collector}",
                    f"--node={node}",
                    f"--socket={path}",
                    "--flush-interval=0.1",
                    "--backoff-max=1",
                    "--log-level=WARNING",
                    *AGENT_FLAGS,
                ],
                stdout=subprocess.DEVNULL,
            )
            for node, path in self.sockets.items()
        ]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for path in self.sockets.values():
            while True:
                if any(p.poll() is not None for p in self.procs):
                    raise RuntimeError("an agent exited during start-up")
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"agent socket {path} did not come up") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class Ranks:
    """Simulated ranks: each has its own hook connection and sends its records of a
    step as one frame, at ``steps_per_second`` forward passes per second."""

    def __init__(self, scenario: Scenario, sockets: dict[str, str], sps: float) -> None:
        self.sim = Simulation(scenario)
        self.scenario = scenario
        self.P = scenario.cluster.ranks
        self.group = scenario.cluster.ep_group
        self.senders = [FrameSender(sockets[scenario.node_of(r)]) for r in range(self.P)]
        self.sps = sps
        self.sent = 0
        self.step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ranks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.senders:
            s.close()

    def _run(self) -> None:
        t0 = time.monotonic()
        for chunk in self.sim.chunks():
            records = self.sim.records(chunk)
            order = np.lexsort((records.rank, records.step))
            records = records.take(order)
            first = int(chunk.steps[0])
            key = (records.step - first) * self.P + records.rank
            bounds = np.searchsorted(key, np.arange(len(chunk.steps) * self.P + 1))
            for i, step in enumerate(chunk.steps.tolist()):
                delay = t0 + step / self.sps - time.monotonic()
                if self._stop.wait(max(0.0, delay)):
                    return
                last = i == len(chunk.steps) - 1
                for rank in range(self.P):
                    j = i * self.P + rank
                    mine = records.take(slice(int(bounds[j]), int(bounds[j + 1])))
                    self._send(rank, mine, chunk, step, last)
                self.step = step

    def _send(
        self, rank: int, records: RecordColumns, chunk: StepChunk, step: int, last: bool
    ) -> None:
        rows = chunk.peer_rows
        sel = (rows.rank == rank) & (rows.step == step)
        peer = rows.take(sel) if sel.any() else None
        entered = None
        if last:  # heartbeat: where the rank is at the end of the chunk
            e = chunk.entered
            at = e.rank == rank
            entered = Entered(
                rank=e.rank[at], step=e.step[at], layer=e.layer[at], phase=e.phase[at]
            )
        frame = hook_frame(self.group, self.P, records, peer, entered, pid=100_000 + rank)
        try:
            self.senders[rank].send(frame)
        except OSError:
            self._stop.set()
            return
        self.sent += len(records)


class SimulatedSamplers:
    """Node samples consistent with the injected faults (the simulated nodes have no
    GPUs or NICs of their own), pushed to the collector the way an agent ships them:
    sequenced ``NodeSample`` messages over gRPC, one sender per node."""

    def __init__(self, scenario: Scenario, target: str) -> None:
        self.model = NodeSampleModel(scenario)
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.CollectorStub(self._channel)
        self._seq = 0
        self._last = time.monotonic()

    def push(self, step: int) -> None:
        now = time.monotonic()
        self._seq += 1
        for node, points in self.model.advance(max(step, 0), now - self._last).items():
            msg = pb.AgentMessage(
                agent_id=f"demo-samplers:{node}",
                node=node,
                seq=self._seq,
                sample=pb.NodeSample(
                    time_unix_ns=time.time_ns(), points=[p.to_proto() for p in points]
                ),
            )
            self._stub.Push(msg, timeout=5)
        self._last = now

    def close(self) -> None:
        self._channel.close()
