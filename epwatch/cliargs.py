"""Argument types shared by every command (HOST:PORT, positive numbers), and free
loopback ports for tests and benchmarks."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from typing import TypeVar

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
