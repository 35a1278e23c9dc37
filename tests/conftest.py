"""Fixtures shared by the tests (helpers to call are in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from epwatch.cliargs import free_port
from epwatch.collector.service import CollectorService
from tests.helpers import start_collector
from tests.hook_sink import FrameSink


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def collector() -> Iterator[CollectorService]:
    """An in-process collector without estimators or /metrics, on a free gRPC port."""
    svc = start_collector()
    yield svc
    svc.stop(grace_s=0.2)


@pytest.fixture(scope="module")
def gloo() -> Iterator[None]:
    """A one-rank gloo group: real collectives, in this process."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.fixture
def hook_sink(tmp_path: Path) -> Iterator[FrameSink]:
    """A stand-in agent socket; the hooks' probes and flushers go when it does."""
    from epwatch.hooks import shutdown

    with FrameSink(str(tmp_path / "agent.sock")) as s:
        yield s
    shutdown()


@pytest.fixture
def sink(hook_sink: FrameSink) -> FrameSink:
    """The same stand-in agent socket, under the name the hook tests use."""
    return hook_sink
