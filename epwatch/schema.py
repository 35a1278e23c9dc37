"""The hook record of DESIGN section 3, as columns.

Every part of epwatch (hooks, agent, wire codec, simulator, estimators) passes records
as :class:`RecordColumns`: one numpy array per field, all of one length. Columnar
batches are what make the ingest rate reachable; a Python object per record is not.
This module needs numpy only, so the hooks and the agent can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np


class Phase(IntEnum):
    """Which half of the MoE layer's all-to-all a record times."""

    DISPATCH = 0
    COMBINE = 1


PHASE_NAMES = {Phase.DISPATCH: "dispatch", Phase.COMBINE: "combine"}

# Column name -> little-endian dtype on the wire and in memory.
RECORD_DTYPES: dict[str, str] = {
    "rank": "<i4",
    "local_device": "<i4",
    "step": "<i8",
    "layer": "<i4",
    "phase": "<u1",
    "enter_ns": "<i8",
    "exit_ns": "<i8",
    "send_bytes": "<i8",
    "recv_bytes": "<i8",
    "recv_tokens": "<i8",
}

# Optional, sampled per-peer rows (DESIGN section 3): one row of world_size values.
PEER_KEY_DTYPES: dict[str, str] = {"rank": "<i4", "step": "<i8", "layer": "<i4", "phase": "<u1"}
PEER_WAIT_DTYPE = "<f8"  # seconds waited for each source rank
PEER_SEND_DTYPE = "<i8"  # bytes sent to each destination rank

# Heartbeat: the last collective each rank entered.
ENTERED_DTYPES: dict[str, str] = PEER_KEY_DTYPES


class RecordError(ValueError):
    """A batch that cannot be accepted; the message says what is wrong with it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _as_columns(values: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for name, dtype in dtypes.items():
        if name not in values:
            raise RecordError("missing_column", f"column {name!r} is missing")
        out[name] = np.ascontiguousarray(values[name], dtype=dtype)
    return out


@dataclass(frozen=True, slots=True)
class RecordColumns:
    """Many hook records (any ranks, one EP group) as equal-length arrays."""

    rank: np.ndarray
    local_device: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    phase: np.ndarray
    enter_ns: np.ndarray
    exit_ns: np.ndarray
    send_bytes: np.ndarray
    recv_bytes: np.ndarray
    recv_tokens: np.ndarray

    @classmethod
    def from_arrays(cls, **values: np.ndarray) -> RecordColumns:
        return cls(**_as_columns(values, RECORD_DTYPES))

    @classmethod
    def empty(cls) -> RecordColumns:
        return cls(**{n: np.empty(0, dtype=d) for n, d in RECORD_DTYPES.items()})

    def __len__(self) -> int:
        return len(self.rank)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def take(self, index: np.ndarray | slice) -> RecordColumns:
        return RecordColumns(**{n: a[index] for n, a in self.as_dict().items()})

    @staticmethod
    def concat(parts: list[RecordColumns]) -> RecordColumns:
        if not parts:
            return RecordColumns.empty()
        return RecordColumns(
            **{n: np.concatenate([getattr(p, n) for p in parts]) for n in RECORD_DTYPES}
        )

    def validate(self, world_size: int) -> None:
        """Raise :class:`RecordError` naming the first thing wrong with these records."""
        n = len(self.rank)
        for name, arr in self.as_dict().items():
            if arr.ndim != 1 or len(arr) != n:
                raise RecordError(
                    "length_mismatch", f"column {name!r} has {arr.size} values, rank has {n}"
                )
        if world_size <= 0:
            raise RecordError("bad_world_size", f"world_size must be positive, got {world_size}")
        if n == 0:
            return
        if self.rank.min() < 0 or self.rank.max() >= world_size:
            bad = int(self.rank[(self.rank < 0) | (self.rank >= world_size)][0])
            raise RecordError("rank_out_of_range", f"rank {bad} is outside [0, {world_size})")
        if self.phase.max() > Phase.COMBINE:
            raise RecordError("bad_phase", f"phase {int(self.phase.max())} is not 0 or 1")
        if self.step.min() < 0 or self.layer.min() < 0:
            raise RecordError("negative_index", "step and layer must be non-negative")
        if (self.exit_ns < self.enter_ns).any():
            i = int(np.argmax(self.exit_ns < self.enter_ns))
            raise RecordError(
                "negative_duration",
                f"record {i} (rank {int(self.rank[i])}, step {int(self.step[i])}) "
                f"exits before it enters",
            )
        for name in ("send_bytes", "recv_bytes", "recv_tokens"):
            if getattr(self, name).min() < 0:
                raise RecordError("negative_count", f"column {name!r} has a negative value")


@dataclass(frozen=True, slots=True)
class PeerRows:
    """Sampled per-peer rows: ``wait_s[i, j]`` is how long the row's rank waited for
    data from source rank j; ``send_bytes[i, j]`` what it sent to destination j.
    Either matrix may be absent (shape (n, 0))."""

    rank: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    phase: np.ndarray
    wait_s: np.ndarray
    send_bytes: np.ndarray

    def __len__(self) -> int:
        return len(self.rank)

    @classmethod
    def empty(cls, world_size: int = 0) -> PeerRows:
        keys = {n: np.empty(0, dtype=d) for n, d in PEER_KEY_DTYPES.items()}
        return cls(
            **keys,
            wait_s=np.empty((0, world_size), dtype=PEER_WAIT_DTYPE),
            send_bytes=np.empty((0, world_size), dtype=PEER_SEND_DTYPE),
        )

    def validate(self, world_size: int) -> None:
        n = len(self.rank)
        for name in PEER_KEY_DTYPES:
            if len(getattr(self, name)) != n:
                raise RecordError("length_mismatch", f"peer column {name!r} length != {n}")
        for name in ("wait_s", "send_bytes"):
            m = getattr(self, name)
            if m.size and m.shape != (n, world_size):
                raise RecordError(
                    "length_mismatch",
                    f"peer matrix {name!r} has shape {m.shape}, expected ({n}, {world_size})",
                )
        if n and (self.rank.min() < 0 or self.rank.max() >= world_size):
            raise RecordError("rank_out_of_range", f"peer row rank outside [0, {world_size})")
        if self.wait_s.size and not np.isfinite(self.wait_s).all():
            raise RecordError("non_finite", "peer wait times must be finite")
        if self.wait_s.size and (self.wait_s < 0).any():
            raise RecordError("negative_duration", "peer wait times must be non-negative")


@dataclass(frozen=True, slots=True)
class Entered:
    """Heartbeats: the (step, layer, phase) each rank entered last."""

    rank: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    phase: np.ndarray

    def __len__(self) -> int:
        return len(self.rank)

    @classmethod
    def empty(cls) -> Entered:
        return cls(**{n: np.empty(0, dtype=d) for n, d in ENTERED_DTYPES.items()})

    def validate(self, world_size: int) -> None:
        n = len(self.rank)
        for name in ENTERED_DTYPES:
            if len(getattr(self, name)) != n:
                raise RecordError("length_mismatch", f"heartbeat column {name!r} length != {n}")
        if n and (self.rank.min() < 0 or self.rank.max() >= world_size):
            raise RecordError("rank_out_of_range", f"heartbeat rank outside [0, {world_size})")
