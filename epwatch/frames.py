"""Hook -> agent framing on the Unix socket (docs/contracts.md).

A frame is a 4-byte little-endian length and that many bytes of a serialized
``AgentMessage``. Both ends (the agent's receiver, hook clients, the demo's simulated
ranks, tests) share this one module so the framing is written down exactly once.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import Mapping

from epwatch import wire
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import Entered, IntervalColumns, PeerRows, RecordColumns

MAX_FRAME_BYTES = 64 << 20  # the protocol's bound; the agent's own is lower (16 MiB)
HEADER = struct.Struct("<I")
RUN_DIR = "/run/epwatch"


class FrameError(ValueError):
    """A frame the agent refuses; ``reason`` is the counter label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """The agent's socket as docs/contracts.md fixes it, for the agent and the hooks
    alike: ``$EPWATCH_AGENT_SOCKET``, else /run/epwatch/agent.sock when it exists or
    /run/epwatch is writable, else $TMPDIR's."""
    env = os.environ if env is None else env
    path = env.get("EPWATCH_AGENT_SOCKET")
    if path:
        return path
    # A running agent's socket wins even where this process cannot write the directory
    # (an engine running as another user than the agent).
    if os.path.exists(os.path.join(RUN_DIR, "agent.sock")) or (
        os.path.isdir(RUN_DIR) and os.access(RUN_DIR, os.W_OK)
    ):
        return os.path.join(RUN_DIR, "agent.sock")
    return os.path.join(tempfile.gettempdir(), "epwatch-agent.sock")


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError("oversized", f"frame of {len(payload)} bytes > {MAX_FRAME_BYTES}")
    return HEADER.pack(len(payload)) + payload


def hook_frame(
    ep_group: str,
    world_size: int,
    records: RecordColumns,
    peer_rows: PeerRows | None = None,
    entered: Entered | None = None,
    *,
    pid: int | None = None,
    hook_records_dropped: int = 0,
) -> bytes:
    """One framed hook message, as a hook (or a simulated rank) sends it."""
    msg = pb.AgentMessage(
        agent_id=f"hook:{os.getpid() if pid is None else pid}",
        seq=0,
        batch=wire.encode_records(ep_group, world_size, records, peer_rows, entered),
        stats=pb.AgentStats(hook_records_dropped=hook_records_dropped),
    )
    return encode_frame(msg.SerializeToString())


def interval_frame(
    ep_group: str,
    world_size: int,
    rows: IntervalColumns,
    *,
    pid: int | None = None,
) -> bytes:
    """One framed counter-mode message: interval records of one rank (wire schema 2)."""
    msg = pb.AgentMessage(
        agent_id=f"hook:{os.getpid() if pid is None else pid}",
        seq=0,
        intervals=wire.encode_intervals(ep_group, world_size, rows),
        schema=wire.INTERVALS_SCHEMA,
    )
    return encode_frame(msg.SerializeToString())


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes, or None on EOF before the first byte. Read in chunks as they
    arrive: memory follows what the peer sent, not the length it announced."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = sock.recv(min(n - got, 256 << 10))
        if not chunk:
            if got == 0:
                return None
            raise FrameError("truncated", f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """The next frame's payload, or None at a clean end of stream."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise FrameError("oversized", f"frame of {length} bytes > {max_bytes}")
    if length == 0:
        return b""
    payload = _recv_exact(sock, length)
    if payload is None:
        raise FrameError("truncated", "connection closed before the frame's payload")
    return payload


class FrameSender:
    """A blocking hook-side client: connect once, send frames. For tests and the demo;
    the engine-side hooks have their own non-blocking sender."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)

    def send(self, frame: bytes) -> None:
        self._sock.sendall(frame)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
