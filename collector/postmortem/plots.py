"""The report's figures, drawn with matplotlib's Agg canvas into PNG bytes (no pyplot,
no display, no global state). Each function draws one figure from :class:`FigureData`."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from epwatch.collector.postmortem.figures import FigureData

DPI = 90
CAUSE_COLOURS = {"compute": "#d62728", "routing": "#ff7f0e", "network": "#1f77b4",
                 "hang": "#7f7f7f"}  # fmt: skip


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _shade_episodes(ax: Any, data: FigureData) -> None:
    seen: set[str] = set()
    for ep in data.episodes:
        label = f"rank {ep['rank']} {ep['cause']}"
        ax.axvspan(
            ep["first_step"],
            ep["last_step"] + 1,
            color=CAUSE_COLOURS.get(ep["cause"], "#999999"),
            alpha=0.12,
            label=None if label in seen else label,
        )
        seen.add(label)


def gamma_skew(data: FigureData) -> bytes:
    """γ and the routing skew per step (median and p99 over layers), episodes shaded."""
    fig = _figure(10, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    s = data.series
    for ax, name, title in ((top, "gamma", "straggler factor γ"), (bottom, "skew", "routing skew")):
        _shade_episodes(ax, data)
        ax.plot(s.index, s[f"{name}_median"], color="#333333", lw=1.2, label="median")
        ax.plot(s.index, s[f"{name}_p99"], color="#9467bd", lw=1.0, alpha=0.8, label="p99")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, ncol=4)
    bottom.set_xlabel("step")
    top.set_title("γ = max_r x_r / mean_r x_r and skew = max_r n_r / mean_r n_r, per layer")
    return png(fig)


def _step_ticks(ax: Any, edges: np.ndarray) -> None:
    count = len(edges) - 1
    picks = np.unique(np.linspace(0, count - 1, min(count, 8)).astype(int))
    ax.set_xticks(picks)
    ax.set_xticklabels([str(int(edges[i])) for i in picks])
    ax.set_xlabel("step")


def rank_heatmaps(data: FigureData) -> bytes:
    """Rank × step bins of the per-token compute slowdown and of the load ratio."""
    ranks = data.run.recording.world_size
    fig = _figure(11, max(3.5, min(12, ranks * 0.12)))
    axes = fig.subplots(1, 2)
    for ax, heat, title, floor, cmap in (
        (axes[0], data.compute, "per-token compute slowdown", 1.0, "inferno"),
        (axes[1], data.load, "load ratio (routed tokens / mean)", 0.0, "viridis"),
    ):
        values = heat.to_numpy(dtype=np.float64)
        top = float(np.nanmax(values)) if np.isfinite(values).any() else floor + 1
        image = ax.imshow(
            values,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=floor,
            vmax=max(top, floor + 0.05),
            origin="lower",
        )
        fig.colorbar(image, ax=ax, fraction=0.05)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("rank")
        _step_ticks(ax, data.edges)
    return png(fig)


def _fit_text(fit: dict[str, Any]) -> str:
    def f(v: float | None, scale: float, fmt: str) -> str:
        return "n/a" if v is None or not math.isfinite(v) else format(v * scale, fmt)

    lines = [
        f"L = {f(fit.get('latency_s'), 1e6, '.1f')} µs",
        f"BW_eff = {f(fit.get('bandwidth_Bps'), 1e-9, '.2f')} GB/s",
        f"crossover n½ = {f(fit.get('crossover_bytes'), 1e-3, '.0f')} KB",
        f"R² = {f(fit.get('r2'), 1, '.3f')}, n = {fit.get('n', 0)}",
        f"regime: {fit.get('regime', 'unknown')}",
    ]
    if fit.get("regime_reason"):
        lines.append(f"({fit['regime_reason']})")
    return "\n".join(lines)


def hockney(data: FigureData) -> bytes:
    """Transfer time against bytes per phase, with the robust fit t = L + V / BW_eff."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, (name, fit) in zip(axes, data.hockney.items(), strict=True):
        v = np.asarray(fit["bytes"], dtype=np.float64)
        t = np.asarray(fit["seconds"], dtype=np.float64)
        ax.scatter(v / 1e6, t * 1e6, s=4, alpha=0.35, color="#1f77b4", label="(V, t_xfer)")
        lat, bw = fit.get("latency_s"), fit.get("bandwidth_Bps")
        if lat is not None and bw and len(v):
            xs = np.linspace(0, float(np.nanmax(v)) * 1.05, 50)
            ax.plot(xs / 1e6, (lat + xs / bw) * 1e6, color="#d62728", lw=1.5, label="fit")
        ax.text(
            0.02, 0.97, _fit_text(fit), transform=ax.transAxes, va="top", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"},
        )  # fmt: skip
        ax.set_title(f"{name}: {fit['points_total']} points", fontsize=10)
        ax.set_xlabel("V, busiest NIC direction (MB)")
        ax.set_ylabel("t_xfer = min_r d_r (µs)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def wait_matrix(data: FigureData) -> bytes | None:
    """Source × destination mean wait per phase, over the window and its worst interval."""
    waits = data.waits
    if waits is None:
        return None
    lo, hi = waits["worst_interval_steps"]
    fig = _figure(10, 9)
    axes = fig.subplots(2, 2)
    for row, phase in enumerate(("dispatch", "combine")):
        for col, (key, label) in enumerate(
            (("mean_s", "mean over the window"), ("worst_s", f"worst interval, steps {lo}-{hi}"))
        ):
            ax = axes[row][col]
            m = np.asarray(waits[phase][key], dtype=np.float64) * 1e6
            image = ax.imshow(m, cmap="magma", interpolation="nearest", origin="lower")
            fig.colorbar(image, ax=ax, fraction=0.046, label="µs")
            ax.set_title(f"{phase}: {label}", fontsize=10)
            ax.set_xlabel("destination rank (waiting)")
            ax.set_ylabel("source rank")
    return png(fig)


def layer_skew(data: FigureData) -> bytes:
    """Per-layer routing skew, with the rank receiving the most in each layer."""
    layers = data.layers
    fig = _figure(11, 3.8)
    ax = fig.subplots()
    x = layers.index.to_numpy()
    since = data.layer_since
    label = "median skew" if since is None else f"median skew since step {since}"
    ax.bar(x, layers["skew_since"], color="#ff7f0e", alpha=0.85, label=label)
    if since is not None:
        ax.plot(x, layers["skew_median"], "k_", ms=10, label="median over the run")
    ax.axhline(1.0, color="#999999", lw=0.8)
    top = layers["top_rank"].mode()
    if len(top):
        rank = int(top.iloc[0])
        count = int((layers["top_rank"] == rank).sum())
        ax.set_title(
            f"rank {rank} receives the most in {count} of {len(layers)} layers", fontsize=10
        )
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("skew = max_r n / mean_r n")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)
