"""One rank of a stack of fairscale ``MOELayer`` + ``Top2Gate`` layers on gloo,
instrumented as docs/hooks.md says for a third-party layer: its module-level
``torch.distributed`` is replaced by a proxy whose ``all_to_all_single`` runs inside
the probe's spans (dispatch and combine alternate; received tokens are the rows the
gate really filled, not the capacity padding).

Same command line and plan as ``tests/moe_worker.py`` (``group``, ``steps``,
``layers``, ``fault_step``, ``slow_rank``/``slow_factor``/``slow_mode``,
``hot_rank``/``hot_bias``). Expert compute is real CPU work, nothing is slept: what
four ranks on two shared cores really do. A slow rank busy-spins (``slow_mode``
"spin", ``tests.moe_worker.Slow``) ``slow_factor - 1`` times its expert's own time
more; a hot expert gets ``hot_bias`` added to its gate logit. Needs fairscale
(``pip install --no-deps fairscale``).
"""

from __future__ import annotations

import json
import time
import types
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks import COMBINE, DISPATCH, get_probe
from epwatch.hooks.torch_a2a import A2ASpan
from tests.moe_worker import Scenario, Slow, announce_done, fault_steps, join_gloo, stay_up

D_MODEL = 64
TOKENS = 256  # per rank


class ProbedDist(types.ModuleType):
    """``torch.distributed`` for fairscale.nn.moe.moe_layer, with the probe around
    its all-to-alls."""

    def __init__(self, probe: Any) -> None:
        super().__init__("probed_dist")
        self.probe = probe
        self.step = self.layer = 0
        self.calls = 0  # even: dispatch, odd: combine

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def all_to_all_single(self, output: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        phase = DISPATCH if self.calls % 2 == 0 else COMBINE
        self.calls += 1
        with A2ASpan(self.probe, self.step, self.layer, phase) as span:
            work = dist.all_to_all_single(output, input, *args, **kwargs)
            rows = output.reshape(-1, output.shape[-1])
            filled = int((rows.abs().sum(-1) != 0).sum()) if phase == DISPATCH else None
            span.add(output, input, None, None, recv_tokens=filled)
        return work


def expert_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D_MODEL, 4 * D_MODEL), torch.nn.ReLU(),
        torch.nn.Linear(4 * D_MODEL, D_MODEL),
    )  # fmt: skip


def build(rank: int, world: int, layers: int, sc: Scenario) -> tuple[list[Any], list[Slow]]:
    from fairscale.nn.moe import MOELayer, Top2Gate

    moes, experts = [], []
    for layer in range(layers):
        torch.manual_seed(1000 + layer)  # the same gate on every rank
        gate = Top2Gate(D_MODEL, world)
        if sc.hot_rank is not None:
            wg = torch.nn.Linear(D_MODEL, world, bias=True)
            with torch.no_grad():
                wg.weight.copy_(gate.wg.weight)
                wg.bias.zero_()
            gate.wg = wg
        expert = expert_mlp(seed=100 * layer + rank)
        moes.append(MOELayer(gate, expert))
        experts.append(Slow(expert, sc.slow_mode))
    return moes, experts


def start_fault(sc: Scenario, rank: int, experts: list[Slow], moes: list[Any]) -> None:
    """The slow rank's experts take longer; the hot expert's gate logit rises."""
    for slow in experts:
        slow.extra = sc.slow_factor - 1 if sc.slow_rank == rank else 0.0
    for m in moes if sc.hot_rank is not None else []:
        m.gate.wg.bias[sc.hot_rank] = sc.hot_bias


def main() -> int:
    args = join_gloo()
    import fairscale.nn.moe.moe_layer as moe_layer

    for sc in (Scenario(**s) for s in json.loads(args.plan)):
        probe = get_probe(sc.group, args.rank, args.world_size, args.rank, socket_path=args.socket)
        proxy = ProbedDist(probe)
        moe_layer.dist = proxy
        moes, experts = build(args.rank, args.world_size, sc.layers, sc)

        dist.barrier()
        print(f"START {sc.group} {time.monotonic():.3f}", flush=True)
        with torch.no_grad():
            for step in fault_steps(
                sc, args.rank, partial(start_fault, sc, args.rank, experts, moes)
            ):
                g = torch.Generator().manual_seed(step * 1000 + args.rank)
                x = torch.randn(TOKENS // 8, 8, D_MODEL, generator=g)
                proxy.step = step
                for layer, moe in enumerate(moes):
                    proxy.layer = layer
                    x = torch.layer_norm(x + moe(x), (D_MODEL,))
        announce_done(sc, probe)
    stay_up()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
