"""The agent's bounded spool: every sequenced message until the collector acks it.

At-least-once delivery needs the agent to keep what it shipped until an ``Ack`` comes
back, and to resend it after a reconnect. Memory must stay bounded while the collector
is down, so the spool holds at most ``max_records`` hook records (a message without
records costs 1). Beyond the bound it drops the **oldest message not yet in flight**:
after an outage the newest steps are what the sliding windows and the hang check need,
and a message that is on the wire may still be acked, so dropping it could count a
record both delivered and dropped. Every dropped record is counted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Entry:
    seq: int
    payload: bytes  # serialized AgentMessage fields after the header (the batch/sample)
    records: int  # hook records in it (0 for samples and heartbeats)
    sent_at: float = field(default=0.0)

    @property
    def cost(self) -> int:
        return max(self.records, 1)


@dataclass(slots=True)
class SpoolCounters:
    records_delivered: int = 0
    records_dropped: int = 0
    records_rejected: int = 0
    messages_dropped: int = 0
    messages_rejected: int = 0


class Spool:
    """Ordered messages awaiting an ack; thread-safe."""

    def __init__(self, max_records: int) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.max_records = max_records
        self.counters = SpoolCounters()
        self._cond = threading.Condition()
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._unsent: deque[int] = deque()
        self._inflight = 0
        self._cost = 0
        self._records = 0
        self._next_seq = 1

    # --- producer side -------------------------------------------------------------
    def put(self, payload: bytes, records: int) -> int:
        """Add a message, give it the next seq, drop beyond the bound; return the seq."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            entry = Entry(seq, payload, records)
            self._entries[seq] = entry
            self._unsent.append(seq)
            self._cost += entry.cost
            self._records += records
            while self._cost > self.max_records and self._unsent:
                self._drop(self._unsent.popleft())
            self._cond.notify_all()
            return seq

    def _drop(self, seq: int) -> None:
        entry = self._entries.pop(seq)
        self._cost -= entry.cost
        self._records -= entry.records
        self.counters.records_dropped += entry.records
        self.counters.messages_dropped += 1

    # --- shipper side --------------------------------------------------------------
    def take(
        self,
        max_inflight: int,
        timeout: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> Entry | None:
        """The oldest unsent message (now in flight), or None after ``timeout``.

        Also None, at once, when ``cancelled()`` is true once :meth:`wake` is called:
        the shipper sleeps here until there is work instead of polling.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._unsent or self._inflight >= max_inflight:
                left = deadline - time.monotonic()
                if left <= 0 or (cancelled is not None and cancelled()):
                    return None
                self._cond.wait(left)
            entry = self._entries[self._unsent.popleft()]
            entry.sent_at = time.monotonic()
            self._inflight += 1
            self._cond.notify_all()
            return entry

    def wait_inflight(self, cancelled: Callable[[], bool]) -> bool:
        """Block until a message is in flight (an ack is due) or ``cancelled()`` (after
        :meth:`wake`); True if one is in flight."""
        with self._cond:
            while not self._inflight and not cancelled():
                self._cond.wait()
            return self._inflight > 0

    def wake(self) -> None:
        """Make waiting :meth:`take` / :meth:`wait_inflight` calls check ``cancelled``."""
        with self._cond:
            self._cond.notify_all()

    def ack(self, seq: int, ok: bool) -> Entry | None:
        """Forget an acknowledged message; count it delivered (ok) or rejected."""
        with self._cond:
            entry = self._entries.get(seq)
            if entry is None or entry.sent_at == 0.0:
                return None  # not ours, or already requeued after a reconnect
            del self._entries[seq]
            self._inflight -= 1
            self._cost -= entry.cost
            self._records -= entry.records
            if ok:
                self.counters.records_delivered += entry.records
            else:
                self.counters.records_rejected += entry.records
                self.counters.messages_rejected += 1
            self._cond.notify_all()
            return entry

    def requeue(self) -> None:
        """After a lost connection: everything unacked is unsent again, in seq order."""
        with self._cond:
            for entry in self._entries.values():
                entry.sent_at = 0.0
            self._unsent = deque(self._entries.keys())
            self._inflight = 0
            self._cond.notify_all()

    def oldest_inflight_age(self, now: float) -> float:
        with self._cond:
            for entry in self._entries.values():
                if entry.sent_at:
                    return now - entry.sent_at
                break
            return 0.0

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._entries:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    @property
    def records(self) -> int:
        """Hook records waiting for an ack."""
        return self._records

    def __len__(self) -> int:
        return len(self._entries)
