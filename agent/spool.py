"""The agent's bounded spool: every sequenced message until the collector acks it.

At-least-once delivery needs the agent to keep what it shipped until an ``Ack`` comes
back, and to resend it after a reconnect. Memory must stay bounded while the collector
is down, so the spool holds at most ``max_bytes`` of serialized messages (each counted
at its real size) and at most ``max_records`` hook records (a message without records
costs 1). Beyond either bound it drops the **oldest message not yet in flight**: after
an outage the newest steps are what the sliding windows and the hang check need, and a
message that is on the wire may still be acked, so dropping it could count a record
both delivered and dropped. Every dropped record is counted, by reason.

With a :class:`~epwatch.agent.spool_disk.SpoolStore` every message is also on disk
until it is done, and a restarted agent starts with what its predecessor left.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from epwatch.agent.spool_disk import SpoolStore

log = logging.getLogger(__name__)


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
    messages_dropped: Counter[str] = field(default_factory=Counter)  # by reason
    messages_rejected: int = 0
    messages_split: int = 0
    store_errors: int = 0  # writes to --spool-dir that failed (kept in memory only)


class Spool:
    """Ordered messages awaiting an ack; thread-safe."""

    def __init__(
        self, max_records: int, max_bytes: int = 1 << 62, store: SpoolStore | None = None
    ) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError(f"spool bounds must be >= 1, got {max_records}, {max_bytes}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.counters = SpoolCounters()
        self._cond = threading.Condition()
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._unsent: deque[int] = deque()
        self._inflight = 0
        self._cost = 0
        self._bytes = 0
        self._records = 0
        self._next_seq = 1
        self._store = store
        self.on_ack: Callable[[], None] | None = None  # called after each ack, unlocked
        if store is not None:
            recovered = store.load()
            self._next_seq = store.next_seq()
            for stored in recovered:
                self._add(Entry(stored.seq, stored.payload, stored.records))
            self.recovered_records = sum(e.records for e in recovered)
            self.recovered_messages = len(recovered)
            self._enforce_bounds()
        else:
            self.recovered_records = self.recovered_messages = 0

    # --- producer side -------------------------------------------------------------
    def put(self, payload: bytes, records: int) -> int:
        """Add a message, give it the next seq, drop beyond the bounds; return the seq."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            if self._store is not None:
                try:
                    self._store.append(seq, records, payload)
                except OSError as exc:
                    self.counters.store_errors += 1
                    log.error("spool folder write failed (kept in memory only): %s", exc)
            self._add(Entry(seq, payload, records))
            self._enforce_bounds()
            self._cond.notify_all()
            return seq

    def _add(self, entry: Entry) -> None:
        self._entries[entry.seq] = entry
        self._unsent.append(entry.seq)
        self._cost += entry.cost
        self._bytes += len(entry.payload)
        self._records += entry.records

    def _enforce_bounds(self) -> None:
        dropped = []
        while (self._cost > self.max_records or self._bytes > self.max_bytes) and self._unsent:
            seq = self._unsent.popleft()
            self.counters.records_dropped += self._forget(seq).records
            dropped.append(seq)
        self._done(dropped, "spool_full")

    def _forget(self, seq: int) -> Entry:
        entry = self._entries.pop(seq)
        self._cost -= entry.cost
        self._bytes -= len(entry.payload)
        self._records -= entry.records
        return entry

    def _done(self, seqs: list[int], drop_reason: str | None = None) -> None:
        if not seqs:
            return
        if self._store is not None:
            try:
                self._store.done(seqs)
            except OSError as exc:
                self.counters.store_errors += 1
                log.error("spool folder write failed: %s", exc)
        if drop_reason is not None:
            self.counters.messages_dropped[drop_reason] += len(seqs)

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
            self._forget(seq)
            self._inflight -= 1
            if ok:
                self.counters.records_delivered += entry.records
            else:
                self.counters.records_rejected += entry.records
                self.counters.messages_rejected += 1
            self._done([seq])
            self._cond.notify_all()
        if self.on_ack is not None:
            self.on_ack()
        return entry

    def replace(self, entry: Entry, parts: list[tuple[bytes, int]] | None) -> None:
        """A message the collector cannot take (too large): ship ``parts`` instead
        (smaller messages with the same records, new seqs), or drop it when it cannot
        be split. It may be in flight or not yet sent."""
        with self._cond:
            if self._entries.get(entry.seq) is not entry:
                return
            self._forget(entry.seq)
            if entry.sent_at:
                self._inflight -= 1
            else:
                with contextlib.suppress(ValueError):
                    self._unsent.remove(entry.seq)
            if parts is None:
                self.counters.records_dropped += entry.records
                self._done([entry.seq], "oversized")
            else:
                self.counters.messages_split += 1
                self._done([entry.seq])
            self._cond.notify_all()
        for payload, records in parts or ():
            self.put(payload, records)

    def close(self) -> None:
        """Make what the spool folder holds durable and close it (at shutdown)."""
        with self._cond:
            if self._store is not None:
                self._store.close()

    def get(self, seq: int) -> Entry | None:
        with self._cond:
            return self._entries.get(seq)

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

    @property
    def bytes(self) -> int:
        """Serialized bytes waiting for an ack."""
        return self._bytes

    @property
    def durable(self) -> bool:
        """Whether what waits here survives the agent (a spool folder)."""
        return self._store is not None

    def __len__(self) -> int:
        return len(self._entries)
