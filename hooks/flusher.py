"""The background daemon thread: drain probes, resolve stamps, ship frames.

One flusher per process and agent socket serves every probe in the process. Each tick
(``flush_interval_s``) it drains the probes' queues, resolves what the device has
finished, and sends the columns with the latest heartbeat; with nothing to send it
still sends the heartbeat every ``heartbeat_interval_s``, which is what lets the
collector name the rank that never entered a hung collective. It never raises: a
failing tick is counted and the next one tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from epwatch.hooks.outbox import Outbox
from epwatch.hooks.probe import Probe
from epwatch.hooks.records import RecordResolver
from epwatch.hooks.transport import Transport

log = logging.getLogger("epwatch.hooks")


class FrameSource(Protocol):
    """Something else the flusher ships each tick: a counter probe's interval records.
    ``poll`` does the source's own periodic work (never blocking); ``frames`` hands
    over what is ready, ``put_back`` takes back what could not be sent."""

    def poll(self) -> None: ...
    def frames(self) -> list[tuple[bytes, Any]]: ...
    def put_back(self, carried: Any) -> None: ...


@dataclass
class _Entry:
    probe: Probe
    resolver: RecordResolver
    outbox: Outbox
    last_sent: float = 0.0


class Flusher:
    def __init__(
        self,
        socket_path: str,
        *,
        flush_interval_s: float = 0.1,
        heartbeat_interval_s: float = 0.2,
        reconnect_interval_s: float = 1.0,
        send_timeout_s: float = 1.0,
    ) -> None:
        self.flush_interval_s = flush_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.transport = Transport(socket_path, reconnect_interval_s, send_timeout_s)
        self._entries: list[_Entry] = []
        self._sources: list[FrameSource] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.errors = 0

    def add(self, probe: Probe, max_records: int) -> None:
        with self._lock:
            self._entries.append(
                _Entry(probe, RecordResolver(probe, max_records), Outbox(probe, max_records))
            )

    def add_source(self, source: FrameSource) -> None:
        with self._lock:
            if all(s is not source for s in self._sources):
                self._sources.append(source)

    def remove_source(self, source: FrameSource) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if s is not source]

    @property
    def probes(self) -> list[Probe]:
        return [e.probe for e in self._entries]

    @property
    def records_dropped(self) -> int:
        """Every probe's drops together: what ``stats.hook_records_dropped`` reports."""
        return sum(e.probe.records_dropped for e in self._entries)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="epwatch-flusher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 1.0) -> None:
        """Stop after one last flush (bounded by ``timeout``)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None
        if thread is None or not thread.is_alive():
            self.transport.close()

    def after_fork_in_child(self) -> None:
        """A forked child inherits queued records and the parent's socket: drop both
        (the parent ships its own) and run a thread of its own."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.transport.forget()
        self._sources = []  # the parent's counter tensors are not this process's
        for e in self._entries:
            e.probe.clear()
            e.outbox.take()
            e.resolver.pending = []
        self.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush_once()
        self.flush_once()

    def flush_once(self) -> None:
        """One tick; public so tests can drive the flusher without its thread."""
        try:
            self.ticks += 1
            with self._lock:
                entries = list(self._entries)
                sources = list(self._sources)
            now = time.monotonic()
            for entry in entries:
                self._collect(entry)
            for entry in entries:
                self._ship(entry, now)
            for source in sources:
                self._ship_source(source)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.warning("epwatch flusher tick failed (counted, retrying)", exc_info=True)

    def _ship_source(self, source: FrameSource) -> None:
        try:
            source.poll()
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.warning("epwatch counter source failed (counted, retrying)", exc_info=True)
            return
        frames = source.frames()
        if not frames:
            return
        if not self.transport.ensure():
            for _, carried in reversed(frames):
                source.put_back(carried)
            return
        for i, (frame, _) in enumerate(frames):
            if not self.transport.send(frame):
                for _, carried in reversed(frames[i:]):
                    source.put_back(carried)
                return

    def _collect(self, entry: _Entry) -> None:
        probe = entry.probe
        probe.clock.tick()
        records, peers = entry.resolver.resolve(probe.drain())
        entry.outbox.add(records, peers)

    def _ship(self, entry: _Entry, now: float) -> None:
        probe, outbox = entry.probe, entry.outbox
        heartbeat_due = probe.entered is not None and (
            now - entry.last_sent >= self.heartbeat_interval_s
        )
        if not (outbox.has_data() or heartbeat_due):
            return
        if not self.transport.ensure():
            return
        frames = outbox.frames(probe.entered, self.records_dropped)
        for i, (frame, _) in enumerate(frames):
            if not self.transport.send(frame):
                for _, records in reversed(frames[i:]):
                    outbox.put_back(records)
                return
        entry.last_sent = now
