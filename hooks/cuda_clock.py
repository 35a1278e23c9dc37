"""CUDA-event timestamps, resolved by the flusher without ever synchronising the device.

The caller's thread only records a pooled timing event on the collective's stream. The
flusher later asks ``event.query()`` and, once the event has happened, converts it to
host nanoseconds with ``anchor.elapsed_time(event)``, where the anchor is an event
recorded on an idle side stream at a known host time. ``elapsed_time`` is float32
milliseconds, so anchors are renewed every second to keep sub-microsecond resolution
(and to follow any drift between the GPU and host clocks).

Imported only when a CUDA clock is chosen; torch is required here.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from epwatch.hooks.deferred import Deferred

POOL_MAX = 4096


class CudaStamp(Deferred):
    """An event recorded on a stream, plus the anchor it will be measured against."""

    __slots__ = ("anchor", "clock", "event")

    def __init__(self, clock: CudaClock, event: Any, anchor: tuple[Any, int]) -> None:
        self.clock = clock
        self.event = event
        self.anchor = anchor

    def ready(self) -> bool:
        return bool(self.event.query()) and bool(self.anchor[0].query())

    def value(self) -> int:
        anchor_event, anchor_ns = self.anchor
        return anchor_ns + round(anchor_event.elapsed_time(self.event) * 1e6)

    def release(self) -> None:
        event, self.event = self.event, None  # idempotent: pool each event once
        if event is not None:
            self.clock.recycle(event)


class CudaClock:
    """Stamps as CUDA events on the rank's device."""

    name = "cuda"

    def __init__(self, local_device: int = -1, anchor_interval_s: float = 1.0) -> None:
        index = local_device if local_device >= 0 else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._event_cls = torch.cuda.Event
        self._pool: list[Any] = []
        self._anchor_stream = torch.cuda.Stream(self.device)
        self._anchor_interval_ns = int(anchor_interval_s * 1e9)
        self._anchor = self._new_anchor()

    def _event(self) -> Any:
        pool = self._pool
        return pool.pop() if pool else self._event_cls(enable_timing=True)

    def now(self) -> CudaStamp:
        ev = self._event()
        ev.record()
        return CudaStamp(self, ev, self._anchor)

    def on_stream(self, stream: Any) -> CudaStamp:
        ev = self._event()
        ev.record(stream)
        return CudaStamp(self, ev, self._anchor)

    def capturing(self) -> bool:
        """Inside CUDA-graph capture nothing may be recorded for later querying."""
        try:
            return bool(torch.cuda.is_current_stream_capturing())
        except Exception:
            return False

    def recycle(self, event: Any) -> None:
        if len(self._pool) < POOL_MAX:
            self._pool.append(event)

    def _new_anchor(self) -> tuple[Any, int]:
        ev = self._event_cls(enable_timing=True)
        with torch.cuda.device(self.device):
            ev.record(self._anchor_stream)
        # The side stream is idle, so the event executes within microseconds of now.
        return ev, time.monotonic_ns()

    def tick(self) -> None:
        """Renew the anchor once a second (flusher thread)."""
        if time.monotonic_ns() - self._anchor[1] >= self._anchor_interval_ns:
            self._anchor = self._new_anchor()
