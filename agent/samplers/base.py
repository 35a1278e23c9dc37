"""The sampler interface and how one sampler's round is run.

Modelled on Prometheus node_exporter: every source is one small class with a
``name`` and a ``collect()``; :func:`run_sampler` times each one, turns any exception
into ``epwatch_sampler_up 0`` with a reason, and never lets one source abort the
others. Only names from :mod:`epwatch.catalogue` may be emitted.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epwatch.catalogue import Point, metric

log = logging.getLogger(__name__)


class SamplerUnavailable(Exception):
    """The source cannot be read on this node (no library, no driver): a state, not a bug."""


class Sampler(ABC):
    """One source of node samples.

    ``collect`` returns what it could read; it raises only when nothing useful could be
    read at all. Per-series problems (one unreadable file) go to ``skipped`` instead.
    """

    name: str = "sampler"

    def __init__(self) -> None:
        self.skipped: list[str] = []

    @abstractmethod
    def collect(self) -> list[Point]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release library handles (NVML, amdsmi); default: nothing to release."""

    def skip(self, what: str, err: BaseException | str) -> None:
        """Record a series dropped this round (bounded; shown by ``--sample-once``)."""
        if len(self.skipped) < 64:
            self.skipped.append(f"{what}: {err}")


@dataclass(slots=True)
class SamplerResult:
    """Outcome of one sampler in one round."""

    name: str
    ok: bool
    duration_s: float
    error: str = ""
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_proto(self) -> Any:
        from epwatch.protos import epwatch_pb2 as pb

        return pb.SamplerStatus(
            name=self.name, ok=self.ok, duration_s=self.duration_s, error=self.error
        )


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def log_once(sampler: str, message: str, exc: BaseException | None) -> None:
    """Log a sampler failure the first time we see it; repeats go to debug. Hardware a
    node does not have (no InfiniBand, no AMD GPU) is normal: INFO, not a warning."""
    key = (sampler, message)
    with _logged_lock:
        first = key not in _logged
        if first:
            _logged.add(key)
    if not first:
        log.debug("sampler %s: %s", sampler, message)
    elif isinstance(exc, SamplerUnavailable) or exc is None:
        log.info("sampler %s unavailable: %s", sampler, message)
    else:
        log.warning("sampler %s failed: %s", sampler, message, exc_info=exc)


def run_sampler(sampler: Sampler, clock: Callable[[], float] = time.perf_counter) -> SamplerResult:
    """Run one sampler, timing it and turning every exception into a failed status."""
    sampler.skipped = []
    start = clock()
    try:
        points = list(sampler.collect())
    except Exception as exc:  # one failing source never aborts the others
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, SamplerUnavailable):
            message = f"{type(exc).__name__}: {message}"
        log_once(sampler.name, message, exc)
        return SamplerResult(sampler.name, False, clock() - start, message, [], sampler.skipped)
    return SamplerResult(sampler.name, True, clock() - start, "", points, list(sampler.skipped))


def status_points(result: SamplerResult) -> list[Point]:
    """``epwatch_sampler_up`` and ``epwatch_sampler_duration_seconds`` for one result."""
    return [
        metric("epwatch_sampler_up", 1.0 if result.ok else 0.0, sampler=result.name),
        metric("epwatch_sampler_duration_seconds", result.duration_s, sampler=result.name),
    ]
