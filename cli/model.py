"""``epwatch model``: the article's cost model for a workload you describe."""

from __future__ import annotations

import argparse
import json

from epwatch import costmodel


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "example (the article's DeepSeek-V3 figures): epwatch model --batch 128000 "
        "--ranks 64 --topk 8 --hidden 7168 --bytes-per-elem 1 --layers 61 "
        "--steps-per-second 10 --latency-us 150 --bandwidth-gbps 40"
    )
    p.add_argument("--batch", type=float, required=True, help="B: global tokens per MoE layer step")
    p.add_argument("--ranks", type=int, required=True, help="P: EP ranks")
    p.add_argument("--topk", type=int, required=True, help="k: experts per token")
    p.add_argument("--hidden", type=int, required=True, help="d: hidden size")
    p.add_argument(
        "--bytes-per-elem", type=float, required=True, help="s: bytes per element (FP8 1, BF16 2)"
    )
    p.add_argument("--epsilon", type=float, default=0.0, help="metadata tax (default 0)")
    p.add_argument("--layers", type=int, default=61, help="MoE layers per forward (default 61)")
    p.add_argument(
        "--steps-per-second",
        type=float,
        default=10.0,
        help="forward passes per second (default 10)",
    )
    p.add_argument("--latency-us", type=float, help="L: fixed all-to-all latency, microseconds")
    p.add_argument("--bandwidth-gbps", type=float, help="BW_eff in GB/s (1e9 bytes/s)")
    p.add_argument("--json", action="store_true", help="print JSON in base units")


def run(args: argparse.Namespace) -> int:
    if (args.latency_us is None) != (args.bandwidth_gbps is None):
        raise SystemExit("epwatch model: give both --latency-us and --bandwidth-gbps, or neither")
    try:
        workload = costmodel.Workload(
            batch_tokens=args.batch,
            ranks=args.ranks,
            topk=args.topk,
            hidden=args.hidden,
            bytes_per_elem=args.bytes_per_elem,
            epsilon=args.epsilon,
            layers=args.layers,
        )
        if args.steps_per_second <= 0:
            raise ValueError("steps-per-second must be positive")
        if args.latency_us is not None and (args.latency_us < 0 or args.bandwidth_gbps <= 0):
            raise ValueError("latency must be >= 0 and bandwidth positive")
    except ValueError as err:
        raise SystemExit(f"epwatch model: {err}") from None
    report = costmodel.model_report(
        workload,
        steps_per_second=args.steps_per_second,
        latency_s=None if args.latency_us is None else args.latency_us * 1e-6,
        bandwidth_bps=None if args.bandwidth_gbps is None else args.bandwidth_gbps * 1e9,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def format_report(r: dict[str, float | str]) -> str:
    lines = [
        f"tokens per rank            {r['tokens_per_rank']:,.0f}",
        f"payload per rank per dir   {r['payload_bytes_per_rank'] / 1e6:,.1f} MB",
        f"bytes per forward per rank {r['bytes_per_forward_per_rank'] / 1e9:,.2f} GB",
        f"NIC load                   {r['nic_bytes_per_second'] / 1e9:,.1f} GB/s",
    ]
    if "t_comm_seconds" in r:
        lines += [
            f"t_comm per layer           {float(r['t_comm_seconds']) * 1e6:,.1f} us",
            f"per-peer message           {float(r['per_peer_message_bytes']) / 1e3:,.1f} KB",
            f"crossover n1/2 = L*BW      {float(r['crossover_bytes']) / 1e3:,.1f} KB",
            f"regime                     {r['regime']}",
            f"B for bandwidth-bound      {float(r['batch_for_bandwidth_bound']):,.0f} tokens",
        ]
    return "\n".join(lines)
