"""Fixtures shared by the tests (helpers to call are in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epwatch.cliargs import free_port
from epwatch.collector.service import CollectorService
from tests.helpers import start_collector


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def collector() -> Iterator[CollectorService]:
    """An in-process collector without estimators or /metrics, on a free gRPC port."""
    svc = start_collector()
    yield svc
    svc.stop(grace_s=0.2)
