"""Step and layer numbers for adapters whose call sites do not know them.

A DeepEP buffer or an all-to-all manager is shared by every MoE layer and rarely knows
which layer is calling. The cursor numbers dispatches in call order and gives each
combine the layer of the oldest dispatch not yet combined. With ``layers_per_step``
set (61 for DeepSeek-V3) the step advances by itself after the last layer's combine;
otherwise the engine calls :meth:`next_step` once per forward pass. Engines that
interleave micro-batches (dual-batch overlap) should pass layers explicitly.
"""

from __future__ import annotations

from collections import deque


class LayerCursor:
    def __init__(self, step: int = 0, layers_per_step: int | None = None) -> None:
        self.step = step
        self.layers_per_step = layers_per_step
        self._next_layer = 0
        self._open: deque[int] = deque()

    def next_step(self, step: int | None = None) -> int:
        """Start a forward pass (the next step, or ``step``)."""
        self.step = self.step + 1 if step is None else step
        self._next_layer = 0
        self._open.clear()
        return self.step

    def dispatch(self, layer: int | None = None) -> tuple[int, int]:
        """(step, layer) for a dispatch about to start."""
        if layer is None:
            layer = self._next_layer
        self._next_layer = layer + 1
        self._open.append(layer)
        return self.step, layer

    def combine(self, layer: int | None = None) -> tuple[int, int]:
        """(step, layer) for a combine about to start."""
        if layer is None:
            layer = self._open.popleft() if self._open else max(self._next_layer - 1, 0)
        elif layer in self._open:
            self._open.remove(layer)
        step = self.step
        if (
            self.layers_per_step is not None
            and layer + 1 >= self.layers_per_step
            and not self._open
        ):
            self.next_step()
        return step, layer
