"""One rank of a stack of DeepSpeed ``AutoEPMoELayer`` layers (dropless: a count
exchange, then the payload with split sizes, then the combine) on gloo, instrumented
with the one line docs/hooks.md gives for a library that calls the collective itself:
``patch_all_to_all(dist, aliases=[deepspeed.comm], layers_per_step=L)``.

Same command line and plan as ``tests/moe_worker.py`` (``group``, ``steps``,
``layers``, ``fault_step``, ``slow_rank``/``slow_factor``/``slow_mode``,
``hot_rank``/``hot_bias``), for ``tests/gloo_recordings.py``. Expert compute is real
CPU work: a slow rank busy-spins (``slow_mode = "spin"``) or sleeps ``slow_factor - 1``
times its grouped experts' own time more; a hot expert gets ``hot_bias`` added to its
router logit at onset.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

from epwatch.hooks import get_probe
from epwatch.hooks.patch import patch_all_to_all
from tests.deepspeed_patch_worker import TOKENS, autoep_layer, init_deepspeed
from tests.moe_worker import Scenario, Slow, announce_done, fault_steps, join_gloo, stay_up

# Wider than the patch test's layers: expert compute of a few milliseconds, so that a
# slow rank's extra time stands out of four processes' scheduling on two cores.
D_MODEL, FFN = 128, 512


def start_fault(sc: Scenario, rank: int, slowed: list[Slow], layers: list[Any]) -> None:
    """The slow rank's experts take longer; the hot expert's router logit rises."""
    for slow in slowed:
        slow.extra = sc.slow_factor - 1 if sc.slow_rank == rank else 0.0
    for moe in layers if sc.hot_rank is not None else []:
        moe.router.gate.bias[sc.hot_rank] = sc.hot_bias


def main() -> int:
    args = join_gloo()
    init_deepspeed(args.rank, args.world_size, args.port)
    import deepspeed.comm

    for sc in (Scenario(**s) for s in json.loads(args.plan)):
        probe = get_probe(sc.group, args.rank, args.world_size, args.rank, socket_path=args.socket)
        patch = patch_all_to_all(
            dist, aliases=[deepspeed.comm], layers_per_step=sc.layers, probe=probe
        )
        hot = sc.hot_rank  # one expert per rank: the hot expert is that rank's
        layers = [
            autoep_layer(i, args.rank, args.world_size, hot, 0.0, D_MODEL, FFN)
            for i in range(sc.layers)
        ]
        slowed = [Slow(moe.experts, sc.slow_mode) for moe in layers]

        dist.barrier()
        print(f"START {sc.group} {time.monotonic():.3f}", flush=True)
        with torch.no_grad():
            for step in fault_steps(
                sc, args.rank, partial(start_fault, sc, args.rank, slowed, layers)
            ):
                g = torch.Generator().manual_seed(step * 1000 + args.rank)
                x = torch.randn(TOKENS // 8, 8, D_MODEL, generator=g)
                for moe in layers:
                    out = moe(x)
                    x = torch.layer_norm(x + (out[0] if isinstance(out, tuple) else out),
                                         (D_MODEL,))  # fmt: skip
        patch.unpatch()
        announce_done(sc, probe)
    stay_up()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
