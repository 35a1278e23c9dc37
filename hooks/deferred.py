"""Values a record carries that are only known later (GPU timestamps, device counters).

The caller's thread must never wait for the device, so an adapter puts a
:class:`Deferred` where a number belongs; the flusher polls :meth:`Deferred.ready` and
reads :meth:`Deferred.value` once it is true. Plain numbers pass through untouched, so
the host-clock path pays nothing for this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deferred:
    """A value the flusher may read once :meth:`ready` is true. Never blocks."""

    __slots__ = ()

    def ready(self) -> bool:
        raise NotImplementedError

    def value(self) -> Any:
        raise NotImplementedError

    def release(self) -> None:
        """Return pooled resources (events, pinned buffers); called once, after value()."""


class Derived(Deferred):
    """``fn(*values of parts)``, ready when every part is: e.g. bytes = tokens x row size."""

    __slots__ = ("fn", "parts")

    def __init__(self, fn: Callable[..., Any], *parts: Any) -> None:
        self.fn = fn
        self.parts = parts

    def ready(self) -> bool:
        return all(p.ready() for p in self.parts if isinstance(p, Deferred))

    def value(self) -> Any:
        return self.fn(*(p.value() if isinstance(p, Deferred) else p for p in self.parts))

    def release(self) -> None:
        for p in self.parts:
            if isinstance(p, Deferred):
                p.release()


def resolve(value: Any) -> Any:
    """The plain value of a ready field (releasing what it pooled)."""
    if isinstance(value, Deferred):
        out = value.value()
        value.release()
        return out
    return value
