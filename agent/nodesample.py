"""One round of node samples -> the spool payload, without a message per point.

A round is some 600 points whose name, labels, kind and help stay the same from one
round to the next; only the values change. Building a ``MetricPoint`` (with its map
of labels) per point per round cost more CPU than reading the counters. So the
unchanging fields of each series are serialized once, by protobuf, and kept; a round
writes, per point, those bytes and then the value as ``MetricPoint.value`` (field 3,
a little-endian double). A parser sees exactly the message the slow path builds:
an embedded message is its fields in any order, and concatenated serializations of
one message merge (this is how the sample joins the shipper's header).
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from epwatch.protos import epwatch_pb2 as pb

_POINT_TAG = b"\x12"  # NodeSample.points: field 2, length-delimited
_VALUE_TAG = b"\x19"  # MetricPoint.value: field 3, 64-bit
_SAMPLE_TAG = b"\x2a"  # AgentMessage.sample: field 5, length-delimited
_DOUBLE = struct.Struct("<d")


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (a length prefix)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class NodeSampleEncoder:
    """Serializes ``AgentMessage(sample=NodeSample(...))``, caching each series' bytes.

    Points that have ``name``, ``labels``, ``value``, ``kind`` and ``help`` (the
    samplers' :class:`~agent.samplers.base.Point`) take the cached path; any other
    object is converted with its ``to_proto()``. The cache holds at most
    ``max_series`` series and starts over beyond that (a node whose series keep
    changing pays the slow path once per overflow, never unbounded memory).
    """

    def __init__(self, max_series: int = 50_000) -> None:
        self.max_series = max_series
        self._heads: dict[Hashable, bytes] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def encode(self, time_unix_ns: int, points: Iterable[Any], statuses: Sequence[Any]) -> bytes:
        """The serialized ``AgentMessage`` carrying this round (payload for the spool)."""
        head = pb.NodeSample(time_unix_ns=time_unix_ns, samplers=[s.to_proto() for s in statuses])
        parts = [head.SerializeToString()]
        heads = self._heads
        pack = _DOUBLE.pack
        for p in points:
            try:
                key = (p.name, tuple(p.labels.items()), p.kind, p.help)
            except AttributeError:  # not a sampler Point: the message it makes itself
                body = p.to_proto().SerializeToString()
                parts.append(_POINT_TAG + varint(len(body)) + body)
                continue
            prefix = heads.get(key)
            if prefix is None:
                prefix = self._series(key)
            parts.append(prefix)
            parts.append(pack(p.value))
        body = b"".join(parts)
        return _SAMPLE_TAG + varint(len(body)) + body

    def _series(self, key: tuple[str, tuple[tuple[str, str], ...], int, str]) -> bytes:
        """Tag, length and unchanging fields of one series, up to the value's tag."""
        if len(self._heads) >= self.max_series:
            self._heads.clear()
        name, labels, kind, help_text = key
        static = pb.MetricPoint(
            name=name, labels=dict(labels), kind=int(kind), help=help_text
        ).SerializeToString()
        prefix = _POINT_TAG + varint(len(static) + 1 + _DOUBLE.size) + static + _VALUE_TAG
        self._heads[key] = prefix
        return prefix
