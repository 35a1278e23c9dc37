"""The hook record of docs/design.md §3, as columns.

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
    "dropped_tokens": "<i8",
}
# Columns added after the first release: a sender, recording or caller that does not
# have them means 0 (a dropless layer drops nothing).
OPTIONAL_RECORD_COLUMNS = frozenset({"dropped_tokens"})

# Optional, sampled per-peer rows (design §3): one row of world_size values.
PEER_KEY_DTYPES: dict[str, str] = {"rank": "<i4", "step": "<i8", "layer": "<i4", "phase": "<u1"}
PEER_WAIT_DTYPE = "<f8"  # seconds waited for each source rank
PEER_SEND_DTYPE = "<i8"  # bytes sent to each destination rank

# Heartbeat: the last collective each rank entered.
ENTERED_DTYPES: dict[str, str] = PEER_KEY_DTYPES

# Counter mode (decode under CUDA graphs): one interval record per rank per snapshot
# of the kernels' cumulative counters. Keys, then [n, P] wait rows and [n, E_local]
# token deltas.
INTERVAL_KEY_DTYPES: dict[str, str] = {
    "rank": "<i4",
    "start_ns": "<i8",  # the rank's host monotonic clock at the previous snapshot
    "end_ns": "<i8",  # ... and at this one
    "step": "<i8",  # the engine's forward-step counter at the snapshot; -1 unknown
}
INTERVAL_WAIT_DTYPE = "<f8"  # seconds waited for each source rank (cycles / SM clock)
INTERVAL_TOKENS_DTYPE = "<i8"  # tokens received per local expert in the interval
MAX_LOCAL_EXPERTS = 1 << 12


# Plausibility bounds: values past these are garbage, and would overflow the
# estimators' int64 keys (step << 17 | layer << 1 | phase) and sums.
MAX_WORLD_SIZE = 1 << 16
MAX_LAYER = 1 << 12
MAX_STEP = 1 << 44
MAX_DURATION_NS = 3600 * 10**9
MAX_COUNT = 1 << 48


class RecordError(ValueError):
    """A batch that cannot be accepted; the message says what is wrong with it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_keys(what: str, step: np.ndarray, layer: np.ndarray, phase: np.ndarray) -> None:
    if not len(step):
        return
    if step.min() < 0 or step.max() >= MAX_STEP:
        raise RecordError("step_out_of_range", f"{what} step outside [0, {MAX_STEP})")
    if layer.min() < 0 or layer.max() >= MAX_LAYER:
        raise RecordError("layer_out_of_range", f"{what} layer outside [0, {MAX_LAYER})")
    if phase.max() > Phase.COMBINE:
        raise RecordError("bad_phase", f"{what} phase {int(phase.max())} is not 0 or 1")


def _check_ranks(what: str, rank: np.ndarray, world_size: int) -> None:
    if len(rank) and (rank.min() < 0 or rank.max() >= world_size):
        bad = int(rank[(rank < 0) | (rank >= world_size)][0])
        raise RecordError("rank_out_of_range", f"{what} rank {bad} is outside [0, {world_size})")


def _check_world_size(world_size: int) -> None:
    if not 0 < world_size <= MAX_WORLD_SIZE:
        raise RecordError(
            "bad_world_size", f"world_size must be in [1, {MAX_WORLD_SIZE}], got {world_size}"
        )


def _check_times(what: str, start: np.ndarray, end: np.ndarray) -> None:
    """Clock readings that are non-negative and spans within (0, an hour], computed
    without int64 wrap-around."""
    if not len(start):
        return
    if start.min() < 0 or end.min() < 0:
        raise RecordError("negative_time", f"{what} times must be non-negative clock readings")
    span = end.astype(np.float64) - start.astype(np.float64)
    if span.min() <= 0:
        raise RecordError("negative_duration", f"{what} ends before it starts")
    if span.max() > MAX_DURATION_NS:
        raise RecordError("duration_out_of_range", f"{what} lasts more than an hour")


def _as_columns(
    values: dict[str, np.ndarray], dtypes: dict[str, str], optional: frozenset[str] = frozenset()
) -> dict[str, np.ndarray]:
    out = {}
    for name, dtype in dtypes.items():
        if name in values:
            out[name] = np.ascontiguousarray(values[name], dtype=dtype)
        elif name in optional:
            out[name] = np.zeros(len(next(iter(out.values()), ())), dtype=dtype)
        else:
            raise RecordError("missing_column", f"column {name!r} is missing")
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
    dropped_tokens: np.ndarray  # routed slots for this rank's experts lost to capacity

    @classmethod
    def from_arrays(cls, **values: np.ndarray) -> RecordColumns:
        """Columns from arrays; the optional ones (``dropped_tokens``) default to 0."""
        return cls(**_as_columns(values, RECORD_DTYPES, OPTIONAL_RECORD_COLUMNS))

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
        _check_world_size(world_size)
        if n == 0:
            return
        _check_ranks("record", self.rank, world_size)
        _check_keys("record", self.step, self.layer, self.phase)
        if self.enter_ns.min() < 0 or self.exit_ns.min() < 0:
            raise RecordError(
                "negative_time", "enter_ns and exit_ns must be non-negative clock readings"
            )
        # Both are in [0, 2^63): the difference cannot wrap around int64.
        duration = self.exit_ns - self.enter_ns
        if duration.min() < 0:
            i = int(np.argmin(duration))
            raise RecordError(
                "negative_duration",
                f"record {i} (rank {int(self.rank[i])}, step {int(self.step[i])}) "
                f"exits before it enters",
            )
        if duration.max() > MAX_DURATION_NS:
            i = int(np.argmax(duration))
            raise RecordError(
                "duration_out_of_range",
                f"record {i} (rank {int(self.rank[i])}) lasts more than an hour",
            )
        for name in ("send_bytes", "recv_bytes", "recv_tokens", "dropped_tokens"):
            col = getattr(self, name)
            if col.min() < 0:
                raise RecordError("negative_count", f"column {name!r} has a negative value")
            if col.max() >= MAX_COUNT:
                raise RecordError("count_out_of_range", f"column {name!r} has an implausible value")


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

    def take(self, index: np.ndarray | slice) -> PeerRows:
        """The rows at ``index`` (a mask, indices or a slice); an absent matrix stays
        absent."""

        def rows_of(m: np.ndarray) -> np.ndarray:
            return m[index] if m.ndim == 2 and len(m) == len(self) else m

        return PeerRows(
            rank=self.rank[index],
            step=self.step[index],
            layer=self.layer[index],
            phase=self.phase[index],
            wait_s=rows_of(self.wait_s),
            send_bytes=rows_of(self.send_bytes),
        )

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
        _check_world_size(world_size)
        _check_ranks("peer row", self.rank, world_size)
        _check_keys("peer row", self.step, self.layer, self.phase)
        if self.wait_s.size:
            if not np.isfinite(self.wait_s).all():
                raise RecordError("non_finite", "peer wait times must be finite (no NaN)")
            if self.wait_s.min() < 0:
                raise RecordError("negative_duration", "peer wait times must be non-negative")
            if self.wait_s.max() > MAX_DURATION_NS / 1e9:
                raise RecordError("duration_out_of_range", "peer wait time above an hour")
        if self.send_bytes.size and self.send_bytes.min() < 0:
            raise RecordError("negative_count", "peer send_bytes has a negative value")


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
        _check_world_size(world_size)
        _check_ranks("heartbeat", self.rank, world_size)
        _check_keys("heartbeat", self.step, self.layer, self.phase)


@dataclass(frozen=True, slots=True)
class IntervalColumns:
    """Counter-mode records: what a rank's kernel counters say about one interval.

    ``dispatch_wait_s[i, j]`` / ``combine_wait_s[i, j]`` are the seconds rank ``rank[i]``
    spent waiting for source rank j in that interval's dispatches / combines (DeepEP's
    ``*_wait_recv_cost_stats`` cycle deltas over the SM clock; summed over the rank's
    local-expert waiters, so comparable across ranks, not wall time);
    ``expert_tokens[i, e]`` are the tokens its local expert e received; ``step`` is the
    engine's forward-step counter at the end (the same count on every rank of a group,
    so a rank whose count stays behind is where a hang is). Intervals of different
    ranks are not aligned in time: only rates and ratios are compared across ranks.
    """

    rank: np.ndarray
    start_ns: np.ndarray
    end_ns: np.ndarray
    step: np.ndarray
    dispatch_wait_s: np.ndarray
    combine_wait_s: np.ndarray
    expert_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.rank)

    @classmethod
    def from_arrays(
        cls, world_size: int, local_experts: int, **values: np.ndarray
    ) -> IntervalColumns:
        keys = _as_columns(values, INTERVAL_KEY_DTYPES)
        n = len(keys["rank"])
        out = {}
        for name, dtype, width in (
            ("dispatch_wait_s", INTERVAL_WAIT_DTYPE, world_size),
            ("combine_wait_s", INTERVAL_WAIT_DTYPE, world_size),
            ("expert_tokens", INTERVAL_TOKENS_DTYPE, local_experts),
        ):
            if name not in values:
                raise RecordError("missing_column", f"column {name!r} is missing")
            out[name] = np.ascontiguousarray(values[name], dtype=dtype).reshape(n, width)
        return cls(**keys, **out)

    @property
    def local_experts(self) -> int:
        return int(self.expert_tokens.shape[1]) if self.expert_tokens.ndim == 2 else 0

    def take(self, index: np.ndarray | slice) -> IntervalColumns:
        return IntervalColumns(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list[IntervalColumns]) -> IntervalColumns:
        """Rows of several batches of one group (same world size and expert count)."""
        names = [f.name for f in fields(IntervalColumns)]
        return IntervalColumns(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})

    def validate(self, world_size: int) -> None:
        """Raise :class:`RecordError` naming the first thing wrong with these records."""
        n = len(self.rank)
        for name in INTERVAL_KEY_DTYPES:
            arr = getattr(self, name)
            if arr.ndim != 1 or len(arr) != n:
                raise RecordError("length_mismatch", f"interval column {name!r} length != {n}")
        _check_world_size(world_size)
        for name, width in (
            ("dispatch_wait_s", world_size),
            ("combine_wait_s", world_size),
            ("expert_tokens", self.local_experts),
        ):
            m = getattr(self, name)
            if m.ndim != 2 or m.shape != (n, width):
                raise RecordError(
                    "length_mismatch",
                    f"interval matrix {name!r} has shape {m.shape}, expected ({n}, {width})",
                )
        if not 1 <= self.local_experts <= MAX_LOCAL_EXPERTS:
            raise RecordError(
                "count_out_of_range",
                f"local experts per rank must be 1..{MAX_LOCAL_EXPERTS}, got {self.local_experts}"
            )
        if n == 0:
            return
        _check_ranks("interval", self.rank, world_size)
        _check_times("interval", self.start_ns, self.end_ns)
        if self.step.min() < -1 or self.step.max() >= MAX_STEP:
            raise RecordError("step_out_of_range", f"interval step outside [-1, {MAX_STEP})")
        for name in ("dispatch_wait_s", "combine_wait_s"):
            m = getattr(self, name)
            if not np.isfinite(m).all():
                raise RecordError("non_finite", f"interval {name} must be finite (no NaN)")
            if m.min(initial=0.0) < 0:
                raise RecordError("negative_duration", f"interval {name} has a negative wait")
            if m.max(initial=0.0) > MAX_DURATION_NS / 1e9 * MAX_LOCAL_EXPERTS:
                raise RecordError("duration_out_of_range", f"interval {name} is implausible")
        tokens = self.expert_tokens
        if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_COUNT):
            raise RecordError("count_out_of_range", "interval expert_tokens out of range")
