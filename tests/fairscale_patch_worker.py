"""One rank of fairscale's GShard ``MOELayer`` + ``Top2Gate`` on gloo, instrumented with
the one-line patch and nothing else in the model code.

Run as ``python -m tests.fairscale_patch_worker --rank R --world-size P --port N --steps S
--layers L [--hot-rank H --hot-bias B]``; ``EPWATCH_AGENT_SOCKET`` and
``EPWATCH_EP_GROUP`` say where the records go. Each rank owns one expert per layer;
``--hot-rank`` adds a logit bias to that rank's expert in every gate, so tokens pile up
there and fairscale's capacity (2 S / E slots per source and expert) drops the excess.

fairscale's gate does not say what it dropped, so the worker counts it as an engine
would: the pre-capacity top-1 and top-2 choices (the two expert masks ``top2gating``
builds with ``one_hot``) minus the kept slots of the dispatch mask, summed over ranks
with an ``all_reduce``, and reported with ``patch.add_dropped``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks.patch import AllToAllPatch, patch_all_to_all
from tests.patched_ranks import finish_worker, worker_arguments

D_MODEL = 32
TOKENS = 256  # per rank and step: capacity = 2 * 256 / P slots per source and expert


class DemandCounter:
    """Pre-capacity token-expert choices per expert of the current ``top2gating`` call."""

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.masks: list[torch.Tensor] = []

    def install(self) -> None:
        from fairscale.nn.moe import top2gate

        one_hot = top2gate.one_hot

        def counting(tensor: torch.Tensor, num_classes: int) -> torch.Tensor:
            out = one_hot(tensor, num_classes)
            if len(self.masks) < 2 and num_classes == self.experts:
                self.masks.append(out.sum(dim=0))  # before top2gating masks it in place
            return out

        top2gate.one_hot = counting

    def take(self) -> torch.Tensor:
        demand = sum(self.masks, torch.zeros(self.experts, dtype=torch.int64))
        self.masks.clear()
        return demand


def dropped_reporter(counter: DemandCounter, patch: AllToAllPatch, rank: int) -> Any:
    """A forward hook on the gate: slots routed to this rank's expert that capacity
    dropped, from every rank's gate."""

    def hook(module: Any, inputs: Any, outputs: Any) -> None:
        kept = outputs[2].sum(dim=(0, 2)).to(torch.int64)  # dispatch mask [S, E, C]
        dropped = counter.take() - kept
        dist.all_reduce(dropped)
        patch.add_dropped(int(dropped[rank]))

    return hook


def main() -> int:
    args = worker_arguments(steps=40, hot_bias=2.0)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
        world_size=args.world_size, timeout=timedelta(seconds=120),
    )  # fmt: skip
    from fairscale.nn.moe import MOELayer, Top2Gate

    patch = patch_all_to_all(dist, layers_per_step=args.layers)  # the one line
    counter = DemandCounter(args.world_size)
    counter.install()
    layers = []
    for layer in range(args.layers):
        torch.manual_seed(1000 + layer)  # the same gate on every rank
        gate = Top2Gate(D_MODEL, args.world_size)
        if args.hot_rank is not None:
            gate.wg = torch.nn.Linear(D_MODEL, args.world_size, bias=True)
            with torch.no_grad():
                gate.wg.bias.zero_()
                gate.wg.bias[args.hot_rank] = args.hot_bias
        gate.register_forward_hook(dropped_reporter(counter, patch, args.rank))
        torch.manual_seed(2000 + 10 * layer + args.rank)  # this rank's expert
        expert = torch.nn.Sequential(
            torch.nn.Linear(D_MODEL, 2 * D_MODEL),
            torch.nn.ReLU(),
            torch.nn.Linear(2 * D_MODEL, D_MODEL),
        )
        layers.append(MOELayer(gate, expert))
    torch.manual_seed(args.rank)
    with torch.no_grad():
        for _ in range(args.steps):
            x = torch.randn(TOKENS // 8, 8, D_MODEL)
            for moe in layers:
                x = moe(x)
    finish_worker(patch, args.rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
