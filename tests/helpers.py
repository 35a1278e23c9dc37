"""What many tests share: waiting for a condition, a collector in-process, its client
stub, /metrics scraping and synthetic records. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from epwatch.collector.groups import EstimatorFactory, NullEstimator
from epwatch.collector.service import CollectorConfig, CollectorService
from epwatch.protos import epwatch_pb2 as pb
from epwatch.protos import epwatch_pb2_grpc as pb_grpc
from epwatch.schema import PeerRows, RecordColumns


def wait_for(
    cond: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "the condition",
    detail: Callable[[], str] | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``cond`` until it holds; fail after ``timeout`` seconds saying ``what`` (and
    ``detail()``, e.g. a process's last lines). An OSError counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            extra = detail() if detail is not None else ""
            suffix = f":\n{extra}" if extra else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{suffix}")
        time.sleep(interval)


def start_collector(
    estimators: EstimatorFactory | None = NullEstimator,
    metrics: bool = False,
    **config: object,
) -> CollectorService:
    """A started in-process collector on free loopback ports. ``estimators=None`` runs
    the real estimators; ``metrics`` serves /metrics (its port: ``metrics_port``)."""
    listen = ("127.0.0.1", 0) if metrics else None
    svc = CollectorService(
        CollectorConfig(grpc_listen="127.0.0.1:0", metrics_listen=listen, **config),  # type: ignore[arg-type]
        estimator_factory=estimators,
    )
    svc.start()
    return svc


def stub(channel: grpc.Channel) -> pb_grpc.CollectorStub:
    """The generated client: what an agent uses for well-formed messages."""
    return pb_grpc.CollectorStub(channel)


def raw_push(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """Push taking raw bytes, for messages the generated stub could not even build."""
    return channel.unary_unary(
        "/epwatch.v1.Collector/Push", response_deserializer=pb.Ack.FromString
    )


def raw_stream(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """Stream taking raw bytes (garbage included), as :func:`raw_push`."""
    return channel.stream_stream(
        "/epwatch.v1.Collector/Stream", response_deserializer=pb.Ack.FromString
    )


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def get_json(port: int, path: str) -> tuple[int, dict]:
    """GET a JSON document from 127.0.0.1 (status and body, errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


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


def make_peer_rows(
    rows: int, world_size: int, step: int | np.ndarray = 0, wait_s: float = 0.001
) -> PeerRows:
    """``rows`` per-peer wait rows (ranks cycle, layer 0, dispatch) of ``step``."""
    return PeerRows(
        rank=np.arange(rows, dtype=np.int32) % world_size,
        step=np.broadcast_to(np.asarray(step, np.int64), (rows,)).copy(),
        layer=np.zeros(rows, np.int32),
        phase=np.zeros(rows, np.uint8),
        wait_s=np.full((rows, world_size), wait_s),
        send_bytes=np.empty((rows, 0), np.int64),
    )


class Proc:
    """An ``epwatch`` subprocess with its output in a file (shown when a test fails)."""

    def __init__(
        self, workdir: Path, name: str, *args: str, preexec: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "epwatch.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=preexec,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]
