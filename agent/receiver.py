"""The agent's Unix socket: hook frames in, validated columns out to the batcher.

Frames are validated here, one rank's frame at a time, because one bad frame merged
into a node-wide batch would make the collector reject the whole batch. The socket is
a trust boundary (docs/security.md): who may connect is the socket's mode and group
plus a peer-credential check, and what a connection can make the agent hold is
bounded (frame size, a shared read buffer, a byte rate, a connection count).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from epwatch import wire
from epwatch.agent.batcher import Batcher
from epwatch.frames import HEADER, FrameError
from epwatch.names import MAX_NAME_BYTES, check_name
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import RecordError

log = logging.getLogger(__name__)

MAX_HOOKS_TRACKED = 4096


class ReceiverCounters:
    """What the receiver saw, for the agent's metrics and AgentStats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records_received = 0
        self.frames_received = 0
        self.frames_rejected: Counter[str] = Counter()
        self._hook_drops: OrderedDict[str, int] = OrderedDict()
        self._hook_drops_retired = 0  # totals of hooks evicted from the table

    def received(self, records: int) -> None:
        with self._lock:
            self.frames_received += 1
            self.records_received += records

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.frames_rejected[reason] += 1

    def hook_dropped(self, hook_id: str, total: int) -> None:
        """A hook's running count of records it dropped (agent absent or slow)."""
        with self._lock:
            self._hook_drops[hook_id] = max(total, self._hook_drops.get(hook_id, 0))
            self._hook_drops.move_to_end(hook_id)
            while len(self._hook_drops) > MAX_HOOKS_TRACKED:
                _, old = self._hook_drops.popitem(last=False)
                self._hook_drops_retired += old

    def rejected_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self.frames_rejected)

    @property
    def hook_records_dropped(self) -> int:
        with self._lock:
            return self._hook_drops_retired + sum(self._hook_drops.values())


def _prepare_path(path: str) -> None:
    """Remove a stale socket file (no listener), refuse to clobber anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(f"another agent is listening on {path}")


@dataclass(frozen=True)
class SocketPolicy:
    """Who may send hook frames, and how much. Defaults: the socket is 0660 and only
    root, the agent's own user and the socket's group may send; each connection
    reads at most ``max_frame_bytes`` per frame and ``bytes_per_s`` on average (a
    burst of one frame); all connections together hold at most ``buffer_bytes`` of
    partly read frames; at most ``max_clients`` connections at once."""

    mode: int = 0o660
    group: str | None = None
    allow_uids: frozenset[int] | None = None  # None: root and the agent's user
    allow_gids: frozenset[int] | None = None  # None: the socket's group
    max_frame_bytes: int = 16 << 20
    bytes_per_s: float = 64 << 20
    buffer_bytes: int = 64 << 20
    max_clients: int = 256


class _Budget:
    """Bytes of partly read frames across connections (a counting semaphore)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _Throttle:
    """A token bucket: ``rate`` bytes per second, a burst of ``burst`` bytes; a
    connection over its rate sleeps (the sender sees a full socket, not an error)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def spend(self, n: int, stop: threading.Event) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        if self.tokens < 0:
            stop.wait(-self.tokens / self.rate)


_CHUNK = 256 << 10


class Receiver:
    """Accepts hook connections; one thread per connected rank."""

    def __init__(
        self,
        path: str,
        batcher: Batcher,
        counters: ReceiverCounters,
        policy: SocketPolicy | None = None,
    ) -> None:
        self.path = path
        self._batcher = batcher
        self.counters = counters
        self.policy = policy = policy or SocketPolicy()
        self._stop = threading.Event()
        _prepare_path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        # Serving engines often run as another user than the agent: the socket's mode
        # and group, not the agent's umask, decide who may connect; the peer
        # credentials decide whose frames are read.
        gid = grp.getgrnam(policy.group).gr_gid if policy.group else os.getegid()
        if policy.group:
            os.chown(path, -1, gid)
        os.chmod(path, policy.mode)
        self._allow_uids = (
            policy.allow_uids if policy.allow_uids is not None else frozenset({0, os.geteuid()})
        )
        self._allow_gids = policy.allow_gids if policy.allow_gids is not None else frozenset({gid})
        self._budget = _Budget(policy.buffer_bytes)
        self._listener.listen(256)
        self._listener.setblocking(False)
        # Wait on the listener and this pair: stop() wakes the accept loop at once,
        # which otherwise sleeps while no rank connects instead of polling. A selector
        # (epoll), not select(): the samplers keep many files open, and select() fails
        # on descriptors above 1023.
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._logged: dict[str, float] = {}
        self._thread = threading.Thread(target=self._accept_loop, name="receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _log(self, key: str, msg: str, *args: object) -> None:
        """At most one line per kind of trouble per 10 s (an attack must not flood)."""
        now = time.monotonic()
        if now - self._logged.get(key, -1e9) > 10.0:
            self._logged[key] = now
            log.warning(msg, *args)

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                events = self._selector.select()
                if not any(key.fileobj is self._listener for key, _ in events):
                    continue  # woken by stop()
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the connection went away before we took it
            except OSError as exc:
                if self._stop.is_set():
                    return
                # Out of descriptors (EMFILE, ENFILE) or memory: the connection waits in
                # the backlog; try again a little later, never give up accepting.
                backoff = min(1.0, max(0.05, 2 * backoff))
                self.counters.rejected("accept_failed")
                self._log(
                    "accept",
                    "cannot accept hook connections (%s); retrying in %.2f s",
                    exc.strerror or exc,
                    backoff,
                )
                self._stop.wait(backoff)
                continue
            backoff = 0.0
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        refused = self._refusal(conn)
        if refused is not None:
            self.counters.rejected(refused)
            conn.close()
            return
        conn.settimeout(None)
        with self._lock:
            self._conns.add(conn)
        try:
            threading.Thread(target=self._serve, args=(conn,), name="hook", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: like a full descriptor table
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self.counters.rejected("accept_failed")
            self._log("thread", "cannot serve a hook connection: %s", exc)

    def _refusal(self, conn: socket.socket) -> str | None:
        """Why this connection is refused (a counter reason), or None."""
        with self._lock:
            if len(self._conns) >= self.policy.max_clients:
                self._log(
                    "clients", "%d hook connections already; refusing another", len(self._conns)
                )
                return "too_many_clients"
        pid, uid, gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        if uid in self._allow_uids or gid in self._allow_gids:
            return None
        if self._allow_gids & _supplementary_groups(pid):
            return None
        self._log(
            "peer",
            "refusing hook connection from pid %d (uid %d, gid %d): not in --allow-uid/--allow-gid",
            pid,
            uid,
            gid,
        )
        return "peer_credentials"

    def _serve(self, conn: socket.socket) -> None:
        throttle = _Throttle(
            self.policy.bytes_per_s, max(self.policy.bytes_per_s, self.policy.max_frame_bytes)
        )
        try:
            while not self._stop.is_set():
                try:
                    frame = self._read_frame(conn, throttle)
                except FrameError as exc:
                    self.counters.rejected(exc.reason)
                    self._log(exc.reason, "closing hook connection: %s", exc)
                    return
                except OSError:
                    return
                if frame is None:
                    return
                if not self.handle_frame(frame):
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _read_frame(self, conn: socket.socket, throttle: _Throttle) -> bytes | None:
        """The next frame, read as it arrives: memory follows the bytes received, never
        the length a client announces, and comes from the receiver's shared budget."""
        header = _recv_exact(conn, HEADER.size)
        if header is None:
            return None
        (length,) = HEADER.unpack(header)
        if length > self.policy.max_frame_bytes:
            raise FrameError(
                "oversized", f"frame of {length} bytes > {self.policy.max_frame_bytes}"
            )
        chunks: list[bytes] = []
        held = 0
        try:
            while held < length:
                want = min(_CHUNK, length - held)
                if not self._budget.take(want):
                    raise FrameError(
                        "overload",
                        "hook frames being read exceed the agent's "
                        "read buffer; closing this connection",
                    )
                chunk = conn.recv(want)
                self._budget.give(want - len(chunk))
                if not chunk:
                    raise FrameError(
                        "truncated", f"connection closed after {held} of {length} bytes"
                    )
                chunks.append(chunk)
                held += len(chunk)
                throttle.spend(len(chunk), self._stop)
            return b"".join(chunks)
        finally:
            self._budget.give(held)

    def handle_frame(self, frame: bytes) -> bool:
        """Validate one frame and pass it on; False means close the connection."""
        try:
            msg = pb.AgentMessage.FromString(frame)
        except DecodeError:
            self.counters.rejected("garbage")
            self._log("garbage", "closing hook connection: frame is not an AgentMessage")
            return False
        if msg.HasField("stats") and msg.agent_id:
            if len(msg.agent_id) > MAX_NAME_BYTES:
                self.counters.rejected("bad_name")
                return False
            self.counters.hook_dropped(msg.agent_id, msg.stats.hook_records_dropped)
        kind = msg.WhichOneof("payload")
        if kind not in ("batch", "intervals"):
            return True  # stats-only frames are fine; hooks do not send samples
        try:
            payload = msg.intervals if kind == "intervals" else msg.batch
            if payload.ep_group:
                check_name("ep_group", payload.ep_group)
            if kind == "intervals":
                rows = wire.decode_intervals(msg.intervals)
                self.counters.received(len(rows))
                self._batcher.add_intervals(payload.ep_group, payload.world_size, rows)
                return True
            d = wire.decode_batch(msg.batch)
        except RecordError as exc:
            self.counters.rejected(exc.reason)
            self._log(exc.reason, "dropping hook frame from %s: %s", msg.agent_id or "?", exc)
            return True
        self.counters.received(len(d.records))
        self._batcher.add(d.ep_group, d.world_size, d.records, d.peer_rows, d.entered)
        return True


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n (small) bytes, or None on EOF before the first byte."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if not buf:
                return None
            raise FrameError("truncated", f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _supplementary_groups(pid: int) -> frozenset[int]:
    """The groups a process belongs to besides its primary one (SO_PEERCRED has only
    that); empty when /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()
