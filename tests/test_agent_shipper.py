"""Reconnect backoff: exponential, capped, jittered."""

from __future__ import annotations

import random

from agent.shipper import backoff_delay


def test_backoff_grows_caps_and_jitters() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        full = min(5.0, 0.1 * 2**attempt)
        d = backoff_delay(attempt, 0.1, 5.0, rng)
        assert full / 2 <= d <= full
    spread = {round(backoff_delay(10, 0.1, 5.0, rng), 3) for _ in range(50)}
    assert len(spread) > 10  # agents do not reconnect in lockstep
