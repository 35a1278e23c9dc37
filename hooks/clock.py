"""Which clock stamps enter/exit: the host's monotonic clock, or CUDA events.

On a GPU the host returns from a collective long before the device finishes it, so a
host clock would time the launch, not the transfer. ``auto`` therefore picks CUDA
events when torch is already imported with a usable GPU, and the host clock otherwise.
The core never imports torch itself: checking ``sys.modules`` keeps ``epwatch.hooks``
importable (and cheap) without it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol


class Clock(Protocol):
    name: str

    def now(self) -> Any:
        """A stamp on the current stream (an int of ns, or a Deferred)."""

    def on_stream(self, stream: Any) -> Any:
        """A stamp recorded on ``stream`` (the host clock ignores it)."""

    def capturing(self) -> bool:
        """True inside CUDA-graph capture, where adapters must record nothing."""

    def tick(self) -> None:
        """Periodic upkeep, on the flusher thread."""


class HostClock:
    """Rank-local ``CLOCK_MONOTONIC`` in nanoseconds."""

    name = "host"
    now = staticmethod(time.monotonic_ns)

    def on_stream(self, stream: Any) -> int:
        return time.monotonic_ns()

    def capturing(self) -> bool:
        return False

    def tick(self) -> None:
        return None


def cuda_usable(local_device: int) -> bool:
    """True when torch is already loaded and has a GPU for this rank."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        if not torch.cuda.is_available():
            return False
        return local_device < torch.cuda.device_count()
    except Exception:
        return False


def make_clock(kind: str, local_device: int) -> Clock:
    """``host``, ``cuda`` or ``auto``; a CUDA clock that cannot start falls back to host."""
    if kind == "host" or (kind == "auto" and not cuda_usable(local_device)):
        return HostClock()
    try:
        from epwatch.hooks.cuda_clock import CudaClock

        return CudaClock(local_device)
    except Exception:
        if kind == "cuda":
            import logging

            logging.getLogger("epwatch.hooks").warning(
                "EPWATCH_CLOCK=cuda but CUDA events are unavailable; using the host clock",
                exc_info=True,
            )
        return HostClock()
