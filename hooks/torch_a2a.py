"""``torch.distributed.all_to_all_single`` with the probe around it.

Bytes come from the split sizes times the bytes of one row; received tokens from the
output split sizes unless the caller says otherwise (a row is then not a token-expert
slot). A dispatch is often two collectives, a count exchange and the payload: time
both in one :class:`A2ASpan`, or the wait in the first is blamed on expert compute.

    a2a = EPAllToAll(group=ep_group)
    out = a2a.all_to_all_single(out, x, out_splits, in_splits, phase=DISPATCH, layer=l)

    with a2a.span(DISPATCH, layer=l) as span:
        span.all_to_all_single(counts_out, counts_in, count=False)
        span.all_to_all_single(out, x, out_splits, in_splits)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks.layers import LayerCursor
from epwatch.hooks.probe import DISPATCH, NullProbe, Probe, Token
from epwatch.hooks.registry import get_probe
from epwatch.hooks.tensors import row_bytes, split_total


class A2ASpan:
    """One dispatch or combine, made of one or more ``all_to_all_single`` calls."""

    def __init__(
        self, probe: Probe | NullProbe, step: int, layer: int, phase: int, group: Any = None
    ) -> None:
        self.probe = probe
        self.step = step
        self.layer = layer
        self.phase = phase
        self.group = group
        self.send_bytes = 0
        self.recv_bytes = 0
        self.recv_tokens = 0
        self.peer_send_bytes: list[int] | None = None
        self._sample = probe.sample_peers(step, layer)
        self.token: Token | None = None

    def begin(self) -> A2ASpan:
        if not self.probe.clock.capturing():  # a graph replay would never be recorded
            self.token = self.probe.begin(self.step, self.layer, self.phase)
        return self

    def end(self) -> None:
        self.probe.end(
            self.token,
            self.send_bytes,
            self.recv_bytes,
            self.recv_tokens,
            None,
            self.peer_send_bytes,
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
        output_split_sizes: Sequence[int] | None = None,
        input_split_sizes: Sequence[int] | None = None,
        group: Any = None,
        async_op: bool = False,
        *,
        count: bool = True,
        recv_tokens: int | None = None,
    ) -> Any:
        """The real collective (its exceptions propagate), then the span's counts.
        ``count=False`` for a metadata exchange that moves no tokens. With
        ``async_op=True``, wait on the work before the span ends."""
        work = dist.all_to_all_single(
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
        output_split_sizes: Sequence[int] | None,
        input_split_sizes: Sequence[int] | None,
        recv_tokens: int | None = None,
    ) -> None:
        """Count one call's payload into the span."""
        out_rows = split_total(output_split_sizes, output)
        in_rows = split_total(input_split_sizes, input)
        in_row_bytes = row_bytes(input)
        self.send_bytes += in_rows * in_row_bytes
        self.recv_bytes += out_rows * row_bytes(output)
        self.recv_tokens += out_rows if recv_tokens is None else int(recv_tokens)
        if self._sample:
            p = self.probe.world_size
            splits = (
                list(input_split_sizes) if input_split_sizes is not None else [in_rows // p] * p
            )
            per_peer = [int(s) * in_row_bytes for s in splits]
            if self.peer_send_bytes is None:
                self.peer_send_bytes = per_peer
            else:
                self.peer_send_bytes = [
                    a + b for a, b in zip(self.peer_send_bytes, per_peer, strict=True)
                ]


class TimedWork:
    """The async work handle; the record ends when the engine waits on it."""

    def __init__(self, work: Any, span: A2ASpan) -> None:
        self._work = work
        self._span: A2ASpan | None = span

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        out = self._work.wait(*args, **kwargs)
        span, self._span = self._span, None
        if span is not None:
            span.end()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class EPAllToAll:
    """Probe-wrapped ``all_to_all_single`` for one EP process group."""

    def __init__(
        self,
        group: Any = None,
        probe: Probe | NullProbe | None = None,
        cursor: LayerCursor | None = None,
    ) -> None:
        self.group = group
        self._probe = probe
        self.cursor = cursor if cursor is not None else LayerCursor()

    @property
    def probe(self) -> Probe | NullProbe:
        """Given, or the registry's for this rank of ``group`` (resolved on first use)."""
        if self._probe is None:
            try:
                self._probe = get_probe(
                    rank=dist.get_rank(self.group), world_size=dist.get_world_size(self.group)
                )
            except Exception as e:
                self._probe = NullProbe(f"no rank from the process group: {e}")
        return self._probe

    def span(self, phase: int, step: int | None = None, layer: int | None = None) -> A2ASpan:
        probe = self.probe
        try:
            pos = self.cursor.dispatch(layer) if phase == DISPATCH else self.cursor.combine(layer)
            s, lyr = (pos[0] if step is None else step), pos[1]
        except Exception:
            probe.count_error()
            s, lyr = (step or 0), (layer or 0)
        return A2ASpan(probe, s, lyr, phase, self.group)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int] | None = None,
        input_split_sizes: Sequence[int] | None = None,
        group: Any = None,
        async_op: bool = False,
        *,
        phase: int,
        step: int | None = None,
        layer: int | None = None,
        recv_tokens: int | None = None,
    ) -> Any:
        """Same arguments and result as ``dist.all_to_all_single``, plus the position."""
        span = self.span(phase, step, layer).begin()
        work = span.all_to_all_single(
            output,
            input,
            output_split_sizes,
            input_split_sizes,
            group=group,
            async_op=async_op,
            recv_tokens=recv_tokens,
        )
        if async_op:
            return TimedWork(work, span)
        span.end()
        return work


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
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
        return TimedWork(work, span)
    span.end()
    return work
