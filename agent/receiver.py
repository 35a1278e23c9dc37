"""The agent's Unix socket: hook frames in, validated columns out to the batcher.

Frames are validated here, one rank's frame at a time, because one bad frame merged
into a node-wide batch would make the collector reject the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import threading
from collections import Counter, OrderedDict

from google.protobuf.message import DecodeError

from epwatch import wire
from epwatch.agent.batcher import Batcher
from epwatch.frames import FrameError, read_frame
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


class Receiver:
    """Accepts hook connections; one thread per connected rank."""

    def __init__(
        self, path: str, batcher: Batcher, counters: ReceiverCounters, mode: int = 0o666
    ) -> None:
        self.path = path
        self._batcher = batcher
        self.counters = counters
        self._stop = threading.Event()
        _prepare_path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        # Serving engines often run as another user than the agent: the socket's mode,
        # not the agent's umask, decides who may send records.
        os.chmod(path, mode)
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

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._selector.select()
                if not any(key.fileobj is self._listener for key, _ in events):
                    continue  # woken by stop()
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the connection went away before we took it
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="hook", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    frame = read_frame(conn)
                except FrameError as exc:
                    self.counters.rejected(exc.reason)
                    log.warning("closing hook connection: %s", exc)
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

    def handle_frame(self, frame: bytes) -> bool:
        """Validate one frame and pass it on; False means close the connection."""
        try:
            msg = pb.AgentMessage.FromString(frame)
        except DecodeError:
            self.counters.rejected("garbage")
            log.warning("closing hook connection: frame is not an AgentMessage")
            return False
        if msg.HasField("stats") and msg.agent_id:
            self.counters.hook_dropped(msg.agent_id, msg.stats.hook_records_dropped)
        kind = msg.WhichOneof("payload")
        if kind not in ("batch", "intervals"):
            return True  # stats-only frames are fine; hooks do not send samples
        try:
            if kind == "intervals":
                rows = wire.decode_intervals(msg.intervals)
                self.counters.received(len(rows))
                group = msg.intervals
                self._batcher.add_intervals(group.ep_group, group.world_size, rows)
                return True
            d = wire.decode_batch(msg.batch)
        except RecordError as exc:
            self.counters.rejected(exc.reason)
            log.warning("dropping hook frame from %s: %s", msg.agent_id or "?", exc)
            return True
        self.counters.received(len(d.records))
        self._batcher.add(d.ep_group, d.world_size, d.records, d.peer_rows, d.entered)
        return True
