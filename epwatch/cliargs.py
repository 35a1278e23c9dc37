"""What every command shares: argument types (HOST:PORT, positive numbers), the
log-level flag, running until SIGTERM or SIGINT, and free loopback ports for tests
and benchmarks."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

from epwatch.webconfig import WebConfigError, WebSecurity, load_web_config

N = TypeVar("N", int, float)


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); an argparse type."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def hostport_text(value: str) -> str:
    """An argparse type that checks ``HOST:PORT`` and keeps the text (gRPC targets)."""
    parse_hostport(value)
    return value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def positive(kind: type[N]) -> Callable[[str], N]:
    """An argparse type for a number that must be > 0 (0 would spin, or refuse all)."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmg]i?)?b?\s*", re.IGNORECASE)
_UNITS = {
    None: 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
}


def byte_size(text: str) -> int:
    """An argparse type for a byte count: ``1048576``, ``64MiB``, ``1GiB``, ``500M``."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected a byte count like 1048576 or 64MiB, got {text!r}"
        )
    unit = m.group(2).lower() if m.group(2) else None
    value = int(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level_argument(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging level (default %(default)s)",
    )


def setup_logging(level: str) -> None:
    """Log lines with time, level and the module that speaks, to stderr."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets: a daemon's main thread waits on it.

    The handler runs in the main thread and only sets the event, so nothing polls and
    the shutdown itself happens in ordinary code after ``wait()`` returns.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a daemon with many clients
    must not run out of descriptors at a distribution's default 1024); the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logging.getLogger(__name__).warning("cannot raise RLIMIT_NOFILE: %s", exc)
    return soft


def load_web_config_flag(path: str | None, command: str) -> WebSecurity | None:
    """``--web-config FILE`` of ``epwatch <command>``: its settings, or exit saying
    what is wrong with the file."""
    if not path:
        return None
    try:
        return load_web_config(path)
    except WebConfigError as err:
        raise SystemExit(f"epwatch {command}: --web-config: {err}") from None
