"""One rank of a stack of fairscale ``MOELayer`` + ``Top2Gate`` layers on gloo,
instrumented as docs/hooks.md says for a third-party layer: its module-level
``torch.distributed`` is replaced by a proxy whose ``all_to_all_single`` runs inside
the probe's spans (dispatch and combine alternate; received tokens are the rows the
gate really filled, not the capacity padding).

Same command line and plan as ``tests/moe_worker.py`` (``group``, ``steps``,
``layers``, ``fault_step``, ``slow_rank``/``slow_factor``/``slow_mode``,
``hot_rank``/``hot_bias``). Expert compute is real CPU work, nothing is slept: what
four ranks on two shared cores really do. A slow rank busy-spins ``slow_factor - 1``
times its expert's own time more; a hot expert gets ``hot_bias`` added to its gate
logit. Needs fairscale (``pip install --no-deps fairscale``).
"""

from __future__ import annotations

import json
import time
import types
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks import COMBINE, DISPATCH, get_probe
from epwatch.hooks.torch_a2a import A2ASpan
from tests.moe_worker import Scenario, announce_done, join_gloo, stay_up

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


class SlowExpert(torch.nn.Module):
    """The expert MLP; on the slow rank, after onset, it spins a fraction longer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(D_MODEL, 4 * D_MODEL), torch.nn.ReLU(),
            torch.nn.Linear(4 * D_MODEL, D_MODEL),
        )  # fmt: skip
        self.extra = 0.0  # slow_factor - 1 while slow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.mlp(x)
        if self.extra > 0:
            end = time.perf_counter() + (time.perf_counter() - t0) * self.extra
            while time.perf_counter() < end:
                pass
        return y


def build(rank: int, world: int, layers: int, sc: Scenario) -> tuple[list[Any], list[SlowExpert]]:
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
        expert = SlowExpert(seed=100 * layer + rank)
        moes.append(MOELayer(gate, expert))
        experts.append(expert)
    return moes, experts


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
            for step in range(sc.steps):
                if step == sc.fault_step and sc.fault_step > 0 and args.rank == 0:
                    print(f"ONSET {sc.group} {step} {time.monotonic():.3f}", flush=True)
                if step == sc.fault_step:
                    for e in experts:
                        e.extra = sc.slow_factor - 1 if sc.slow_rank == args.rank else 0.0
                    for m in moes if sc.hot_rank is not None else []:
                        m.gate.wg.bias[sc.hot_rank] = sc.hot_bias
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
