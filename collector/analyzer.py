"""The estimator loop: about once a second, update every group and keep its report.

Runs in one background thread so the ingest path only appends. Each group's lock is
held for its own update and report only, so one big group does not block ingest into
the others. A failing estimator is logged and skipped, never fatal.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from epwatch.collector.estimators.report import StragglerReport
from epwatch.collector.groups import EvidenceFn, Group, GroupTable
from epwatch.collector.metrics import IngestMetrics

log = logging.getLogger(__name__)


class Analyzer:
    def __init__(
        self,
        groups: GroupTable,
        metrics: IngestMetrics,
        interval_s: float = 1.0,
        evidence: EvidenceFn | None = None,
        on_pass: Callable[[], None] | None = None,
    ) -> None:
        self._groups = groups
        self._metrics = metrics
        self._interval_s = interval_s
        self.evidence = evidence
        self._on_pass = on_pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="estimators", daemon=True)
        self.passes = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def run_once(self, final: bool = False) -> None:
        """One pass over every group (also called directly by tests and at shutdown)."""
        t0 = time.perf_counter()
        now = time.monotonic()
        for name in self._groups.expire(now):
            self._metrics.forget_group(name)
        for group in self._groups.groups():
            self._update(group, now, final)
        self._metrics.estimator_duration.set(time.perf_counter() - t0)
        self.passes += 1
        if self._on_pass is not None:
            self._on_pass()

    def _update(self, group: Group, now: float, final: bool) -> None:
        try:
            with group.lock:
                group.estimator.update(now, final=final)
                group.report = group.estimator.report(evidence=self.evidence)
                take = getattr(group.estimator, "take_flag_changes", None)
                changes = take() if take is not None else []
        except Exception:
            log.exception("estimators failed for EP group %s", group.ep_group)
            return
        for event, s in changes:
            log_flag_change(group.ep_group, event, s)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.run_once()
            next_at += self._interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind: leave ingest some room instead of catching up
                delay = self._interval_s / 4
                next_at = time.monotonic() + delay
            self._stop.wait(delay)


def log_flag_change(ep_group: str, event: str, s: StragglerReport) -> None:
    """One INFO line per flag that opened or cleared: what an operator greps for."""
    size = f"{s.slowdown:.3g}x"
    if math.isfinite(s.slowdown_low) and math.isfinite(s.slowdown_high):
        size += f" [{s.slowdown_low:.3g}-{s.slowdown_high:.3g}]"
    verb = "flagged as" if event == "opened" else "cleared as"
    step = s.opened_step if event == "opened" else s.last_step
    log.info(
        "EP group %s: rank %d on %s %s %s straggler, %s, step %d",
        ep_group, s.rank, s.node or "?", verb, s.cause, size, step,
    )  # fmt: skip
