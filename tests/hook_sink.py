"""A stand-in agent for hook tests: accepts Unix-socket connections, reads frames
(4-byte little-endian length + AgentMessage) and decodes them with ``epwatch.wire``.

Written independently of the agent's own reader so the tests check the framing the
contract describes, not one implementation against itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from epwatch import wire
from epwatch.protos import epwatch_pb2 as pb
from epwatch.schema import PeerRows, RecordColumns

# Probe settings for tests: flush and reconnect within tens of milliseconds.
FAST = {"flush_interval_s": 0.02, "heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}


class FrameSink:
    def __init__(self, path: str, *, read_delay_s: float = 0.0) -> None:
        self.path = path
        self.read_delay_s = read_delay_s
        self.messages: list[pb.AgentMessage] = []
        self.arrivals: list[float] = []
        self.connections = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(16)
        self._server.settimeout(0.1)
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 4:
                (n,) = struct.unpack("<I", buf[:4])
                if len(buf) < 4 + n:
                    break
                msg = pb.AgentMessage()
                try:
                    msg.ParseFromString(buf[4 : 4 + n])
                except Exception as e:
                    self.errors.append(repr(e))
                buf = buf[4 + n :]
                with self._lock:
                    self.messages.append(msg)
                    self.arrivals.append(time.monotonic())
            if self.read_delay_s:
                time.sleep(self.read_delay_s)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for c in self._conns:
            c.close()
        self._thread.join(1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- decoded views ---------------------------------------------------------------

    def snapshot(self) -> list[pb.AgentMessage]:
        with self._lock:
            return list(self.messages)

    def records(self) -> RecordColumns:
        parts = [wire.decode_records(m.batch) for m in self.snapshot() if m.batch.count]
        return RecordColumns.concat(parts)

    def peer_rows(self) -> list[PeerRows]:
        return [wire.decode_peer_rows(m.batch) for m in self.snapshot() if m.batch.peer_rows.count]

    def entered(self) -> list[tuple[int, int, int, int]]:
        out = []
        for m in self.snapshot():
            hb = wire.decode_entered(m.batch)
            out += list(
                zip(
                    hb.rank.tolist(),
                    hb.step.tolist(),
                    hb.layer.tolist(),
                    hb.phase.tolist(),
                    strict=True,
                )
            )
        return out

    def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.02)
        return cond()

    def wait_records(self, n: int, timeout: float = 5.0) -> RecordColumns:
        self.wait_for(lambda: len(self.records()) >= n, timeout)
        return self.records()


def steps_of(records: RecordColumns) -> np.ndarray:
    return np.asarray(records.step)
