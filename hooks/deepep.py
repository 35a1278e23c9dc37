"""A DeepEP ``Buffer`` whose dispatch and combine calls report to the probe.

Wrap the buffer an engine already has (``InstrumentedBuffer(buffer)``) and use it in
its place: ``dispatch``, ``combine``, ``low_latency_dispatch`` and
``low_latency_combine`` are timed, everything else passes straight through. Counts
come from what DeepEP already returns, never from an extra kernel or a host sync:

- normal dispatch: ``num_tokens_per_rank`` (per destination; copied to the host
  without a sync), ``num_recv_tokens_per_expert_list`` (received token-expert slots,
  aligned to ``expert_alignment``), the received tensors' shapes; a cached dispatch
  (``handle=...``) reuses the counts of the dispatch that made the handle;
- normal combine: the dispatch's per-rank counts, found through its handle;
- low-latency dispatch: ``recv_count`` per local expert; bytes sent count every top-k
  slot of ``topk_idx`` (``-1`` slots included, so it is an upper bound);
- low-latency wait stats: ``dispatch_wait_recv_cost_stats`` /
  ``combine_wait_recv_cost_stats`` (int64 ``[num_ranks]``, cumulative ``clock64()``
  cycles per source rank) are snapshotted before and after the call on sampled steps
  and their difference divided by the SM clock gives seconds waited per source rank.

With ``counters=True`` the wrapper also runs a :class:`CounterProbe` (decode under
CUDA graphs): it hands the probe's cumulative-statistics tensors to every low-latency
call the engine makes without its own, so the counters advance even inside replays.
It samples at once unless ``counters_start=False``: an engine that captures graphs
passes that and calls ``buf.counters.resume()`` after capture (and
``buf.counters.pause()`` before a re-capture).

Step and layer come from a :class:`LayerCursor` unless the caller passes
``epwatch_step=`` / ``epwatch_layer=`` (removed before DeepEP sees the call). With
``return_recv_hook=True`` the record ends when the engine calls the returned hook.
Inside CUDA-graph capture nothing is recorded.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from epwatch.hooks.counter_probe import (
    COMBINE_WAIT,
    DISPATCH_WAIT,
    EXPERT_TOKENS,
    CounterProbe,
    CounterTensors,
)
from epwatch.hooks.deferred import Derived
from epwatch.hooks.layers import LayerCursor
from epwatch.hooks.probe import COMBINE, DISPATCH, NullProbe, Probe, Token
from epwatch.hooks.registry import get_probe
from epwatch.hooks.tensors import (
    HostCopy,
    SmClock,
    cycles_to_seconds,
    last_dim_bytes,
    row_bytes,
    rows,
)

__all__ = ["CounterProbe", "CounterTensors", "InstrumentedBuffer"]

# Positions in deep_ep.Buffer's signatures (stable across releases for these).
_D_X, _D_HANDLE, _D_PER_RANK, _D_TOPK_IDX, _D_TOPK_W = 0, 1, 2, 6, 7
_C_X, _C_HANDLE, _C_TOPK_W = 0, 1, 2
_LLD_X, _LLD_TOPK_IDX, _LLD_TOKENS, _LLD_STATS, _LLD_ASYNC, _LLD_HOOK = 0, 1, 4, 5, 9, 10
_LLC_X, _LLC_TOPK_IDX, _LLC_HANDLE, _LLC_LOGFMT = 0, 1, 3, 4
_LLC_ASYNC, _LLC_HOOK, _LLC_STATS = 6, 7, 9


def _arg(args: tuple, kwargs: dict, index: int | None, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if index is not None and len(args) > index:
        return args[index]
    return default


def _total(a: np.ndarray) -> int:
    return int(np.asarray(a, dtype=np.int64).sum())


class _Layouts:
    """What a dispatch learned, keyed by the handle it returned, for the combine (and
    cached dispatches) that reuse that handle. Holds a weak reference to the handle's
    first tensor only, so GPU layout tensors are not kept alive."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[int, tuple[Any, Any]] = OrderedDict()

    @staticmethod
    def _anchor(handle: Any) -> Any:
        first = handle[0] if isinstance(handle, (tuple, list)) and handle else None
        return first if isinstance(first, torch.Tensor) else None

    def put(self, handle: Any, value: Any) -> None:
        anchor = self._anchor(handle)
        if anchor is None:
            return
        self._items[id(anchor)] = (weakref.ref(anchor), value)
        self._items.move_to_end(id(anchor))
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, handle: Any) -> Any:
        anchor = self._anchor(handle)
        item = self._items.get(id(anchor)) if anchor is not None else None
        if item is None or item[0]() is not anchor:
            return None
        return item[1]


class _RecvHook:
    """DeepEP's receive hook; the record is completed right after the engine calls it."""

    def __init__(self, hook: Callable[..., Any], done: Callable[[], None], probe: Any) -> None:
        self._hook = hook
        self._done: Callable[[], None] | None = done
        self._probe = probe

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._hook(*args, **kwargs)
        done, self._done = self._done, None
        if done is not None:
            try:
                done()
            except Exception:
                self._probe.count_error()
        return out


class InstrumentedBuffer:
    """Drop-in for a ``deep_ep.Buffer`` (or anything with its four methods).

    ``counters=True`` (or a :class:`CounterProbe`) adds counter mode;
    ``counters_start=False`` creates that probe paused, for engines that capture CUDA
    graphs: call ``buf.counters.resume()`` once capture is done."""

    def __init__(
        self,
        buffer: Any,
        probe: Probe | NullProbe | None = None,
        cursor: LayerCursor | None = None,
        *,
        layers_per_step: int | None = None,
        sm_clock_hz: float | None = None,
        counters: bool | CounterProbe = False,
        num_local_experts: int | None = None,
        counter_interval_ms: float = 250.0,
        counters_start: bool = True,
    ) -> None:
        self._buffer = buffer
        if probe is None:
            probe = get_probe(rank=int(buffer.rank), world_size=int(buffer.group_size))
        self.probe = probe
        self.cursor = cursor if cursor is not None else LayerCursor(layers_per_step=layers_per_step)
        self.sm_clock = SmClock(
            probe.local_device if probe.local_device >= 0 else None, sm_clock_hz
        )
        self._layouts = _Layouts()
        self._comm_stream: Any = None
        self.counters: CounterProbe | None = None
        if isinstance(counters, CounterProbe):
            self.counters = counters
        elif counters:
            self.counters = CounterProbe(
                buffer,
                interval_ms=counter_interval_ms,
                probe=probe,
                num_local_experts=num_local_experts,
                sm_clock_hz=sm_clock_hz,
                start=counters_start,
            )

    _shared: ClassVar[dict[int, tuple[Any, InstrumentedBuffer]]] = {}

    @classmethod
    def shared(cls, buffer: Any, **kwargs: Any) -> InstrumentedBuffer:
        """One wrapper per DeepEP buffer, however many layers ask for it, so that all
        of them share one layer cursor (engines build a dispatcher per MoE layer
        around a single buffer). ``kwargs`` apply when the wrapper is first made."""
        if isinstance(buffer, InstrumentedBuffer):
            return buffer
        entry = cls._shared.get(id(buffer))
        if entry is None or entry[0] is not buffer:
            entry = (buffer, cls(buffer, **kwargs))
            cls._shared[id(buffer)] = entry
        return entry[1]

    def __getattr__(self, name: str) -> Any:
        if name == "_buffer":
            raise AttributeError(name)
        return getattr(self._buffer, name)

    # ---- the four collectives ----------------------------------------------------------

    def dispatch(self, *args: Any, **kwargs: Any) -> Any:
        token = self._begin(DISPATCH, kwargs)
        result = self._buffer.dispatch(*args, **kwargs)
        if token is not None:
            try:
                self._end_dispatch(token, args, kwargs, result)
            except Exception:
                self.probe.count_error()
        return result

    def combine(self, *args: Any, **kwargs: Any) -> Any:
        token = self._begin(COMBINE, kwargs)
        result = self._buffer.combine(*args, **kwargs)
        if token is not None:
            try:
                self._end_combine(token, args, kwargs, result)
            except Exception:
                self.probe.count_error()
        return result

    def low_latency_dispatch(self, *args: Any, **kwargs: Any) -> Any:
        if self.counters is not None:
            self._give_counters(args, kwargs, _LLD_TOKENS, EXPERT_TOKENS)
            self._give_counters(args, kwargs, _LLD_STATS, DISPATCH_WAIT)
        token = self._begin(DISPATCH, kwargs)
        before = self._snapshot(
            token, _arg(args, kwargs, _LLD_STATS, "dispatch_wait_recv_cost_stats")
        )
        result = self._buffer.low_latency_dispatch(*args, **kwargs)
        if token is None:
            return result
        try:
            return self._end_ll_dispatch(token, before, args, kwargs, result)
        except Exception:
            self.probe.count_error()
            return result

    def low_latency_combine(self, *args: Any, **kwargs: Any) -> Any:
        if self.counters is not None:
            self._give_counters(args, kwargs, _LLC_STATS, COMBINE_WAIT)
        token = self._begin(COMBINE, kwargs)
        before = self._snapshot(
            token, _arg(args, kwargs, _LLC_STATS, "combine_wait_recv_cost_stats")
        )
        result = self._buffer.low_latency_combine(*args, **kwargs)
        if token is None:
            return result
        try:
            return self._end_ll_combine(token, before, args, kwargs, result)
        except Exception:
            self.probe.count_error()
            return result

    # ---- shared steps -----------------------------------------------------------------

    def _give_counters(self, args: tuple, kwargs: dict, index: int, name: str) -> None:
        """The counter probe's tensor for ``name`` unless the engine passes its own."""
        if len(args) > index or kwargs.get(name) is not None:
            return
        assert self.counters is not None
        tensor = (self.counters.dispatch_kwargs() | self.counters.combine_kwargs()).get(name)
        if tensor is not None:
            kwargs[name] = tensor

    def _begin(self, phase: int, kwargs: dict) -> Token | None:
        step = kwargs.pop("epwatch_step", None)
        layer = kwargs.pop("epwatch_layer", None)
        probe = self.probe
        if not probe.enabled:
            return None
        try:
            if probe.clock.capturing():
                return None
            pos = self.cursor.dispatch(layer) if phase == DISPATCH else self.cursor.combine(layer)
            step = pos[0] if step is None else step
            if self.counters is not None:
                self.counters.observe_step(step)
            return probe.begin(step, pos[1], phase)
        except Exception:
            probe.count_error()
            return None

    def _snapshot(self, token: Token | None, stats: Any) -> HostCopy | None:
        """The cumulative wait counters before the call, on sampled steps only."""
        if token is None or not isinstance(stats, torch.Tensor):
            return None
        try:
            return HostCopy(stats) if self.probe.sample_peers(token[0], token[1]) else None
        except Exception:
            self.probe.count_error()
            return None

    def _stream(self, async_finish: bool) -> Any:
        """With ``async_finish`` DeepEP runs on its communication stream."""
        if not async_finish:
            return None
        if self._comm_stream is None and hasattr(self._buffer, "get_comm_stream"):
            self._comm_stream = self._buffer.get_comm_stream()
        return self._comm_stream

    def _exit(self, async_finish: bool) -> Any:
        stream = self._stream(async_finish)
        clock = self.probe.clock
        return clock.now() if stream is None else clock.on_stream(stream)

    def _wait(self, before: HostCopy | None, stats: Any, stream: Any) -> Derived | None:
        if before is None:
            return None
        after = HostCopy(stats, stream)
        sm = self.sm_clock
        return Derived(lambda b, a: cycles_to_seconds(b, a, sm.hz()), before, after)

    # ---- normal (high-throughput) mode ------------------------------------------------

    def _end_dispatch(self, token: Token, args: tuple, kwargs: dict, result: tuple) -> None:
        recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = result
        x = args[_D_X] if args else kwargs["x"]
        handle_in = _arg(args, kwargs, _D_HANDLE, "handle")
        topk_idx = _arg(args, kwargs, _D_TOPK_IDX, "topk_idx")
        send_row = row_bytes(x)
        if topk_idx is not None:
            send_row += row_bytes(topk_idx) + row_bytes(
                _arg(args, kwargs, _D_TOPK_W, "topk_weights")
            )
        recv_rows = rows(recv_x)
        recv_bytes = recv_rows * (
            row_bytes(recv_x) + row_bytes(recv_topk_idx) + row_bytes(recv_topk_weights)
        )
        if handle_in is not None:  # cached layout: same routing as the dispatch that made it
            per_rank, slots = self._layouts.get(handle_in) or (None, recv_rows)
        else:
            per_rank_t = _arg(args, kwargs, _D_PER_RANK, "num_tokens_per_rank")
            per_rank = (
                HostCopy(per_rank_t, self._stream(bool(kwargs.get("async_finish", False))))
                if isinstance(per_rank_t, torch.Tensor)
                else None
            )
            slots = int(sum(per_expert)) if per_expert else recv_rows
            self._layouts.put(handle, (per_rank, slots))
        if per_rank is not None:
            send_bytes: Any = Derived(lambda pr: _total(pr) * send_row, per_rank)
            peers = (
                Derived(lambda pr: np.asarray(pr, dtype=np.int64) * send_row, per_rank)
                if self.probe.sample_peers(token[0], token[1])
                else None
            )
        else:
            send_bytes, peers = rows(x) * send_row, None
        async_finish = bool(kwargs.get("async_finish", False))
        self.probe.end_at(
            token, self._exit(async_finish), send_bytes, recv_bytes, slots, None, peers
        )

    def _end_combine(self, token: Token, args: tuple, kwargs: dict, result: tuple) -> None:
        combined_x = result[0]
        x = args[_C_X] if args else kwargs["x"]
        handle = _arg(args, kwargs, _C_HANDLE, "handle")
        topk_weights = _arg(args, kwargs, _C_TOPK_W, "topk_weights")
        send_bytes = rows(x) * (row_bytes(x) + row_bytes(topk_weights))
        out_row = row_bytes(combined_x)
        layout = self._layouts.get(handle)
        if layout is not None and layout[0] is not None:
            # Each token this rank dispatched comes back once from every rank it went to.
            back: Any = Derived(_total, layout[0])
            recv_bytes: Any = Derived(lambda n: n * out_row, back)
        else:
            back = rows(combined_x)
            recv_bytes = back * out_row
        async_finish = bool(kwargs.get("async_finish", False))
        self.probe.end_at(token, self._exit(async_finish), send_bytes, recv_bytes, back, None, None)

    # ---- low-latency mode -------------------------------------------------------------

    def _end_ll_dispatch(
        self, token: Token, before: HostCopy | None, args: tuple, kwargs: dict, result: tuple
    ) -> Any:
        recv_x, recv_count, handle, event, hook = result
        topk_idx = _arg(args, kwargs, _LLD_TOPK_IDX, "topk_idx")
        stats = _arg(args, kwargs, _LLD_STATS, "dispatch_wait_recv_cost_stats")
        async_finish = bool(_arg(args, kwargs, _LLD_ASYNC, "async_finish", False))
        with_hook = bool(_arg(args, kwargs, _LLD_HOOK, "return_recv_hook", False))
        msg = last_dim_bytes(recv_x)
        send_bytes = int(topk_idx.numel()) * msg

        def done() -> None:
            # After the receive half (the hook, if any), on the stream that wrote them.
            stream = self._stream(async_finish)
            slots = Derived(_total, HostCopy(recv_count, stream))
            self._layouts.put(handle, slots)
            recv_bytes = Derived(lambda n: n * msg, slots)
            wait = self._wait(before, stats, stream)
            self.probe.end_at(token, self._exit(async_finish), send_bytes, recv_bytes, slots, wait)

        if with_hook and callable(hook):
            return recv_x, recv_count, handle, event, _RecvHook(hook, done, self.probe)
        done()
        return result

    def _end_ll_combine(
        self, token: Token, before: HostCopy | None, args: tuple, kwargs: dict, result: tuple
    ) -> Any:
        combined_x, event, hook = result
        x = args[_LLC_X] if args else kwargs["x"]
        topk_idx = _arg(args, kwargs, _LLC_TOPK_IDX, "topk_idx")
        handle = _arg(args, kwargs, _LLC_HANDLE, "handle")
        stats = _arg(args, kwargs, _LLC_STATS, "combine_wait_recv_cost_stats")
        async_finish = bool(_arg(args, kwargs, _LLC_ASYNC, "async_finish", False))
        with_hook = bool(_arg(args, kwargs, _LLC_HOOK, "return_recv_hook", False))
        msg = last_dim_bytes(x)
        if _arg(args, kwargs, _LLC_LOGFMT, "use_logfmt", False):
            msg = msg * 10 // 16  # LogFMT: 10 bits per BF16 element
        slots_sent = self._layouts.get(handle)
        send_bytes: Any = Derived(lambda n: n * msg, slots_sent) if slots_sent is not None else 0
        back = int(topk_idx.numel())
        recv_bytes = back * msg

        def done() -> None:
            stream = self._stream(async_finish)
            wait = self._wait(before, stats, stream)
            self.probe.end_at(token, self._exit(async_finish), send_bytes, recv_bytes, back, wait)

        if with_hook and callable(hook):
            return combined_x, event, _RecvHook(hook, done, self.probe)
        done()
        return result
