"""With no agent listening, the instrumented model runs like the bare one and drops
(and counts) its records instead of blocking or raising.

The loop is the miniature MoE of ``tests/moe_worker.py`` on a one-rank gloo group (real
count exchange, dispatch and combine collectives), without its modelled kernel sleeps
so that the probe's share of a layer is as large as it can be. The timing check is a
guard against blocking (a connect or send per call would cost milliseconds), not a
benchmark: see bench/hook_overhead.py for the figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from epwatch.cliargs import free_port
from epwatch.hooks import flusher_of, get_probe, shutdown
from epwatch.hooks.torch_a2a import EPAllToAll
from tests.moe_worker import BareA2A, MoE, Scenario, run_steps


@pytest.fixture
def one_rank() -> Iterator[None]:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()
    shutdown()


def test_instrumented_loop_keeps_bare_speed_and_counts_drops(
    one_rank: None, tmp_path: Path
) -> None:
    sock = str(tmp_path / "nobody-listens.sock")
    probe = get_probe(
        "noagent", 0, 1, socket_path=sock, buffer_records=64, reconnect_interval_s=0.5
    )
    sc = Scenario(group="noagent", steps=15, layers=4, cost_per_slot_s=0.0)
    model = MoE(0, 1, sc.layers)
    loops = {"bare": BareA2A(), "hooked": EPAllToAll(probe=probe)}
    times: dict[str, list[float]] = {k: [] for k in loops}
    run_steps(model, sc, loops["bare"])  # warm-up
    start = time.monotonic()
    for r in range(8):
        for name in list(loops) if r % 2 else reversed(list(loops)):
            t0 = time.perf_counter()
            run_steps(model, sc, loops[name], first_step=r * sc.steps)
            times[name].append(time.perf_counter() - t0)
    elapsed = time.monotonic() - start
    bare, hooked = statistics.median(times["bare"]), statistics.median(times["hooked"])
    assert hooked <= 1.3 * bare + 0.005, f"bare {bare * 1e3:.1f} ms, hooked {hooked * 1e3:.1f} ms"
    time.sleep(0.3)  # a flusher tick
    recorded = 8 * sc.steps * sc.layers * 2
    assert probe.records_dropped >= recorded - 2 * 64
    assert probe.internal_errors == 0
    attempts = flusher_of(probe).transport.connect_attempts  # type: ignore[union-attr]
    assert 1 <= attempts <= elapsed / 0.5 + 2
