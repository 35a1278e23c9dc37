"""Dense assembly of one EP group's records, step by step.

Records of one step arrive from many agents in any order. We scatter them into a ring
of dense ``[slot, layer, phase, rank]`` arrays with one vectorised assignment per
column (no per-record Python), and hand a step to the estimators once every cell is
filled. Memory is bounded by the number of slots.
"""

from __future__ import annotations

import numpy as np

from epwatch.schema import RecordColumns

_FIELDS = ("enter_ns", "exit_ns", "send_bytes", "recv_bytes", "recv_tokens", "dropped_tokens")


class StepBuffer:
    """``slots`` steps of up to ``max_layers`` layers; the layer capacity grows with the
    layers seen, never past ``max_layers``, so ``max_bytes`` is a hard bound."""

    def __init__(self, world_size: int, slots: int, max_layers: int = 128) -> None:
        if max_layers < 1 or slots < 1:
            raise ValueError(f"need at least one slot and one layer, got {slots}, {max_layers}")
        self.P = world_size
        self.slots = slots
        self.max_layers = max_layers
        self.max_bytes = slots * self.bytes_per_step_for(world_size, max_layers)
        self.layers = 0  # layers seen so far (max layer + 1)
        self._cap = 0
        self.slot_step = np.full(slots, -1, dtype=np.int64)
        self._alloc(min(8, max_layers))

    def _alloc(self, cap: int) -> None:
        old = getattr(self, "cols", None)
        shape = (self.slots, cap, 2, self.P)
        cols = {f: np.zeros(shape, dtype=np.int64) for f in _FIELDS}
        filled = np.zeros(shape, dtype=bool)
        if old is not None:
            for f in _FIELDS:
                cols[f][:, : self._cap] = old[f]
            filled[:, : self._cap] = self.filled
        self.cols, self.filled, self._cap = cols, filled, cap

    @staticmethod
    def bytes_per_step_for(world_size: int, layers: int) -> int:
        return layers * 2 * world_size * (8 * len(_FIELDS) + 1)

    def pending_steps(self) -> list[int]:
        return sorted(int(s) for s in self.slot_step if s >= 0)

    def add(self, rec: RecordColumns) -> None:
        """Scatter records into their steps' slots. Callers make room first: every
        step in ``rec`` must have a free slot or already own one, and every layer must
        be below ``max_layers``."""
        top = int(rec.layer.max()) + 1
        if top > self.max_layers:
            raise ValueError(f"layer {top - 1} is beyond the buffer's {self.max_layers} layers")
        if top > self._cap:
            self._alloc(min(self.max_layers, max(top, 2 * self._cap)))
        self.layers = max(self.layers, top)
        slot = rec.step % self.slots
        first = int(rec.step.min())
        present = np.zeros(int(rec.step.max()) - first + 1, dtype=bool)
        present[rec.step - first] = True
        for s in (np.flatnonzero(present) + first).tolist():
            i = s % self.slots
            if self.slot_step[i] != s:
                if self.slot_step[i] >= 0:
                    raise RuntimeError(f"slot of step {s} still holds step {self.slot_step[i]}")
                self.slot_step[i] = s
        flat = ((slot * self._cap + rec.layer) * 2 + rec.phase) * self.P + rec.rank
        for f in _FIELDS:
            self.cols[f].reshape(-1)[flat] = getattr(rec, f)
        self.filled.reshape(-1)[flat] = True

    def _layers_of(self, i: int) -> tuple[np.ndarray, bool]:
        """The layers a slot's step has records for, and whether each is complete.

        Completeness is judged per step over its own layers: one stray record with an
        unexpected layer number spoils that step, not every step after it."""
        cells = self.filled[i, : self.layers].reshape(self.layers, -1)
        seen, full = cells.any(axis=1), cells.all(axis=1)
        return np.flatnonzero(seen), bool(seen.any() and (seen == full).all())

    def complete(self, step: int) -> bool:
        i = step % self.slots
        return self.slot_step[i] == step and self._layers_of(i)[1]

    def take(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """The step's layers and their ``[layer, phase, rank]`` arrays if complete
        (copies), freeing its slot either way."""
        i = step % self.slots
        out = None
        if self.slot_step[i] == step:
            layers, complete = self._layers_of(i)
            if complete:
                out = layers, {f: self.cols[f][i, layers] for f in _FIELDS}
        self.filled[i] = False
        self.slot_step[i] = -1
        return out
