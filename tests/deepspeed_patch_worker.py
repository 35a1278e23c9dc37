"""One rank of DeepSpeed's ``AutoEPMoELayer`` (dropless expert parallelism) on gloo,
instrumented with the one-line patch over ``torch.distributed`` and ``deepspeed.comm``.

Run as ``python -m tests.deepspeed_patch_worker --rank R --world-size P --port N --steps S
--layers L [--hot-rank H --hot-bias B]``; ``EPWATCH_AGENT_SOCKET`` and
``EPWATCH_EP_GROUP`` say where the records go. Each layer is built from a Mixtral-style
block (a router and fused ``[E, 2F, M]`` / ``[E, M, F]`` expert weights, one expert per
rank) the way AutoEP replaces a Hugging Face MoE block. AutoEP exchanges its per-expert
counts with an ``all_to_all_single`` on a 1-D int tensor, then the payload with split
sizes, then the combine: three calls, two records per layer.

DeepSpeed JIT-compiles a shared-memory all-reduce op with g++ on its first
``init_distributed`` (30-60 s here). Gloo does every collective of this test, so the
worker makes DeepSpeed's op builder report the op as unavailable (``build_shm_op``
returns None, DeepSpeed's own answer on a machine that cannot build it).
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

from epwatch.hooks.patch import patch_all_to_all
from tests.patched_ranks import finish_worker, worker_arguments

D_MODEL = 32
FFN = 64
TOKENS = 256


def init_deepspeed(rank: int, world_size: int, port: int) -> None:
    """deepspeed.comm over gloo (over torch.distributed's process group when one is
    already initialised), without its shared-memory op."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
    )  # fmt: skip
    import deepspeed
    import deepspeed.comm  # loads deepspeed.comm.torch

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend="gloo")


def autoep_layer(
    layer: int,
    rank: int,
    world_size: int,
    hot: int | None,
    bias: float,
    d_model: int = D_MODEL,
    ffn: int = FFN,
) -> Any:
    from deepspeed.module_inject.auto_ep_config import AutoEPConfig, MoELayerSpec
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    experts = world_size

    class Experts(torch.nn.Module):  # Hugging Face Mixtral's fused 3-D layout
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * ffn, d_model) / 6)
            self.down_proj = torch.nn.Parameter(torch.randn(experts, d_model, ffn) / 8)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(d_model, experts, bias=True)
            self.experts = Experts()

    torch.manual_seed(1000 + layer)  # the same block on every rank; each keeps its slice
    block = Block()
    with torch.no_grad():
        block.gate.bias.zero_()
        if hot is not None:
            block.gate.bias[hot] = bias
    spec = MoELayerSpec(
        moe_module_name=f"model.layers.{layer}.mlp", model_family="mixtral", router_name="gate",
        experts_name="experts", expert_storage="fused_3d", expert_w1_name="gate_up_proj",
        expert_w2_name="down_proj", expert_w3_name=None, num_experts=experts, top_k=2,
        hidden_size=d_model, ffn_hidden_size=ffn, score_func="softmax", score_apply="post",
        route_norm=True, gate_bias=True, return_router_logits=False,
        router_logits_capture_target="none", router_logits_capture_index=None,
        router_logits_capture_layer_name=None, has_shared_experts=False, shared_experts_name="",
    )  # fmt: skip
    config = AutoEPConfig(enabled=True, autoep_size=world_size)
    moe = AutoEPMoELayer(spec, block, ep_size=world_size, ep_rank=rank, config=config)
    moe.set_deepspeed_parallelism()
    return moe


def main() -> int:
    args = worker_arguments(steps=30, hot_bias=1.5)
    torch.set_num_threads(1)
    init_deepspeed(args.rank, args.world_size, args.port)
    import deepspeed.comm  # loads deepspeed.comm.torch

    # The one line (deepspeed.comm is where AutoEP calls it; torch.distributed underneath
    # is patched too and does not count the same call twice).
    patch = patch_all_to_all(dist, aliases=[deepspeed.comm], layers_per_step=args.layers)
    layers = [
        autoep_layer(i, args.rank, args.world_size, args.hot_rank, args.hot_bias)
        for i in range(args.layers)
    ]
    torch.manual_seed(args.rank)
    with torch.no_grad():
        for _ in range(args.steps):
            x = torch.randn(TOKENS // 8, 8, D_MODEL)
            for moe in layers:
                out = moe(x)
                x = out[0] if isinstance(out, tuple) else out
    finish_worker(patch, args.rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
