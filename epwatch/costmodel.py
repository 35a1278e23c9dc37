"""The Wide-EP cost model of the reference article, in one pure module.

Everything that predicts or explains a time (the ``model`` command, the simulator, the
estimators' regime and what-if) imports these functions; nothing else restates them.
Units are base units throughout: bytes, seconds, bytes per second.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_BOUND = "latency-bound"
BANDWIDTH_BOUND = "bandwidth-bound"


@dataclass(frozen=True, slots=True)
class Workload:
    """One MoE layer step: B tokens over P ranks, top-k routing, d x s bytes a slot."""

    batch_tokens: float  # B: global tokens per MoE layer step
    ranks: int  # P: EP ranks
    topk: int  # k
    hidden: int  # d
    bytes_per_elem: float  # s (FP8 = 1, BF16 = 2)
    epsilon: float = 0.0  # metadata tax: indices, scales, padding
    layers: int = 61  # MoE layers per forward pass

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "ranks", "topk", "hidden", "bytes_per_elem", "layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


def tokens_per_rank(w: Workload) -> float:
    """T = B / P."""
    return w.batch_tokens / w.ranks


def payload_bytes_per_rank(w: Workload) -> float:
    """V = (B/P) k d s (1 + eps): bytes one rank moves in one direction of one layer."""
    return tokens_per_rank(w) * w.topk * w.hidden * w.bytes_per_elem * (1.0 + w.epsilon)


def bytes_per_forward_per_rank(w: Workload) -> float:
    """Dispatch and combine on every MoE layer: 2 x layers x V."""
    return 2.0 * w.layers * payload_bytes_per_rank(w)


def nic_bytes_per_second(w: Workload, steps_per_second: float) -> float:
    """What one rank's NIC must sustain at a forward-pass rate."""
    return bytes_per_forward_per_rank(w) * steps_per_second


def transfer_seconds(latency_s: float, bandwidth_bps: float, volume_bytes: float) -> float:
    """Hockney: one collective moving ``volume_bytes`` per rank takes L + V / BW_eff."""
    return latency_s + volume_bytes / bandwidth_bps


def comm_seconds(latency_s: float, bandwidth_bps: float, volume_bytes: float) -> float:
    """t_comm = 2 (L + V / BW_eff): dispatch plus combine of one layer."""
    return 2.0 * transfer_seconds(latency_s, bandwidth_bps, volume_bytes)


def compute_seconds(w: Workload, ns_per_token: float, gamma: float = 1.0) -> float:
    """t_compute = gamma (B k / P) c_tok: the slowest rank's expert compute of one layer."""
    return gamma * (w.batch_tokens * w.topk / w.ranks) * ns_per_token * 1e-9


def crossover_bytes(latency_s: float, bandwidth_bps: float) -> float:
    """n_1/2 = L x BW_eff: the message size at which latency and transfer cost the same."""
    return latency_s * bandwidth_bps


def per_peer_message_bytes(volume_bytes: float, ranks: int) -> float:
    """V / (P - 1): what one rank sends to each peer."""
    return volume_bytes / max(ranks - 1, 1)


def regime(per_peer_bytes: float, latency_s: float, bandwidth_bps: float) -> str:
    """Latency-bound when the per-peer message is below the crossover size."""
    if per_peer_bytes < crossover_bytes(latency_s, bandwidth_bps):
        return LATENCY_BOUND
    return BANDWIDTH_BOUND


def batch_for_bandwidth_bound(w: Workload, latency_s: float, bandwidth_bps: float) -> float:
    """Smallest global batch B whose per-peer message reaches the crossover size."""
    bytes_per_token = w.topk * w.hidden * w.bytes_per_elem * (1.0 + w.epsilon)
    return (
        crossover_bytes(latency_s, bandwidth_bps) * max(w.ranks - 1, 1) * w.ranks / bytes_per_token
    )


def straggler_seconds_per_step(max_compute_s: list[float], mean_compute_s: list[float]) -> float:
    """Time lost per forward pass to stragglers: sum over layers of (max_r x - mean_r x)."""
    return float(sum(m - a for m, a in zip(max_compute_s, mean_compute_s, strict=True)))


@dataclass(frozen=True, slots=True)
class WhatIf:
    """One MoE layer at another batch or EP width, from measured L, BW_eff and compute."""

    t_comm_s: float  # dispatch + combine
    t_compute_s: float  # the slowest rank's expert compute (gamma included)
    per_peer_message_bytes: float
    regime: str

    @property
    def overlap_covers_comm(self) -> bool:
        """Dual-batch overlap hides the all-to-alls only behind at least as much compute."""
        return self.t_compute_s >= self.t_comm_s


def what_if(
    latency_s: float,
    bandwidth_bps: float,
    volume_bytes: float,
    ranks: int,
    compute_s: float,
    batch_scale: float = 1.0,
    ranks_scale: float = 1.0,
) -> WhatIf:
    """Scale a measured layer: V and expert compute grow with B / P (Wide-EP slices the
    same batch over more peers), L stays; per-peer messages are V / (P - 1)."""
    new_ranks = max(round(ranks * ranks_scale), 2)
    v = volume_bytes * batch_scale / ranks_scale
    peer = per_peer_message_bytes(v, new_ranks)
    return WhatIf(
        t_comm_s=comm_seconds(latency_s, bandwidth_bps, v),
        t_compute_s=compute_s * batch_scale / ranks_scale,
        per_peer_message_bytes=peer,
        regime=regime(peer, latency_s, bandwidth_bps),
    )


def model_report(
    w: Workload,
    steps_per_second: float | None = None,
    latency_s: float | None = None,
    bandwidth_bps: float | None = None,
) -> dict[str, float | str]:
    """The ``epwatch model`` JSON: every figure the cost model gives for a workload."""
    v = payload_bytes_per_rank(w)
    out: dict[str, float | str] = {
        "tokens_per_rank": tokens_per_rank(w),
        "payload_bytes_per_rank": v,
        "bytes_per_forward_per_rank": bytes_per_forward_per_rank(w),
    }
    if steps_per_second is not None:
        out["nic_bytes_per_second"] = nic_bytes_per_second(w, steps_per_second)
    if latency_s is not None and bandwidth_bps is not None:
        peer = per_peer_message_bytes(v, w.ranks)
        out.update(
            t_comm_seconds=comm_seconds(latency_s, bandwidth_bps, v),
            crossover_bytes=crossover_bytes(latency_s, bandwidth_bps),
            per_peer_message_bytes=peer,
            regime=regime(peer, latency_s, bandwidth_bps),
            batch_for_bandwidth_bound=batch_for_bandwidth_bound(w, latency_s, bandwidth_bps),
        )
    return out
