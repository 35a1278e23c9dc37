"""Probes and flushers of this process: created once, shared, shut down at exit.

An engine asks for its probe wherever it is convenient (model setup, the all-to-all
manager, a DeepEP wrapper); asking twice for the same (ep_group, rank, socket)
returns the same probe. Bad or missing settings give a :class:`NullProbe` and a
warning, never an exception: observability must not stop a model from serving.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from epwatch.hooks.clock import make_clock
from epwatch.hooks.config import HookConfig
from epwatch.hooks.flusher import Flusher
from epwatch.hooks.probe import NullProbe, Probe

log = logging.getLogger("epwatch.hooks")

_lock = threading.Lock()
_probes: dict[tuple[str, int, str], Probe] = {}
_flushers: dict[str, Flusher] = {}


def get_probe(
    ep_group: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    local_device: int | None = None,
    *,
    config: HookConfig | None = None,
    **settings: Any,
) -> Probe | NullProbe:
    """This rank's probe. Arguments override ``EPWATCH_*`` variables; ``settings`` are
    other :class:`HookConfig` fields (``socket_path``, ``buffer_records``, ...)."""
    try:
        cfg = config or HookConfig.from_env(
            ep_group=ep_group,
            rank=rank,
            world_size=world_size,
            local_device=local_device,
            **settings,
        )
        for problem in cfg.problems:
            log.warning("epwatch hooks: %s", problem)
        if cfg.disabled:
            return NullProbe("disabled by EPWATCH_DISABLE")
        if cfg.rank is None or cfg.world_size is None:
            log.warning(
                "epwatch hooks: rank or world size unknown (set EPWATCH_RANK and "
                "EPWATCH_WORLD_SIZE); probe disabled"
            )
            return NullProbe("rank or world size unknown")
        return _probe(cfg)
    except Exception as e:
        log.warning("epwatch hooks: probe disabled: %s", e, exc_info=True)
        return NullProbe(f"setup failed: {e}")


def _probe(cfg: HookConfig) -> Probe:
    key = (cfg.ep_group, int(cfg.rank or 0), cfg.socket_path)
    with _lock:
        probe = _probes.get(key)
        if probe is not None:
            return probe
        probe = Probe(
            ep_group=cfg.ep_group,
            rank=int(cfg.rank or 0),
            world_size=int(cfg.world_size or 0),
            local_device=cfg.local_device,
            clock=make_clock(cfg.clock, cfg.local_device),
            buffer_records=cfg.buffer_records,
            peer_sample_steps=cfg.peer_sample_steps,
        )
        flusher = _flushers.get(cfg.socket_path)
        if flusher is None:
            flusher = Flusher(
                cfg.socket_path,
                flush_interval_s=cfg.flush_interval_s,
                heartbeat_interval_s=cfg.heartbeat_interval_s,
                reconnect_interval_s=cfg.reconnect_interval_s,
                send_timeout_s=cfg.send_timeout_s,
            )
            _flushers[cfg.socket_path] = flusher
        flusher.add(probe, cfg.buffer_records)
        flusher.start()
        _probes[key] = probe
        return probe


def flusher_of(probe: Probe | NullProbe) -> Flusher | None:
    """The flusher shipping ``probe`` (for its transport counters), if any."""
    with _lock:
        for flusher in _flushers.values():
            if any(p is probe for p in flusher.probes):
                return flusher
    return None


def shutdown(timeout: float = 1.0) -> None:
    """Flush and stop every flusher, forget every probe (at exit, and in tests)."""
    with _lock:
        flushers = list(_flushers.values())
        _flushers.clear()
        _probes.clear()
    for flusher in flushers:
        flusher.close(timeout)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for flusher in _flushers.values():
        flusher.after_fork_in_child()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
