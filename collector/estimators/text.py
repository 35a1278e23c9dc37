"""Readable rendering of a :class:`GroupReport` for terminals."""

from __future__ import annotations

import math

from epwatch.collector.estimators.report import DropStats, GroupReport, StragglerReport

_CAUSE_TEXT = {
    "compute": "per-token expert compute {slowdown:.3f}x the group median{ci} (slow GPU)",
    "routing": "receives {slowdown:.2f}x the mean routed load{ci} (hot expert)",
    "network": "its NIC moves a byte {slowdown:.2f}x slower than the group's{ci} "
    "(slow NIC or link)",
    "batch": "its data-parallel batch is {slowdown:.2f}x the group median{ci}, so it enters "
    "dispatch late (balance the DP batches or the scheduler)",
    "hang": "never entered the collective the others are waiting in (hang)",
}
# Under CUDA graphs the kernel counters measure waits, not per-collective costs.
_COUNTER_CAUSE_TEXT = {
    **_CAUSE_TEXT,
    "compute": "arrives late into combine: the group loses {share:.1f}% of its time waiting "
    "for its experts{ci} (slow GPU; per-token cost is not measured under CUDA graphs)",
    "routing": "its experts receive {slowdown:.2f}x the mean tokens per second{ci} (hot expert)",
    "network": "peers wait {slowdown:.2f}x the group's time for its data, or it for theirs"
    "{ci} (slow NIC)",
    "batch": "moves {slowdown:.2f}x its peers' data out in dispatch and back in combine{ci} "
    "(larger data-parallel batch: balance the DP batches or the scheduler)",
}


_MODE_LINES = {
    "counters": (
        "  counter mode (CUDA graphs): diagnosed from DeepEP's kernel counters; gamma, skew "
        "and the Hockney fit need per-collective records and are not measured",
    ),
    "mixed": ("  mixed mode: per-collective records and kernel counters (CUDA graphs) together",),
}
_MAX_DROP_LINES = 5  # the ranks that drop most; the JSON has every rank


def _f(v: float, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v * scale:{fmt}}{unit}"


def explain(s: StragglerReport) -> str:
    """One line saying which rank, since when, how much and why."""
    slowdown = s.slowdown if math.isfinite(s.slowdown) else 0.0
    ci = ""
    if math.isfinite(s.slowdown_low) and math.isfinite(s.slowdown_high):
        ci = f" [{s.slowdown_low:.3g}-{s.slowdown_high:.3g}]"
    texts = _COUNTER_CAUSE_TEXT if s.source == "counters" else _CAUSE_TEXT
    why = texts.get(s.cause, s.cause).format(
        slowdown=slowdown, share=(slowdown - 1.0) * 100.0, ci=ci
    )
    state = "" if s.active else f" (cleared after step {s.last_step})"
    line = f"rank {s.rank} on {s.node or '?'}: {s.cause}, since step {s.first_step}: {why}{state}"
    return line + "".join(f"\n      evidence: {e}" for e in s.evidence)


def format_report(r: GroupReport) -> str:
    analysed = f"{r.steps} steps analysed (last step {r.last_step})"
    if r.mode == "counters":
        analysed = f"{r.intervals} counter intervals (up to step {r.last_step})"
    lines = [
        f"EP group {r.ep_group}: {r.ranks} ranks, {analysed}",
        *_MODE_LINES.get(r.mode, ()),
        f"  straggler factor gamma  median {_f(r.gamma_median, '.3f')}  "
        f"p99 {_f(r.gamma_p99, '.3f')}",
        f"  routing skew            median {_f(r.skew_median, '.3f')}  max {_f(r.skew_max, '.3f')}"
        f"  balancedness {_f(r.balancedness, '.3f')}",
        f"  time lost to stragglers {_f(r.time_lost_per_step_s, '.3f', 1e3, ' ms')} "
        "per forward pass",
    ]
    for name, p in r.phases.items():
        why = f" ({p.fit_problem})" if p.fit_problem else ""
        lines.append(
            f"  {name:<8} L {_f(p.latency_s, '.1f', 1e6, ' us')}  BW_eff "
            f"{_f(p.bandwidth_Bps, '.2f', 1e-9, ' GB/s')}  R^2 {_f(p.r2, '.3f')} (n={p.n})  "
            f"per-peer {_f(p.per_peer_message_bytes, '.1f', 1e-3, ' KB')} vs crossover "
            f"{_f(p.crossover_bytes, '.1f', 1e-3, ' KB')}: {p.regime}{why}"
        )
    w = r.whatif
    if w:
        cover = "covers" if w["overlap_covers_comm"] else "does NOT cover"
        lines.append(
            f"  per layer: compute {_f(w['t_compute_s'], '.0f', 1e6, ' us')} {cover} "
            f"dispatch+combine {_f(w['t_comm_s'], '.0f', 1e6, ' us')} (dual-batch overlap)"
        )
        scale = w["batch_scale_for_bandwidth_bound"]
        if scale > 1:
            lines.append(f"  raise the batch {scale:.1f}x to leave the latency-bound regime")
        for name, label in (("double_batch", "2x batch"), ("double_ranks", "2x ranks")):
            p = w[name]
            lines.append(
                f"  what if {label}: comm {_f(p['t_comm_s'], '.0f', 1e6, ' us')}, compute "
                f"{_f(p['t_compute_s'], '.0f', 1e6, ' us')} per layer, {p['regime']}"
            )
    if r.stalled_s > 0:
        lines.append(f"  group stalled for {r.stalled_s:.1f} s")
    for link in r.suspect_links:
        state = "" if link.active else f" (cleared after step {link.last_step})"
        lines.append(
            f"  suspect link: rank {link.src} -> rank {link.dst} is {link.slowdown:.2f}x "
            f"slower than both ends predict, since step {link.first_step}{state}"
        )
    drops = DropStats(r.dropped_fraction, r.drop_capacity)
    dropping = sorted(
        (rank for rank, share in enumerate(r.dropped_fraction) if share and share > 0),
        key=lambda rank: -r.dropped_fraction[rank],
    )
    lines += [f"  dropped at capacity: {drops.line(rank)}" for rank in dropping[:_MAX_DROP_LINES]]
    if len(dropping) > _MAX_DROP_LINES:
        lines.append(f"  ... and {len(dropping) - _MAX_DROP_LINES} more ranks dropped fewer")
    if r.stragglers:
        lines.append("  stragglers:")
        lines += [f"    {explain(s)}" for s in r.stragglers]
    else:
        lines.append("  stragglers: none")
    return "\n".join(lines)
