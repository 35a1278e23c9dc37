"""One rank of a miniature expert-parallel MoE model on gloo, instrumented with the hooks.

Each layer runs the rank's own "attention" (a real tiny matmul plus a modelled
``attn_cost_per_token_s`` per token of the rank's batch), routes every token to its
top-2 of ``2 * world_size`` experts (two per rank), dispatches the token-expert slots
with a count exchange and an uneven ``all_to_all_single`` (dropless: the splits
follow the router), runs the rank's expert MLPs, and combines the results back with
the reverse all-to-all. Expert compute is a real (tiny) MLP plus a modelled kernel
time of ``cost_per_slot_s`` per received slot, slept rather than spun, so that four
ranks on two cores keep steady, comparable timings. From step ``fault_step`` on: a
"slow GPU" multiplies its attention and expert time by ``slow_factor`` (the extra
time busy-spun with ``slow_mode="spin"``, as a slower device would spend it), a "hot
expert" biases the router towards one rank's experts, and a "batch imbalance" gives
one rank ``batch_factor`` times the tokens.

Run as ``python -m tests.moe_worker --rank R --world-size P --port N --plan JSON``;
the plan is a list of scenarios run in order, each as its own EP group:
``{"group": "moe-slow", "steps": 200, "layers": 4, "slow_rank": 2, "slow_factor": 1.3,
"hot_rank": null, "hang_rank": null, "hang_step": null}``. A hanging rank prints
``HANG <step> <layer>`` and sleeps before entering that dispatch; rank 0 prints
``ONSET <group> <step> <time>`` when a fault starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from epwatch.hooks import COMBINE, DISPATCH, get_probe
from epwatch.hooks.torch_a2a import EPAllToAll

HIDDEN = 32
TOKENS = 48
TOP_K = 2
EXPERTS_PER_RANK = 2


@dataclass
class Scenario:
    group: str
    steps: int = 200
    layers: int = 4
    cost_per_slot_s: float = 100e-6
    attn_cost_per_token_s: float = 20e-6
    fault_step: int = 0  # the slow GPU, hot expert or batch imbalance starts here
    slow_rank: int | None = None
    slow_factor: float = 1.0
    slow_mode: str = "sleep"  # or "spin": busy-wait the extra time
    hot_rank: int | None = None
    hot_bias: float = 1.2
    batch_rank: int | None = None
    batch_factor: float = 1.0
    hang_rank: int | None = None
    hang_step: int | None = None
    hang_layer: int = 1


class BareSpan:
    """The uninstrumented twin of :class:`epwatch.hooks.torch_a2a.A2ASpan`."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
        *,
        count: bool = True,
    ) -> None:
        dist.all_to_all_single(
            output, input, output_split_sizes, input_split_sizes, group=self.group
        )


class BareA2A:
    @contextmanager
    def span(
        self, phase: int, step: int | None = None, layer: int | None = None
    ) -> Iterator[BareSpan]:
        yield BareSpan()


class MoE:
    """Weights shared by every rank (same seed); each rank owns two experts."""

    def __init__(self, rank: int, world_size: int, layers: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rank, self.P = rank, world_size
        n_exp = EXPERTS_PER_RANK * world_size
        # Unit-norm router columns: every expert is equally likely in expectation, so no
        # rank is lighter by construction (a light rank's fixed per-layer overhead would
        # spread over fewer tokens and read as a slower per-token cost).
        self.router = [
            torch.nn.functional.normalize(torch.randn(HIDDEN, n_exp, generator=g), dim=0) * 0.6
            for _ in range(layers)
        ]
        self.w1 = [torch.randn(n_exp, HIDDEN, 2 * HIDDEN, generator=g) * 0.2 for _ in range(layers)]
        self.w2 = [torch.randn(n_exp, 2 * HIDDEN, HIDDEN, generator=g) * 0.2 for _ in range(layers)]
        self.attn = [torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2 for _ in range(layers)]

    def layer(self, x: torch.Tensor, layer: int, step: int, sc: Scenario, a2a: Any) -> torch.Tensor:
        P = self.P
        faulty = step >= sc.fault_step
        x = self.attention(x, layer, sc, faulty)
        logits = x @ self.router[layer]
        if sc.hot_rank is not None and faulty:  # a hot expert: the router favours one pair
            logits[:, sc.hot_rank * EXPERTS_PER_RANK] += sc.hot_bias
        weights, experts = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)
        flat_expert = experts.reshape(-1)
        flat_token = torch.arange(x.shape[0]).repeat_interleave(TOP_K)
        dest = flat_expert // EXPERTS_PER_RANK
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=P)
        payload = torch.cat(
            [x[flat_token[order]], (flat_expert[order] % EXPERTS_PER_RANK).unsqueeze(1).float()],
            dim=1,
        )
        recv_counts = torch.empty_like(send_counts)
        with a2a.span(DISPATCH, step=step, layer=layer) as span:
            span.all_to_all_single(recv_counts, send_counts, count=False)
            recv = torch.empty(int(recv_counts.sum()), HIDDEN + 1)
            span.all_to_all_single(recv, payload, recv_counts.tolist(), send_counts.tolist())
        out = self.experts(recv, layer, sc, faulty)
        back = torch.empty(payload.shape[0], HIDDEN)
        with a2a.span(COMBINE, step=step, layer=layer) as span:
            span.all_to_all_single(back, out, send_counts.tolist(), recv_counts.tolist())
        y = torch.zeros_like(x)
        y.index_add_(0, flat_token[order], back * weights.reshape(-1)[order].unsqueeze(1))
        return torch.layer_norm(x + y, (HIDDEN,))

    def attention(self, x: torch.Tensor, layer: int, sc: Scenario, faulty: bool) -> torch.Tensor:
        """The rank's own work before dispatch: it scales with the rank's batch."""
        h = torch.tanh(x @ self.attn[layer])
        self.kernel_time(x.shape[0] * sc.attn_cost_per_token_s, sc, faulty)
        return torch.layer_norm(x + 0.1 * h, (HIDDEN,))

    def experts(self, recv: torch.Tensor, layer: int, sc: Scenario, faulty: bool) -> torch.Tensor:
        h, local = recv[:, :HIDDEN], recv[:, HIDDEN].long()
        out = torch.empty_like(h)
        for e in range(EXPERTS_PER_RANK):
            sel = local == e
            g = self.rank * EXPERTS_PER_RANK + e
            out[sel] = torch.relu(h[sel] @ self.w1[layer][g]) @ self.w2[layer][g]
        self.kernel_time(recv.shape[0] * sc.cost_per_slot_s, sc, faulty)
        return out

    def kernel_time(self, seconds: float, sc: Scenario, faulty: bool) -> None:
        """The modelled device time: slept, and on a slow GPU longer (or spun)."""
        slow = faulty and sc.slow_rank == self.rank
        factor = sc.slow_factor if slow else 1.0
        if slow and sc.slow_mode == "spin":
            time.sleep(seconds)
            end = time.perf_counter() + seconds * (factor - 1.0)
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(seconds * factor)


class Slow:
    """Makes a module's forward take ``1 + extra`` times as long: busy-spinning (a
    rank whose host is busy) or sleeping (a slow GPU: the host only waits)."""

    def __init__(self, module: torch.nn.Module, mode: str) -> None:
        self.extra = 0.0
        self.spin = mode == "spin"
        self._forward = module.forward
        module.forward = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self._forward(*args, **kwargs)
        if self.extra > 0:
            more = (time.perf_counter() - t0) * self.extra
            if not self.spin:
                time.sleep(more)
                return out
            end = time.perf_counter() + more
            while time.perf_counter() < end:
                pass
        return out


def announce_onset(sc: Scenario, step: int, rank: int) -> None:
    """The line the cluster times detection from (rank 0, a fault after step 0)."""
    if step == sc.fault_step and sc.fault_step > 0 and rank == 0:
        print(f"ONSET {sc.group} {step} {time.monotonic():.3f}", flush=True)


def fault_steps(sc: Scenario, rank: int, start_fault: Callable[[], None]) -> Iterator[int]:
    """The scenario's steps; at its fault step the onset is announced and
    ``start_fault()`` turns the fault on."""
    for step in range(sc.steps):
        if step == sc.fault_step:
            announce_onset(sc, step, rank)
            start_fault()
        yield step


def run_steps(model: MoE, sc: Scenario, a2a: Any, first_step: int = 0) -> None:
    for step in range(first_step, first_step + sc.steps):
        g = torch.Generator().manual_seed(step * 1000 + model.rank)
        faulty = step >= sc.fault_step
        if faulty:
            announce_onset(sc, step, model.rank)
        tokens = TOKENS
        if faulty and sc.batch_rank == model.rank:
            tokens = round(TOKENS * sc.batch_factor)
        x = torch.randn(tokens, HIDDEN, generator=g)
        for layer in range(sc.layers):
            if sc.hang_rank == model.rank and step == sc.hang_step and layer == sc.hang_layer:
                print(f"HANG {step} {layer} {time.monotonic():.3f}", flush=True)
                time.sleep(3600)
            x = model.layer(x, layer, step, sc, a2a)


def join_gloo() -> argparse.Namespace:
    """A recording worker's arguments, with its gloo process group joined (one CPU
    thread each, as the ranks share the host)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--plan", required=True, help="JSON list of scenarios")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=120),
    )
    return args


def main() -> int:
    args = join_gloo()
    plan = [Scenario(**s) for s in json.loads(args.plan)]
    model = MoE(args.rank, args.world_size, max(s.layers for s in plan))
    for sc in plan:
        probe = get_probe(sc.group, args.rank, args.world_size, args.rank, socket_path=args.socket)
        dist.barrier()
        print(f"START {sc.group} {time.monotonic():.3f}", flush=True)
        run_steps(model, sc, EPAllToAll(probe=probe))
        announce_done(sc, probe)
    stay_up()
    return 0


def announce_done(sc: Scenario, probe: Any) -> None:
    """The line the cluster waits for: a scenario's steps are all issued."""
    print(f"DONE {sc.group} {time.monotonic():.3f} dropped={probe.records_dropped}", flush=True)


def stay_up() -> None:
    """Every rank done: say so, then stay up (heartbeats flowing) until the test ends
    the group."""
    dist.barrier()
    print("FINISHED", flush=True)
    sys.stdout.flush()
    time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
