"""The hook's end of the agent's Unix socket: fail-open, rate-limited reconnects.

Only the flusher thread uses this, so a blocking send with a timeout is acceptable
(the socket call releases the GIL). Every failure closes the connection and returns
False; nothing here raises. An absent agent costs one ``connect()`` attempt per
``reconnect_interval_s``, never one per frame.
"""

from __future__ import annotations

import contextlib
import socket
import time

_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # a dead agent must not SIGPIPE the engine


class Transport:
    def __init__(
        self,
        path: str,
        reconnect_interval_s: float = 1.0,
        send_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.2,
    ) -> None:
        self.path = path
        self.reconnect_interval_s = reconnect_interval_s
        self.send_timeout_s = send_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None
        self._next_attempt = 0.0
        self.connect_attempts = 0
        self.connects = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.send_failures = 0
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def ensure(self) -> bool:
        """Connected now, or False (then no new attempt before the interval passes)."""
        if self._sock is not None:
            return True
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + self.reconnect_interval_s
        self.connect_attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout_s)
            sock.connect(self.path)
            sock.settimeout(self.send_timeout_s)
        except OSError as e:
            sock.close()
            self.last_error = f"connect {self.path}: {e}"
            return False
        self._sock = sock
        self.connects += 1
        return True

    def send(self, frame: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendall(frame, _NOSIGNAL)
        except OSError as e:  # timeout (slow agent), EPIPE/ECONNRESET (crashed agent)
            self.send_failures += 1
            self.last_error = f"send: {e}"
            self.close()
            return False
        self.frames_sent += 1
        self.bytes_sent += len(frame)
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            self._next_attempt = time.monotonic() + self.reconnect_interval_s

    def forget(self) -> None:
        """After fork: let go of the parent's connection (closing our copy of the fd
        sends nothing while the parent still holds it) and connect afresh."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._next_attempt = 0.0
