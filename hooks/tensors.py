"""Torch helpers for the adapters: payload sizes, device values read without a sync.

Counts that live on the GPU (DeepEP's ``num_tokens_per_rank``, ``recv_count``, the
``*_wait_recv_cost_stats`` cycle counters) are copied to pinned host memory with a
non-blocking copy on the collective's stream; the flusher reads them once an event
recorded after the copy has completed. CPU tensors are snapshotted at once, since an
engine may update them in place (the wait-stat counters are cumulative).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from epwatch.hooks.config import HookConfig
from epwatch.hooks.deferred import Deferred


def parts_of(x: Any) -> list[torch.Tensor]:
    """DeepEP passes a tensor or a (data, scales) tuple; ``None`` members are skipped."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def row_bytes(x: Any) -> int:
    """Bytes of one token (one row along dim 0) of a tensor or tuple of tensors."""
    total = 0
    for t in parts_of(x):
        rows = t.shape[0] if t.dim() else 1
        total += t.element_size() * (t.numel() // rows if rows else 0)
    return total


def last_dim_bytes(x: Any) -> int:
    """Bytes of one token laid out along the last dim (DeepEP low-latency buffers are
    ``[local_experts, slots, hidden]``)."""
    return sum(t.element_size() * (t.shape[-1] if t.dim() else 1) for t in parts_of(x))


def rows(x: Any) -> int:
    parts = parts_of(x)
    return int(parts[0].shape[0]) if parts and parts[0].dim() else 0


class HostCopy(Deferred):
    """A tensor's values as of this point in its stream, read later without a sync."""

    __slots__ = ("event", "host")

    def __init__(self, tensor: torch.Tensor, stream: Any = None) -> None:
        t = tensor.detach()
        if t.is_cuda:
            with torch.cuda.stream(stream):  # None: the current stream
                self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.host.copy_(t, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
        else:
            self.host = t.clone()
            self.event = None

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def value(self) -> np.ndarray:
        return self.host.numpy()


def split_total(splits: Sequence[int] | torch.Tensor | None, tensor: torch.Tensor) -> int:
    """Rows moved by an ``all_to_all_single`` side: the split sizes (a list, or a tensor
    summed by torch rather than a Python loop), else all rows."""
    if splits is None:
        return int(tensor.shape[0]) if tensor.dim() else int(tensor.numel())
    if isinstance(splits, torch.Tensor):
        return int(splits.sum())
    return int(sum(splits))


def routed_rows(tensor: torch.Tensor) -> int | HostCopy:
    """Token rows that carry data in a GShard/Switch capacity slab (``[E, C, M]``: every
    expert gets C slots per source and unused slots are zero). A token is one vector
    along the last dim. On a GPU the count stays on the device until the flusher reads
    it (no sync on the engine's thread)."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.reshape(1, 1)
    used = torch.count_nonzero(flat.abs().amax(dim=1))
    return HostCopy(used) if used.is_cuda else int(used)


class SmClock:
    """SM clock in Hz for turning DeepEP's ``clock64()`` wait cycles into seconds.

    Asked on the flusher thread only: ``EPWATCH_SM_CLOCK_HZ`` or the argument if given,
    else the current clock from NVML through torch, else the device's rated clock.
    Re-read every 10 s so a throttled GPU is converted at the clock it ran at.
    """

    def __init__(self, device: int | None = None, fixed_hz: float | None = None) -> None:
        # The probe's own parser: a malformed EPWATCH_SM_CLOCK_HZ is a warning there,
        # never an exception in the engine.
        self.fixed_hz = fixed_hz or HookConfig.from_env().sm_clock_hz
        self.device = device
        self._hz: float | None = None
        self._read_at = 0.0

    def hz(self) -> float:
        if self.fixed_hz:
            return self.fixed_hz
        now = time.monotonic()
        if self._hz is None or now - self._read_at > 10.0:
            self._hz = self._query()
            self._read_at = now
        return self._hz

    def _query(self) -> float:
        device = torch.cuda.current_device() if self.device is None else self.device
        try:
            mhz = torch.cuda.clock_rate(device)
            if mhz and mhz > 0:
                return float(mhz) * 1e6
        except Exception:
            pass
        khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0)
        if not khz:
            raise RuntimeError("SM clock unknown; set EPWATCH_SM_CLOCK_HZ")
        return float(khz) * 1e3


def cycles_to_seconds(before: np.ndarray, after: np.ndarray, hz: float) -> np.ndarray:
    """Per-source-rank wait of one call from two snapshots of a cumulative counter."""
    delta = after.astype(np.float64) - before.astype(np.float64)
    return np.maximum(delta, 0.0) / hz
