"""Probe configuration from arguments, else ``EPWATCH_*`` environment variables.

An engine is usually launched by a script the operator controls, not by code they can
edit, so every setting has an environment variable; explicit arguments win. Parsing
never raises: a malformed variable falls back to its default and is reported in
``HookConfig.problems`` so a typo cannot take the engine down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from epwatch.frames import default_socket_path

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
CLOCKS = ("auto", "host", "cuda")


@dataclass(frozen=True)
class HookConfig:
    """Everything a :class:`~epwatch.hooks.probe.Probe` needs besides its identity."""

    socket_path: str
    ep_group: str = "default"
    rank: int | None = None
    world_size: int | None = None
    local_device: int = -1
    disabled: bool = False
    buffer_records: int = 65536
    flush_interval_s: float = 0.1
    heartbeat_interval_s: float = 0.2
    reconnect_interval_s: float = 1.0
    send_timeout_s: float = 1.0
    peer_sample_steps: int = 16
    clock: str = "auto"
    sm_clock_hz: float | None = None
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> HookConfig:
        """Read ``EPWATCH_*``; keyword arguments that are not None override them."""
        env = os.environ if env is None else env
        problems: list[str] = []
        reader = _Reader(env, problems)
        values: dict[str, object] = {
            "socket_path": default_socket_path(env),
            "ep_group": env.get("EPWATCH_EP_GROUP") or "default",
            "rank": reader.int_or_none("EPWATCH_RANK", minimum=0),
            "world_size": reader.int_or_none("EPWATCH_WORLD_SIZE", minimum=1),
            "local_device": _local_device(reader),
            "disabled": env.get("EPWATCH_DISABLE", "").strip().lower() in TRUE_WORDS,
            "buffer_records": reader.integer("EPWATCH_BUFFER_RECORDS", 65536, minimum=1),
            "flush_interval_s": reader.ms("EPWATCH_FLUSH_INTERVAL_MS", 100),
            "heartbeat_interval_s": reader.ms("EPWATCH_HEARTBEAT_INTERVAL_MS", 200),
            "reconnect_interval_s": reader.ms("EPWATCH_RECONNECT_INTERVAL_MS", 1000),
            "send_timeout_s": reader.ms("EPWATCH_SEND_TIMEOUT_MS", 1000),
            "peer_sample_steps": reader.integer("EPWATCH_PEER_SAMPLE_STEPS", 16, minimum=0),
            "clock": reader.choice("EPWATCH_CLOCK", CLOCKS, "auto"),
            "sm_clock_hz": reader.float_or_none("EPWATCH_SM_CLOCK_HZ"),
        }
        for key, value in overrides.items():
            if key not in values:
                raise TypeError(f"unknown hook setting {key!r}")
            if value is not None:
                values[key] = value
        return cls(**values, problems=tuple(problems))  # type: ignore[arg-type]


def _local_device(reader: _Reader) -> int:
    dev = reader.int_or_none("EPWATCH_LOCAL_DEVICE", minimum=0)
    if dev is None:
        dev = reader.int_or_none("LOCAL_RANK", minimum=0)
    return -1 if dev is None else dev


class _Reader:
    """Typed reads of environment variables that record problems instead of raising."""

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env = env
        self.problems = problems

    def _raw(self, name: str) -> str | None:
        raw = self.env.get(name)
        return raw.strip() if raw and raw.strip() else None

    def int_or_none(self, name: str, minimum: int) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not an integer; ignored")
            return None
        if value < minimum:
            self.problems.append(f"{name}={value} is below {minimum}; ignored")
            return None
        return value

    def integer(self, name: str, default: int, minimum: int) -> int:
        value = self.int_or_none(name, minimum)
        return default if value is None else value

    def float_or_none(self, name: str) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            self.problems.append(f"{name}={raw!r} is not a positive number; ignored")
            return None
        return value

    def ms(self, name: str, default_ms: float) -> float:
        value = self.float_or_none(name)
        return (default_ms if value is None else value) / 1000.0

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() not in allowed:
            self.problems.append(f"{name}={raw!r} is not one of {', '.join(allowed)}; ignored")
            return default
        return raw.lower()
