"""The counter probe: DeepEP's cumulative kernel statistics, read from a side thread.

Decode with DeepEP's low-latency kernels usually replays captured CUDA graphs, where
no Python hook runs per collective. The kernels still add, inside every replay, the
``clock64()`` cycles each rank waited for each source rank
(``dispatch_wait_recv_cost_stats``, ``combine_wait_recv_cost_stats``: int64
``[num_ranks]``) and the tokens each local expert received
(``cumulative_local_expert_recv_stats``: int32 ``[num_local_experts]``). The
:class:`CounterProbe` owns (or is given) those tensors; the engine passes them to
DeepEP (:meth:`CounterProbe.dispatch_kwargs`, :meth:`CounterProbe.combine_kwargs`, or
``InstrumentedBuffer(counters=True)`` does it), and the hooks' flusher thread copies
them every ``interval_ms`` to pinned host memory on a stream of its own, polls an
event, and ships the deltas as interval records. The engine's stream is never
synchronised: a snapshot taken during a replay is torn, but every counter only grows,
so the deltas stay right over many intervals.

Never sample while the engine captures a graph (CUDA's global capture mode forbids
other threads' copies and event queries): create the probe with ``start=False`` and
:meth:`~CounterProbe.resume` it after capture, and :meth:`~CounterProbe.pause` it
before a re-capture (once ``pause()`` returns the flusher makes no CUDA call for the
probe until ``resume()``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from epwatch.counters import CounterSnapshot
from epwatch.hooks.counters import IntervalMaker
from epwatch.hooks.registry import flusher_of, get_probe
from epwatch.hooks.tensors import SmClock
from epwatch.schema import MAX_LOCAL_EXPERTS

log = logging.getLogger("epwatch.hooks")

DISPATCH_WAIT = "dispatch_wait_recv_cost_stats"
COMBINE_WAIT = "combine_wait_recv_cost_stats"
EXPERT_TOKENS = "cumulative_local_expert_recv_stats"
FALLBACK_SM_CLOCK_HZ = 1e9
PAUSE_WAIT_S = 0.05  # how long pause() waits for the copy in flight before abandoning it


@dataclass(frozen=True)
class CounterTensors:
    """The three tensors DeepEP's low-latency kernels add to."""

    dispatch_wait: torch.Tensor  # int64 [num_ranks]
    combine_wait: torch.Tensor  # int64 [num_ranks]
    expert_tokens: torch.Tensor  # int32 [num_local_experts]

    @classmethod
    def allocate(cls, world_size: int, local_experts: int, device: Any) -> CounterTensors:
        return cls(
            dispatch_wait=torch.zeros(world_size, dtype=torch.int64, device=device),
            combine_wait=torch.zeros(world_size, dtype=torch.int64, device=device),
            expert_tokens=torch.zeros(local_experts, dtype=torch.int32, device=device),
        )

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, torch.Tensor]) -> CounterTensors:
        """From DeepEP's keyword names (what an engine already passes to DeepEP)."""
        return cls(tensors[DISPATCH_WAIT], tensors[COMBINE_WAIT], tensors[EXPERT_TOKENS])


class _Snapshotter:
    """Copies the counters to the host without waiting for the engine's stream."""

    def __init__(self, tensors: CounterTensors) -> None:
        self.parts = (tensors.dispatch_wait, tensors.combine_wait, tensors.expert_tokens)
        self.cuda = tensors.dispatch_wait.is_cuda
        self._event: Any = None
        self._pending: tuple[int, int] | None = None  # (time_ns, step) of the copy in flight
        if self.cuda:
            device = tensors.dispatch_wait.device
            self._stream = torch.cuda.Stream(device)
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in self.parts]
            self._event = torch.cuda.Event()

    def start(self, step: int) -> CounterSnapshot | None:
        """Begin a snapshot; a CPU one is complete at once."""
        now = time.monotonic_ns()
        if not self.cuda:
            d, c, e = (t.detach().numpy().copy() for t in self.parts)
            return CounterSnapshot(now, d, c, e, step)
        with torch.cuda.stream(self._stream):
            for host, dev in zip(self._host, self.parts, strict=True):
                host.copy_(dev, non_blocking=True)
            self._event.record(self._stream)
        self._pending = (now, step)
        return None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def finish(self) -> CounterSnapshot | None:
        """The snapshot in flight once its copy has completed (an event query, no sync)."""
        if self._pending is None or not self._event.query():
            return None
        (now, step), self._pending = self._pending, None
        d, c, e = (h.numpy().copy() for h in self._host)
        return CounterSnapshot(now, d, c, e, step)

    def abandon(self) -> None:
        """Forget the snapshot in flight without touching CUDA. Safe: the copy runs on
        the probe's own stream, which orders the next copy into the same host buffers
        after it, and the next :meth:`start` records the event again."""
        self._pending = None


class CounterProbe:
    """Interval records from DeepEP's cumulative statistics, for decode under graphs.

    ``buffer_or_tensors``: ``None`` (the probe allocates the tensors; hand them to DeepEP
    with :meth:`dispatch_kwargs` / :meth:`combine_kwargs`), a :class:`CounterTensors` or
    a mapping with DeepEP's keyword names (the engine's own tensors), or a DeepEP
    ``Buffer`` (its ``rank`` and ``group_size`` fill in ``rank`` and ``world_size``;
    the tensors are allocated). ``probe`` is the rank's :func:`~epwatch.hooks.get_probe`
    probe to ship through (default: asked for with the other arguments). Call
    :meth:`step` as each forward step starts, before its graph replay: interval records
    then carry the step counter, and a rank whose counter stays behind its peers' while
    the group stalls is the one that hangs.

    Like every hook it never raises into the engine: bad settings leave a disabled
    probe (``enabled`` False, empty keyword dicts) and a warning.
    """

    def __init__(
        self,
        buffer_or_tensors: Any = None,
        ep_group: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        interval_ms: float = 250.0,
        num_local_experts: int | None = None,
        device: Any = None,
        sm_clock_hz: float | None = None,
        start: bool = True,
        max_intervals: int = 1024,
        probe: Any = None,
    ) -> None:
        self.enabled = False
        self.tensors: CounterTensors | None = None
        self.reason = ""
        self._steps = 0
        self._engine_steps = False
        self._paused = not start
        self._closed = False
        self._lock = threading.Lock()
        self._next_due = 0.0
        self._last_hz: float | None = None
        self._lost_reported = 0
        self.interval_s = float(interval_ms) / 1e3
        self.errors = 0
        try:
            self._setup(
                buffer_or_tensors, probe, ep_group, rank, world_size, num_local_experts, device,
                sm_clock_hz, max_intervals,
            )  # fmt: skip
        except Exception as err:
            self.reason = f"counter probe disabled: {err}"
            log.warning("epwatch hooks: %s", self.reason)

    def _setup(
        self,
        source: Any,
        probe: Any,
        ep_group: str | None,
        rank: int | None,
        world_size: int | None,
        local_experts: int | None,
        device: Any,
        sm_clock_hz: float | None,
        max_intervals: int,
    ) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_ms must be > 0, got {self.interval_s * 1e3:g}")
        if hasattr(source, "group_size") and hasattr(source, "rank"):  # a DeepEP Buffer
            rank = int(source.rank) if rank is None else rank
            world_size = int(source.group_size) if world_size is None else world_size
            source = None
        if isinstance(source, Mapping):
            source = CounterTensors.from_mapping(source)
        if probe is None:
            probe = get_probe(ep_group, rank, world_size)
        if not probe.enabled:
            raise RuntimeError(getattr(probe, "reason", "no probe"))
        if source is None:
            if local_experts is None or local_experts < 1:
                raise ValueError("num_local_experts is needed to allocate the token counters")
            if device is None:
                device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            source = CounterTensors.allocate(probe.world_size, local_experts, device)
        self._check(source, probe.world_size)
        self.tensors = source
        self.probe = probe
        self._snap = _Snapshotter(source)
        self.sm_clock = SmClock(_sm_clock_device(source, probe.local_device), sm_clock_hz)
        self.maker = IntervalMaker(
            probe.ep_group,
            probe.rank,
            probe.world_size,
            int(source.expert_tokens.numel()),
            max_intervals,
        )
        flusher = flusher_of(probe)
        if flusher is None:
            raise RuntimeError("the probe has no flusher")
        self._flusher = flusher
        flusher.add_source(self)
        self.enabled = True

    @staticmethod
    def _check(t: CounterTensors, world_size: int) -> None:
        for name, tensor, dtype, size in (
            (DISPATCH_WAIT, t.dispatch_wait, torch.int64, world_size),
            (COMBINE_WAIT, t.combine_wait, torch.int64, world_size),
            (EXPERT_TOKENS, t.expert_tokens, torch.int32, None),
        ):
            if tensor.dtype != dtype or tensor.dim() != 1 or not tensor.is_contiguous():
                raise ValueError(f"{name} must be a contiguous 1-D {dtype}")
            if size is not None and tensor.numel() != size:
                raise ValueError(f"{name} has {tensor.numel()} entries, world size is {size}")
        experts = t.expert_tokens.numel()
        if not 1 <= experts <= MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"{EXPERT_TOKENS} has {experts} entries: one per local expert is needed, "
                f"1..{MAX_LOCAL_EXPERTS} (a rank without local experts has nothing to count)"
            )

    # ---- what the engine calls ------------------------------------------------------

    def dispatch_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Buffer.low_latency_dispatch``."""
        if self.tensors is None:
            return {}
        t = self.tensors
        return {EXPERT_TOKENS: t.expert_tokens, DISPATCH_WAIT: t.dispatch_wait}

    def combine_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Buffer.low_latency_combine``."""
        if self.tensors is None:
            return {}
        return {COMBINE_WAIT: self.tensors.combine_wait}

    def step(self, n: int = 1) -> None:
        """A forward step starts (or ``n`` of them): call it outside the captured graph,
        before the replay."""
        self._engine_steps = True
        self._steps += n

    def observe_step(self, step: int) -> None:
        """An eager collective of ``step`` was seen (the buffer wrapper calls this), so
        step counts are known even when the engine does not call :meth:`step`."""
        if not self._engine_steps and step + 1 > self._steps:
            self._steps = step + 1

    def pause(self, wait_s: float = PAUSE_WAIT_S) -> None:
        """Stop sampling, before a CUDA-graph capture. Takes the probe's lock, so a
        poll already under way finishes first, and once this returns the flusher makes
        no CUDA call for the probe until :meth:`resume`. A copy in flight is waited for
        (event queries from this thread, at most ``wait_s``; the engine's stream is
        never synchronised) and its snapshot kept; if it is not done by then, or the
        calling thread is already capturing (too late to query an event), it is
        abandoned, which is safe (see ``_Snapshotter.abandon``)."""
        if not self.enabled:
            self._paused = True
            return
        with self._lock:
            self._paused = True
            if self._snap.in_flight:
                try:
                    self._settle(wait_s)
                except Exception:
                    self.errors += 1
                    self._snap.abandon()

    def resume(self) -> None:
        """Start (again) sampling, after capture. The first snapshot after a pause is a
        new baseline: no interval spans the pause (during which the counters may have
        moved in warm-up runs, and which may last past the schema's bounds)."""
        with self._lock:
            if self._closed or not self._paused:
                return
            self._paused = False
            self._next_due = 0.0
            if self.enabled:
                self.maker.rebaseline()

    def close(self) -> None:
        """Stop sampling for good; what was measured is still shipped, then the
        flusher lets go of the probe."""
        with self._lock:
            self._paused = True
            self._closed = True
            if self.enabled:
                self._snap.abandon()

    def _settle(self, wait_s: float) -> None:
        """The copy in flight, finished within ``wait_s`` or abandoned (lock held)."""
        deadline = time.monotonic() + wait_s
        while not _capturing():
            snap = self._snap.finish()
            if snap is not None:
                # Pushed with the clock rate the flusher last used: the engine's thread
                # never asks NVML. No rate yet means no snapshot yet: this one is the
                # baseline and the rate is not used.
                self.maker.push(snap, self._last_hz or FALLBACK_SM_CLOCK_HZ)
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.001)
        self._snap.abandon()

    # ---- the flusher's side -----------------------------------------------------------

    def poll(self) -> None:
        """Finish a snapshot in flight, or start one when an interval has passed;
        nothing at all (no CUDA call) while paused."""
        if not self.enabled:
            return
        with self._lock:
            if self._paused or self._closed:
                return
            snap = self._snap.finish() if self._snap.in_flight else None
            now = time.monotonic()
            if snap is None and not self._snap.in_flight and now >= self._next_due:
                self._next_due = now + self.interval_s
                snap = self._snap.start(self._known_steps())
            if snap is not None:
                self._last_hz = self._sm_hz()
                self.maker.push(snap, self._last_hz)
            self._report_lost()

    def frames(self) -> list[tuple[bytes, Any]]:
        if not self.enabled:
            return []
        with self._lock:
            if self._closed and not len(self.maker):
                self._report_lost()
                self._flusher.remove_source(self)
                return []
            return self.maker.frames(self._dropped_total)

    def put_back(self, carried: Any) -> None:
        with self._lock:
            self.maker.put_back(carried)
            self._report_lost()

    def _report_lost(self) -> None:
        """Interval records lost so far go into the rank probe's ``dropped_unsent``,
        the count the flusher reports as ``stats.hook_records_dropped`` (on the
        flusher's thread, the only one that writes it)."""
        lost = self.maker.lost
        if lost > self._lost_reported:
            self.probe.dropped_unsent += lost - self._lost_reported
            self._lost_reported = lost

    def _dropped_total(self) -> int:
        """The process's running drop count (every probe's, interval records too)."""
        self._report_lost()
        return int(self._flusher.records_dropped)

    def _known_steps(self) -> int:
        return self._steps if self._steps > 0 or self._engine_steps else -1

    def _sm_hz(self) -> float:
        try:
            return float(self.sm_clock.hz())
        except Exception:
            if self.errors == 0:
                log.warning(
                    "epwatch counter probe: SM clock unknown (set EPWATCH_SM_CLOCK_HZ); "
                    "waits are reported as cycles / 1e9"
                )
            self.errors += 1
            return FALLBACK_SM_CLOCK_HZ


def _capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing a graph."""
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:
        return True  # unsure: treat as capturing, so no event is queried


def _sm_clock_device(t: CounterTensors, local_device: int) -> int | None:
    """The GPU whose SM clock converts the wait cycles: the one the stats tensors are
    on (the kernels that add to them run there), else the rank's local device, else
    None (the flusher thread's current device)."""
    dev = t.dispatch_wait.device
    if t.dispatch_wait.is_cuda and dev.index is not None:
        return int(dev.index)
    return local_device if local_device >= 0 else None
