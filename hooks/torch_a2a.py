"""``torch.distributed.all_to_all_single`` with the probe around it.

Bytes are what the tensors hold (torch requires the split sizes to add up to their
rows); received tokens are the output split sizes unless the caller says otherwise (a
row is then not a token-expert slot). A dispatch is often two collectives, a count
exchange and the payload: time both in one :class:`A2ASpan`, or the wait in the first
is blamed on expert compute.

    a2a = EPAllToAll(group=ep_group)
    out = a2a.all_to_all_single(out, x, out_splits, in_splits, phase=DISPATCH, layer=l)

    with a2a.span(DISPATCH, layer=l) as span:
        span.all_to_all_single(counts_out, counts_in, count=False)
        span.all_to_all_single(out, x, out_splits, in_splits)

GShard/Switch layers send ``[E, C, M]`` capacity slabs in which unused slots are zero:
there a row is an expert, not a token. ``capacity_layout`` (default: detected, a 3-D
tensor without split sizes) counts the token vectors that carry data instead.

The collective is torch's own function, found once at construction and never looked up
by name at call time: a patch of ``torch.distributed.all_to_all_single`` that calls
this adapter (:mod:`epwatch.hooks.patch`, or an engine's own) cannot make it recurse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks.clock import HostClock
from epwatch.hooks.deferred import Derived
from epwatch.hooks.layers import LayerCursor
from epwatch.hooks.probe import DISPATCH, NullProbe, Probe, Token
from epwatch.hooks.registry import get_probe
from epwatch.hooks.tensors import routed_rows, split_total

# A wrapper epwatch installs over a collective carries the function it wraps here.
ORIGINAL_ATTR = "__epwatch_original__"

Splits = Sequence[int] | torch.Tensor | None


def unwrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` without epwatch's wrappers around it."""
    while (inner := getattr(fn, ORIGINAL_ATTR, None)) is not None:
        fn = inner
    return fn


def real_all_to_all_single() -> Callable[..., Any]:
    """torch's ``all_to_all_single`` from where it is defined, whatever was patched over
    ``torch.distributed.all_to_all_single`` since."""
    c10d = getattr(dist, "distributed_c10d", None)
    return unwrapped(getattr(c10d, "all_to_all_single", None) or dist.all_to_all_single)


def counts(
    output: Any,
    input: Any,
    output_split_sizes: Splits,
    input_split_sizes: Splits,
    phase: int,
    capacity_layout: bool | None = None,
    recv_tokens: Any = None,
) -> tuple[int, int, Any]:
    """(send bytes, recv bytes, recv tokens) of one ``all_to_all_single``.

    torch refuses split sizes that do not add up to a tensor's rows, so the bytes moved
    are the tensors' own sizes; the received rows are the output split sizes (a list
    summed in C), or the output's rows. In a capacity slab the tokens are the routed
    rows (a dispatch's; a combine of slabs brings back expert outputs, no tokens).
    Every call of every collective runs this: a tensor attribute costs 50-200 ns, so
    only two or three are read."""
    if recv_tokens is None:
        if output_split_sizes is not None:
            recv_tokens = (
                sum(output_split_sizes)
                if type(output_split_sizes) is list
                else split_total(output_split_sizes, output)
            )
        else:
            if capacity_layout is None:
                capacity_layout = output.ndim >= 3
            if capacity_layout:
                recv_tokens = routed_rows(output) if phase == DISPATCH else 0
            else:
                recv_tokens = output.shape[0] if output.ndim else 1
    return input.nbytes, output.nbytes, recv_tokens


def peer_send_bytes(input: torch.Tensor, input_split_sizes: Splits, world_size: int) -> list[int]:
    """Bytes to each destination rank (sampled steps only)."""
    rows = input.shape[0] if input.dim() else 1
    row = input.nbytes // rows if rows else 0
    if input_split_sizes is None:
        return [rows // world_size * row] * world_size
    if isinstance(input_split_sizes, torch.Tensor):
        return (input_split_sizes.to("cpu", torch.int64) * row).tolist()
    return [int(s) * row for s in input_split_sizes]


class TimedWork:
    """The async work handle; ``finish`` (which ends the record) runs when the engine
    waits on it, once."""

    __slots__ = ("_finish", "_work")

    def __init__(self, work: Any, finish: Callable[[], None]) -> None:
        self._work = work
        self._finish: Callable[[], None] | None = finish

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        out = self._work.wait(*args, **kwargs)
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def capture_check(probe: Probe | NullProbe) -> Callable[[], bool] | None:
    """The clock's CUDA-graph capture test, or None for the host clock (never captures),
    so the common path skips the call."""
    clock = probe.clock
    return None if isinstance(clock, HostClock) else clock.capturing


class A2ASpan:
    """One dispatch or combine, made of one or more ``all_to_all_single`` calls.

    ``begin()`` and ``end()`` may be called directly when the calls live in different
    functions (a count exchange here, the payload there); counts set on the span after
    a call (``recv_tokens``, ``recv_bytes``, ``dropped_tokens``) are what ``end()``
    records."""

    def __init__(
        self,
        probe: Probe | NullProbe,
        step: int,
        layer: int,
        phase: int,
        group: Any = None,
        *,
        capacity_layout: bool | None = None,
        collective: Callable[..., Any] | None = None,
    ) -> None:
        self.probe = probe
        self.step = step
        self.layer = layer
        self.phase = phase
        self.group = group
        self.capacity_layout = capacity_layout
        self.send_bytes = 0
        self.recv_bytes = 0
        self.recv_tokens: Any = 0
        self.dropped_tokens: Any = 0
        self.peer_send_bytes: list[int] | None = None
        self._collective = collective if collective is not None else real_all_to_all_single()
        self._sample = probe.sample_peers(step, layer)
        self.token: Token | None = None

    def begin(self) -> A2ASpan:
        """Stamp the entry (nothing inside CUDA-graph capture: a replay is never seen)."""
        if not self.probe.clock.capturing():
            self.token = self.probe.begin(self.step, self.layer, self.phase)
        return self

    def end(self) -> None:
        """Stamp the exit and queue the record with the span's counts."""
        self.probe.end(
            self.token,
            self.send_bytes,
            self.recv_bytes,
            self.recv_tokens,
            None,
            self.peer_send_bytes,
            self.dropped_tokens,
        )

    def __enter__(self) -> A2ASpan:
        return self.begin()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            self.end()
        return False

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Splits = None,
        input_split_sizes: Splits = None,
        group: Any = None,
        async_op: bool = False,
        *,
        count: bool = True,
        recv_tokens: int | None = None,
    ) -> Any:
        """The real collective (its exceptions propagate), then the span's counts.
        ``count=False`` for a metadata exchange that moves no tokens. With
        ``async_op=True``, wait on the work before the span ends."""
        work = self._collective(
            output,
            input,
            output_split_sizes,
            input_split_sizes,
            group=self.group if group is None else group,
            async_op=async_op,
        )
        if count:
            try:
                self.add(output, input, output_split_sizes, input_split_sizes, recv_tokens)
            except Exception:
                self.probe.count_error()
        return work

    def add(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Splits,
        input_split_sizes: Splits,
        recv_tokens: int | None = None,
    ) -> None:
        """Count one call's payload into the span."""
        send, recv, tokens = counts(
            output, input, output_split_sizes, input_split_sizes, self.phase,
            self.capacity_layout, recv_tokens,
        )  # fmt: skip
        self.send_bytes += send
        self.recv_bytes += recv
        self.recv_tokens = _plus(self.recv_tokens, tokens)
        if self._sample:
            per_peer = peer_send_bytes(input, input_split_sizes, self.probe.world_size)
            if self.peer_send_bytes is None:
                self.peer_send_bytes = per_peer
            else:
                self.peer_send_bytes = [
                    a + b for a, b in zip(self.peer_send_bytes, per_peer, strict=True)
                ]


def _plus(a: Any, b: Any) -> Any:
    """Sum of two counts, either of which may be a device value still in flight."""
    if not a:
        return b
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return Derived(lambda x, y: int(x) + int(y), a, b)


class EPAllToAll:
    """Probe-wrapped ``all_to_all_single`` for one EP process group.

    The per-call path allocates nothing but the record itself: the probe, clock test
    and collective are resolved once, counts come from tensor attributes and split
    lists summed in C (tensors by torch)."""

    def __init__(
        self,
        group: Any = None,
        probe: Probe | NullProbe | None = None,
        cursor: LayerCursor | None = None,
        *,
        capacity_layout: bool | None = None,
        collective: Callable[..., Any] | None = None,
    ) -> None:
        self.group = group
        self.cursor = cursor if cursor is not None else LayerCursor()
        self.capacity_layout = capacity_layout
        self._collective = collective if collective is not None else real_all_to_all_single()
        self._probe: Probe | NullProbe | None = None
        self._capturing: Callable[[], bool] | None = None
        if probe is not None:
            self._use(probe)

    def _use(self, probe: Probe | NullProbe) -> Probe | NullProbe:
        self._probe = probe
        self._capturing = capture_check(probe)
        return probe

    @property
    def probe(self) -> Probe | NullProbe:
        """Given, or the registry's for this rank of ``group`` (resolved on first use)."""
        if self._probe is None:
            try:
                probe = get_probe(
                    rank=dist.get_rank(self.group), world_size=dist.get_world_size(self.group)
                )
            except Exception as e:
                probe = NullProbe(f"no rank from the process group: {e}")
            self._use(probe)
        return self._probe  # type: ignore[return-value]

    def _place(self, phase: int, step: int | None, layer: int | None) -> tuple[int, int]:
        try:
            pos = self.cursor.dispatch(layer) if phase == DISPATCH else self.cursor.combine(layer)
            return (pos[0] if step is None else step), pos[1]
        except Exception:
            self.probe.count_error()
            return (step or 0), (layer or 0)

    def span(self, phase: int, step: int | None = None, layer: int | None = None) -> A2ASpan:
        s, lyr = self._place(phase, step, layer)
        return A2ASpan(
            self.probe,
            s,
            lyr,
            phase,
            self.group,
            capacity_layout=self.capacity_layout,
            collective=self._collective,
        )

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Splits = None,
        input_split_sizes: Splits = None,
        group: Any = None,
        async_op: bool = False,
        *,
        phase: int,
        step: int | None = None,
        layer: int | None = None,
        recv_tokens: int | None = None,
        dropped_tokens: int = 0,
    ) -> Any:
        """Same arguments and result as ``dist.all_to_all_single``, plus the position;
        ``dropped_tokens``: slots for this rank's experts a capacity limit dropped."""
        probe = self._probe
        if probe is None:
            probe = self.probe
        if step is None or layer is None:
            step, layer = self._place(phase, step, layer)
        capturing = self._capturing
        token = probe.begin(step, layer, phase) if capturing is None or not capturing() else None
        work = self._collective(
            output,
            input,
            output_split_sizes,
            input_split_sizes,
            group=self.group if group is None else group,
            async_op=async_op,
        )
        if token is None:  # disabled, or inside CUDA-graph capture
            return work
        try:
            if recv_tokens is None and type(output_split_sizes) is list:
                # counts(), inlined for the common case (a dropless dispatch or combine)
                send, recv, recv_tokens = input.nbytes, output.nbytes, sum(output_split_sizes)
            else:
                send, recv, recv_tokens = counts(
                    output, input, output_split_sizes, input_split_sizes, phase,
                    self.capacity_layout, recv_tokens,
                )  # fmt: skip
            every = probe.peer_sample_steps
            peers = (
                peer_send_bytes(input, input_split_sizes, probe.world_size)
                if every > 0 and not step % every and probe.sample_peers(step, layer)
                else None
            )
        except Exception:
            probe.count_error()
            return work
        if async_op:
            rest = (send, recv, recv_tokens, None, peers, dropped_tokens)  # fmt: skip
            return TimedWork(work, lambda: probe.end(token, *rest))
        probe.end(token, send, recv, recv_tokens, None, peers, dropped_tokens)
        return work


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: Splits = None,
    input_split_sizes: Splits = None,
    group: Any = None,
    async_op: bool = False,
    *,
    probe: Probe | NullProbe,
    phase: int,
    step: int,
    layer: int,
    recv_tokens: int | None = None,
) -> Any:
    """Drop-in ``dist.all_to_all_single`` for call sites that know step and layer."""
    span = A2ASpan(probe, step, layer, phase, group).begin()
    work = span.all_to_all_single(
        output,
        input,
        output_split_sizes,
        input_split_sizes,
        async_op=async_op,
        recv_tokens=recv_tokens,
    )
    if async_op:
        return TimedWork(work, span.end)
    span.end()
    return work
