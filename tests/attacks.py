"""The adversarial inputs of the security review, as functions over a running
collector's gRPC address or an agent's Unix socket. ``tests/test_chaos.py`` runs them
against real processes and asserts the outcome; ``bench/attacks.py`` prints the figures
(RSS, statuses, counts) before and after a change. Every loop is bounded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from epwatch import wire
from epwatch.frames import hook_frame
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import PeerRows, RecordColumns
from tests.helpers import make_peer_rows

PUSH = "/epwatch.v1.Collector/Push"
STREAM = "/epwatch.v1.Collector/Stream"


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = rest
    kb = lambda k: int(fields[k].split()[0]) / 1024  # noqa: E731
    return kb("VmRSS"), kb("VmHWM")


def records(
    rank: np.ndarray, step: np.ndarray, layer: np.ndarray, phase: np.ndarray | int = 0
) -> RecordColumns:
    n = len(rank)
    enter = 1_000_000 + np.asarray(step, dtype=np.int64) * 1_000_000
    return RecordColumns.from_arrays(
        rank=rank,
        local_device=np.zeros(n),
        step=step,
        layer=layer,
        phase=np.broadcast_to(phase, (n,)),
        enter_ns=enter,
        exit_ns=enter + 50_000,
        send_bytes=np.full(n, 1 << 20),
        recv_bytes=np.full(n, 1 << 20),
        recv_tokens=np.full(n, 128),
    )


def batch_message(
    group: str,
    world_size: int,
    recs: RecordColumns,
    *,
    seq: int,
    agent_id: str = "chaos",
    node: str = "chaos-node",
    peer_rows: PeerRows | None = None,
) -> bytes:
    batch = wire.encode_records(group, world_size, recs, peer_rows)
    msg = pb.AgentMessage(agent_id=agent_id, node=node, seq=seq, batch=batch)
    return msg.SerializeToString()


@dataclass
class Outcome:
    """What one call got back: the status name ('OK', 'INVALID_ARGUMENT', ...)."""

    status: str
    detail: str = ""
    ack: pb.Ack | None = None


class Client:
    """Raw Push and Stream over one channel (TLS and a token when given)."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> None:
        options = [("grpc.max_send_message_length", 256 << 20)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._push = self.channel.unary_unary(PUSH, response_deserializer=pb.Ack.FromString)
        self._stream = self.channel.stream_stream(STREAM, response_deserializer=pb.Ack.FromString)

    def push(self, raw: bytes, timeout: float = 30.0) -> Outcome:
        try:
            ack = self._push(raw, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, exc.details() or "")
        return Outcome("OK", ack=ack)

    def stream(self, messages: list[bytes], timeout: float = 30.0) -> tuple[str, list[pb.Ack]]:
        """Send ``messages`` on one stream; (final status, acks)."""
        acks: list[pb.Ack] = []
        try:
            for ack in self._stream(iter(messages), timeout=timeout, metadata=self.metadata):
                acks.append(ack)
        except grpc.RpcError as exc:
            return exc.code().name, acks
        return "OK", acks

    def idle_stream(self) -> tuple[grpc.Future, threading.Event]:
        """A stream that sends nothing until the event is set."""
        release = threading.Event()

        def nothing() -> Iterator[bytes]:
            release.wait()
            return
            yield b""  # pragma: no cover

        call = self._stream(nothing(), metadata=self.metadata)
        return call, release

    def close(self) -> None:
        self.channel.close()


# --- collector attacks ------------------------------------------------------------------
def huge_world(client: Client, world_size: int = 65536) -> list[Outcome]:
    """Two tiny Pushes that name a huge group: layers 0 and 127 of rank 0."""
    out = []
    for seq, layer in ((1, 0), (2, 127)):
        recs = records(np.array([0]), np.array([0]), np.array([layer]))
        out.append(client.push(batch_message("huge", world_size, recs, seq=seq, agent_id="hw")))
    return out


def sparse_scatter(
    client: Client, world_size: int, messages: int = 4, per_message: int = 36_000
) -> list[Outcome]:
    """Valid ~2 MB messages whose records land one per memory page of the step buffer."""
    out = []
    for m in range(messages):
        i = np.arange(per_message) + m * per_message
        rank = (i * 521) % world_size
        recs = records(rank, (i // 7) % 6, i % 128, i % 2)
        out.append(
            client.push(batch_message("sparse", world_size, recs, seq=m + 1, agent_id="sparse"))
        )
    return out


def long_names(client: Client, n: int, size: int = 1 << 20) -> list[Outcome]:
    """Stats-only Pushes whose node names are ``size`` bytes."""
    out = []
    for i in range(n):
        node = f"n{i}-" + "x" * size
        msg = pb.AgentMessage(agent_id=f"long-{i}", node=node, stats=pb.AgentStats())
        out.append(client.push(msg.SerializeToString()))
    return out


def forged_node(client: Client, node: str = "node-0", seq: int = 1) -> Outcome:
    """A batch claiming to come from another node."""
    recs = records(np.arange(8), np.zeros(8, np.int64), np.zeros(8, np.int64))
    return client.push(batch_message("ep0", 8, recs, seq=seq, agent_id="evil", node=node))


def forged_counters(client: Client, node: str = "victim") -> Outcome:
    stats = pb.AgentStats(records_dropped=2**64 - 1, hook_records_dropped=2**64 - 1)
    msg = pb.AgentMessage(agent_id="forger", node=node, stats=stats)
    return client.push(msg.SerializeToString())


def idle_streams(client: Client, n: int) -> Callable[[], None]:
    """Open ``n`` streams that send nothing; returns a function that ends them."""
    held = [client.idle_stream() for _ in range(n)]

    def release() -> None:
        for call, ev in held:
            ev.set()
            call.cancel()

    return release


def junk_groups(client: Client, n: int) -> list[Outcome]:
    out = []
    for i in range(n):
        recs = records(np.array([0]), np.array([0]), np.array([0]))
        out.append(client.push(batch_message(f"junk-{i}", 2, recs, seq=i + 1, agent_id="junk")))
    return out


def agent_churn(client: Client, n: int) -> int:
    """Stats-only Pushes from ``n`` distinct agent ids; returns how many were accepted."""
    ok = 0
    for i in range(n):
        msg = pb.AgentMessage(agent_id=f"churn-{i}", node=f"churn-{i % 16}", stats=pb.AgentStats())
        ok += client.push(msg.SerializeToString()).status == "OK"
    return ok


def wrapped_duration(client: Client) -> Outcome:
    """enter 2^63-1, exit -2^63+9: the int64 subtraction wraps to a small positive."""
    recs = records(np.array([0]), np.array([0]), np.array([0]))
    recs = RecordColumns(
        **{
            **recs.as_dict(),
            "enter_ns": np.array([2**63 - 1], np.int64),
            "exit_ns": np.array([-(2**63) + 9], np.int64),
        }
    )
    return client.push(batch_message("wrap", 1, recs, seq=1, agent_id="wrap"))


def unsequenced_batch_twice(client: Client) -> list[Outcome]:
    recs = records(np.arange(4), np.zeros(4, np.int64), np.zeros(4, np.int64))
    raw = batch_message("seq0", 4, recs, seq=0, agent_id="seq0", node="seq0-node")
    return [client.push(raw), client.push(raw)]


# --- agent socket attacks ---------------------------------------------------------------
def connect(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def announce_huge_frames(path: str, clients: int, announced: int = 64 << 20) -> list[socket.socket]:
    """Clients that announce a frame of ``announced`` bytes and send 1 KiB of it."""
    held = []
    for _ in range(clients):
        s = connect(path)
        s.sendall(struct.pack("<I", announced) + b"\0" * 1024)
        held.append(s)
    return held


def peer_row_frames(path: str, n: int, world_size: int = 512, rows: int = 256) -> int:
    """``n`` frames of per-peer rows only (no records), ~1 MiB each; returns bytes sent."""
    sent = 0
    with contextlib.closing(connect(path, timeout=30)) as s:
        for i in range(n):
            p = make_peer_rows(rows, world_size, step=i)
            frame = hook_frame("rows", world_size, RecordColumns.empty(), p)
            s.sendall(frame)
            sent += len(frame)
    return sent


def exhaust_descriptors(path: str, n: int) -> list[socket.socket]:
    """Open ``n`` idle connections (the caller's own RLIMIT_NOFILE must allow it)."""
    held: list[socket.socket] = []
    failures = 0
    while len(held) < n and failures < 100:  # a full backlog answers EAGAIN: pace
        try:
            held.append(connect(path, timeout=5))
            failures = 0
        except OSError:
            failures += 1
            time.sleep(0.02)
    return held


def send_as_user(path: str, uid: int, gid: int, frame: bytes) -> str:
    """Connect and send ``frame`` from a child running as uid/gid: 'sent', 'refused'
    (the socket's mode kept it out) or 'closed' (the agent hung up). Whether the agent
    used the frame is for its counters to say."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        result = b"sent"
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                s = connect(path)
            except OSError:
                result = b"refused"
            else:
                try:
                    s.sendall(frame)
                except OSError:
                    result = b"closed"
                s.close()
        finally:
            os.write(w, result)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if cond():
                return True
        time.sleep(0.05)
    return False
