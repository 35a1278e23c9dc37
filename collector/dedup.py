"""De-duplication of agent messages by (agent_id, seq), in bounded memory.

Agents number their messages 1, 2, 3, ... and after a reconnect resend everything
unacknowledged in order, so per agent a high-water mark plus the set of seqs accepted
in the last ``window`` below it decides "seen before" exactly: a seq above the mark is
new, one in the recent window is new unless in the set (gaps are messages the agent
dropped or the collector rejected), and one below the window is treated as seen (an
agent never keeps that many messages in flight). Agents are kept LRU up to a bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class _Seqs:
    __slots__ = ("hwm", "recent")

    def __init__(self) -> None:
        self.hwm = 0
        self.recent: set[int] = set()


class SeqDeduper:
    """Thread-safe; ``claim`` is the only hot-path call."""

    def __init__(self, window: int = 4096, max_agents: int = 100_000) -> None:
        self.window = window
        self.max_agents = max_agents
        self._agents: OrderedDict[str, _Seqs] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, agent_id: str, seq: int) -> bool:
        """True if (agent_id, seq) is new, and mark it seen; False for a duplicate."""
        with self._lock:
            s = self._agents.get(agent_id)
            if s is None:
                s = self._agents[agent_id] = _Seqs()
                while len(self._agents) > self.max_agents:
                    self._agents.popitem(last=False)
            else:
                self._agents.move_to_end(agent_id)
            if seq > s.hwm:
                s.hwm = seq
                s.recent.add(seq)
                if len(s.recent) > 2 * self.window:
                    floor = s.hwm - self.window
                    s.recent = {x for x in s.recent if x > floor}
                return True
            if seq <= s.hwm - self.window or seq in s.recent:
                return False
            s.recent.add(seq)
            return True

    def release(self, agent_id: str, seq: int) -> None:
        """Undo a claim whose message was then rejected, so a fixed resend is new."""
        with self._lock:
            s = self._agents.get(agent_id)
            if s is not None:
                s.recent.discard(seq)

    def __len__(self) -> int:
        return len(self._agents)
