"""The probe an engine calls around each dispatch/combine: the caller's-thread half.

Everything here runs on the engine's hot path, 122 times per forward pass, so it only
reads a clock, stores the "entered" heartbeat and appends one tuple to a bounded
deque; encoding, device-event resolution and the socket belong to the flusher thread.
No method raises: a failure inside the probe is counted in ``internal_errors`` and
the engine carries on. The collective itself is never wrapped here, so its own
exceptions reach the engine unchanged.
"""

from __future__ import annotations

import logging
from collections import deque
from types import TracebackType
from typing import Any

from epwatch.hooks.clock import Clock, HostClock
from epwatch.schema import MAX_WORLD_SIZE, Phase

log = logging.getLogger("epwatch.hooks")

DISPATCH = int(Phase.DISPATCH)
COMBINE = int(Phase.COMBINE)

# begin() -> (step, layer, phase, enter stamp); end() appends the token extended by
# (exit stamp, send_bytes, recv_bytes, recv_tokens, dropped_tokens, peer_wait_s,
# peer_send_bytes): one flat tuple per record, so the token dies at once and little
# stays alive for the GC.
Token = tuple[int, int, int, Any]
Record = tuple[int, int, int, Any, Any, Any, Any, Any, Any, Any, Any]


class Probe:
    """One rank of one EP group. Create it with :func:`epwatch.hooks.get_probe`."""

    enabled = True

    def __init__(
        self,
        *,
        ep_group: str,
        rank: int,
        world_size: int,
        local_device: int = -1,
        clock: Clock | None = None,
        buffer_records: int = 65536,
        peer_sample_steps: int = 16,
    ) -> None:
        if not 0 < world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"world_size {world_size} is outside [1, {MAX_WORLD_SIZE}]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.ep_group = ep_group
        self.rank = rank
        self.world_size = world_size
        self.local_device = local_device
        self.clock: Clock = HostClock() if clock is None else clock
        self.peer_sample_steps = peer_sample_steps
        self._layers_seen = 1
        self._now = self.clock.now
        self._cap = buffer_records
        self._buf: deque[Record] = deque()
        # The token of the last collective this rank entered; the flusher ships its
        # (step, layer, phase) even when nothing completes, which is what pins a hang.
        self._entered: Token | None = None
        # Two writers, two counters: the caller's thread drops when the buffer is full,
        # the flusher when the agent is absent or slow. Each is written by one thread.
        self.dropped_buffer_full = 0
        self.dropped_unsent = 0
        self.internal_errors = 0

    # ---- hot path -------------------------------------------------------------------

    def begin(self, step: int, layer: int, phase: int) -> Token | None:
        """Mark entry into a collective; returns the token :meth:`end` needs."""
        try:
            self._entered = token = (step, layer, phase, self._now())
            return token
        except Exception:
            self._failed()
            return None

    def end(
        self,
        token: Token | None,
        send_bytes: Any = 0,
        recv_bytes: Any = 0,
        recv_tokens: Any = 0,
        peer_wait_s: Any = None,
        peer_send_bytes: Any = None,
        dropped_tokens: Any = 0,
    ) -> None:
        """Mark exit; queue the record. Counts may be numbers or :class:`Deferred`;
        peer vectors are sequences of ``world_size`` values (kept on sampled steps).
        ``dropped_tokens``: routed token-expert slots for this rank's experts that a
        capacity limit dropped (dispatch; 0 when the layer is dropless)."""
        if token is None:  # begin() failed or was skipped (CUDA-graph capture)
            return
        try:
            t = self._now()
            buf = self._buf
            if len(buf) < self._cap:
                # One flat tuple per record; concatenation is ~4x cheaper than unpacking.
                rest = (t, send_bytes, recv_bytes, recv_tokens, dropped_tokens, peer_wait_s,
                        peer_send_bytes)  # fmt: skip
                buf.append(token + rest)
            else:
                self.dropped_buffer_full += 1
        except Exception:
            self._failed()

    def end_at(
        self,
        token: Token | None,
        exit_stamp: Any,
        send_bytes: Any = 0,
        recv_bytes: Any = 0,
        recv_tokens: Any = 0,
        peer_wait_s: Any = None,
        peer_send_bytes: Any = None,
        dropped_tokens: Any = 0,
    ) -> None:
        """:meth:`end` with a stamp the adapter took itself (e.g. on another stream)."""
        if token is None:
            return
        try:
            buf = self._buf
            if len(buf) < self._cap:
                rest = (exit_stamp, send_bytes, recv_bytes, recv_tokens, dropped_tokens,
                        peer_wait_s, peer_send_bytes)  # fmt: skip
                buf.append(token + rest)
            else:
                self.dropped_buffer_full += 1
        except Exception:
            self._failed()

    def collective(
        self,
        step: int,
        layer: int,
        phase: int,
        send_bytes: Any = 0,
        recv_bytes: Any = 0,
        recv_tokens: Any = 0,
    ) -> Span:
        """Context manager form; set counts on the span inside the block if they are
        only known after the call. A block that raises records nothing."""
        return Span(self, step, layer, phase, send_bytes, recv_bytes, recv_tokens)

    def sample_peers(self, step: int, layer: int) -> bool:
        """Whether per-peer vectors of this collective will be kept; adapters skip
        computing them otherwise. One layer per sampled step, rotating through the
        layers seen so far: every rank picks the same (step, layer), and the collector
        gets O(P^2) values per sample instead of one matrix per layer."""
        n = self.peer_sample_steps
        if n <= 0 or step % n:
            return False
        if layer >= self._layers_seen:
            self._layers_seen = layer + 1
        return layer == (step // n) % self._layers_seen

    # ---- state for the flusher and for operators --------------------------------------

    @property
    def entered(self) -> tuple[int, int, int] | None:
        """(step, layer, phase) of the last collective this rank entered."""
        token = self._entered
        return None if token is None else (token[0], token[1], token[2])

    @property
    def records_dropped(self) -> int:
        """Records lost so far (buffer full, agent absent or slow)."""
        return self.dropped_buffer_full + self.dropped_unsent

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def drain(self) -> list[Record]:
        """Take what is queued now (flusher thread). ``popleft`` is atomic, so the caller
        may keep appending meanwhile."""
        buf = self._buf
        pop = buf.popleft
        return [pop() for _ in range(len(buf))]

    def clear(self) -> None:
        """Forget queued records, the heartbeat and the counters: a forked child must
        neither resend its parent's records nor speak for the parent's rank."""
        self._buf.clear()
        self._entered = None
        self.dropped_buffer_full = self.dropped_unsent = self.internal_errors = 0

    def count_error(self) -> None:
        """For adapters: a failure in their own bookkeeping (never the collective's)."""
        self._failed()

    def _failed(self) -> None:
        self.internal_errors += 1
        if self.internal_errors == 1:
            log.warning("epwatch probe error (counted, engine unaffected)", exc_info=True)

    def __repr__(self) -> str:
        return (
            f"Probe(ep_group={self.ep_group!r}, rank={self.rank}, "
            f"world_size={self.world_size}, clock={self.clock.name})"
        )


class Span:
    """``with probe.collective(...) as span:`` around one collective."""

    __slots__ = (
        "dropped_tokens",
        "layer",
        "peer_send_bytes",
        "peer_wait_s",
        "phase",
        "probe",
        "recv_bytes",
        "recv_tokens",
        "send_bytes",
        "step",
        "token",
    )

    def __init__(
        self,
        probe: Probe | NullProbe,
        step: int,
        layer: int,
        phase: int,
        send_bytes: Any,
        recv_bytes: Any,
        recv_tokens: Any,
    ) -> None:
        self.probe = probe
        self.step = step
        self.layer = layer
        self.phase = phase
        self.send_bytes = send_bytes
        self.recv_bytes = recv_bytes
        self.recv_tokens = recv_tokens
        self.dropped_tokens: Any = 0
        self.peer_wait_s: Any = None
        self.peer_send_bytes: Any = None
        self.token: Token | None = None

    def __enter__(self) -> Span:
        self.token = self.probe.begin(self.step, self.layer, self.phase)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            self.probe.end(
                self.token,
                self.send_bytes,
                self.recv_bytes,
                self.recv_tokens,
                self.peer_wait_s,
                self.peer_send_bytes,
                self.dropped_tokens,
            )
        return False  # never swallow the collective's exception


class NullProbe:
    """What a disabled or unconfigured probe is: the same API, doing nothing."""

    enabled = False
    ep_group = ""
    rank = -1
    world_size = 0
    local_device = -1
    clock = HostClock()
    entered = None
    records_dropped = 0
    dropped_buffer_full = 0
    dropped_unsent = 0
    internal_errors = 0
    buffered = 0
    peer_sample_steps = 0

    def __init__(self, reason: str = "disabled") -> None:
        self.reason = reason

    def begin(self, step: int, layer: int, phase: int) -> None:
        return None

    def end(self, token: object, *args: object, **kwargs: object) -> None:
        return None

    def end_at(self, token: object, *args: object, **kwargs: object) -> None:
        return None

    def collective(self, step: int, layer: int, phase: int, *args: Any) -> Span:
        return Span(self, step, layer, phase, 0, 0, 0)

    def sample_peers(self, step: int, layer: int) -> bool:
        return False

    def drain(self) -> list[Record]:
        return []

    def clear(self) -> None:
        return None

    def count_error(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"NullProbe({self.reason!r})"
