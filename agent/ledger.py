"""What a crash cost, counted at the next start.

Records the agent accepted but could not make durable (all of its spool without
``--spool-dir``; only what is still being batched with it) die with the process. The
agent writes how many that is to a small state file about once a second, and marks
the file clean when it stops properly. The next agent to start on the same state file
finds it unclean and counts those records as lost (``records_lost_total``), with a
log line. A reboot that empties the runtime directory takes the file with it; then
the loss cannot be known, as docs/security.md says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


class LossLedger:
    def __init__(self, path: str, min_interval_s: float = 1.0) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self.lost_at_start = 0
        self._last_write = 0.0
        self._lock = threading.Lock()  # the flush loop and the shipper's acks both write
        self.written: int | None = None  # the count on disk now
        try:
            with open(path) as f:
                previous = json.load(f)
        except FileNotFoundError:
            previous = None
        except (OSError, ValueError) as exc:
            log.warning(
                "state file %s unreadable (%s); a previous crash's loss is unknown", path, exc
            )
            previous = None
        if previous and not previous.get("clean", True):
            self.lost_at_start = max(0, int(previous.get("records_at_risk", 0)))
            log.log(
                logging.WARNING if self.lost_at_start else logging.INFO,
                "the previous agent (pid %s) did not stop cleanly: %d records it had accepted "
                "were not durable and are lost (counted in records_lost_total)",
                previous.get("pid", "?"),
                self.lost_at_start,
            )

    def update(self, records_at_risk: int, clean: bool = False, force: bool = False) -> None:
        """Write the count: a lower one at once (an overcount would report a loss that
        did not happen), a higher one at most once per ``min_interval_s``."""
        with self._lock:
            self._update(records_at_risk, clean, force)

    def _update(self, records_at_risk: int, clean: bool, force: bool) -> None:
        now = time.monotonic()
        lower = self.written is not None and records_at_risk < self.written
        if not force and (
            records_at_risk == self.written
            or (not lower and now - self._last_write < self.min_interval_s)
        ):
            return
        self._last_write = now
        tmp = f"{self.path}.tmp"
        state = {"pid": os.getpid(), "records_at_risk": records_at_risk, "clean": clean}
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)
            self.written = records_at_risk
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.debug("cannot write state file %s: %s", self.path, exc)
            self.written = records_at_risk  # do not retry in a loop; the loss is unknown
