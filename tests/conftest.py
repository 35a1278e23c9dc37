"""Shared test helpers: free loopback ports, /metrics scraping, synthetic records."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epwatch.cliargs import free_port
from epwatch.schema import RecordColumns


@pytest.fixture
def port() -> int:
    return free_port()


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label items: value} of every sample called ``name`` in exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    """The one sample ``name`` whose labels include ``labels``; None if absent."""
    found = [v for k, v in samples(text, name).items() if labels.items() <= dict(k).items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def make_records(
    n: int, world_size: int = 16, step0: int = 0, ranks: np.ndarray | None = None
) -> RecordColumns:
    """``n`` valid records: ranks cycle, one dispatch per (step, rank)."""
    rank = np.arange(n) % world_size if ranks is None else np.resize(ranks, n)
    step = step0 + np.arange(n) // world_size
    enter = 1_000_000 + step * 1_000_000
    return RecordColumns.from_arrays(
        rank=rank,
        local_device=rank % 8,
        step=step,
        layer=np.zeros(n),
        phase=np.zeros(n),
        enter_ns=enter,
        exit_ns=enter + 50_000,
        send_bytes=np.full(n, 1 << 20),
        recv_bytes=np.full(n, 1 << 20),
        recv_tokens=np.full(n, 128),
    )
