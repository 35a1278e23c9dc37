"""The data behind every figure of the report, computed with pandas from the
estimators' own per-step statistics (``StepStats``: γ, skew, t_xfer, V, per-rank
compute slowdown and load ratio, exactly as the live collector computes them), the
recorded records (per-layer skew, step times) and the sampled per-peer rows (wait
matrix). ``FigureData.to_json`` is what ``epwatch report --json`` prints.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from epwatch.collector.estimators.stats import C, D
from epwatch.collector.postmortem.load import GroupRun
from epwatch.schema import PHASE_NAMES, PeerRows, Phase

MAX_STEP_BINS = 60  # columns of the per-rank heatmaps
MAX_WAIT_INTERVALS = 8  # intervals the sampled steps are cut into for the worst one
MAX_SCATTER_POINTS = 4000  # per phase, drawn and printed (the fit used them all)
MAX_WAIT_MATRIX_RANKS = 2048  # a P x P matrix per phase and interval; unreadable beyond


def _num(v: Any) -> float | None:
    """JSON has no NaN: unknown values are null."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _nums(values: Any) -> list:
    """Nested lists of floats with NaN as None."""
    arr = np.asarray(values, dtype=np.float64)
    out = arr.astype(object)
    out[~np.isfinite(arr)] = None
    return out.tolist()


def iso(ns: int | float | None) -> str | None:
    """A receive time as ISO 8601 UTC."""
    if ns is None or not np.isfinite(ns):
        return None
    stamp = pd.Timestamp(int(ns), unit="ns", tz="UTC")
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def step_times(records: Any) -> pd.Series:
    """When each step's first record reached the collector (ns since the epoch)."""
    frame = records.select(["step", "received_unix_ns"]).to_pandas()
    return frame.groupby("step")["received_unix_ns"].min()


# -- episodes ----------------------------------------------------------------------------
def episodes(run: GroupRun, times: pd.Series) -> list[dict[str, Any]]:
    """The diagnosis' flags as episodes, with wall-clock times for their first and last
    steps. Slowdown intervals (``slowdown_low`` / ``slowdown_high``) are passed on when
    the estimators give them."""
    out = []
    for s in run.report.to_json()["stragglers"]:
        ep = dict(s)
        ep.setdefault("slowdown_low", None)
        ep.setdefault("slowdown_high", None)
        ep["first_time"] = iso(times.get(s["first_step"]))
        ep["last_time"] = iso(times.get(s["last_step"]))
        out.append(ep)
    return out


def onset(eps: list[dict[str, Any]], cause: str) -> int | None:
    """First step of the earliest episode of ``cause``."""
    steps = [e["first_step"] for e in eps if e["cause"] == cause]
    return min(steps) if steps else None


# -- γ and skew over time ----------------------------------------------------------------
def layer_frame(run: GroupRun, values: str) -> pd.DataFrame:
    """A ``[step, layer position]`` frame of a per-layer StepStats field."""
    steps = [s.step for s in run.steps]
    rows = [getattr(s, values) for s in run.steps]
    width = max((len(r) for r in rows), default=0)
    data = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        data[i, : len(r)] = r
    return pd.DataFrame(data, index=pd.Index(steps, name="step"))


def gamma_skew(run: GroupRun) -> pd.DataFrame:
    """Per step, the median and p99 over layers of γ and of the routing skew."""
    out = {}
    for name in ("gamma", "skew"):
        frame = layer_frame(run, name)
        out[f"{name}_median"] = frame.median(axis=1)
        out[f"{name}_p99"] = frame.quantile(0.99, axis=1)
    return pd.DataFrame(out)


# -- per-rank heatmaps -------------------------------------------------------------------
def step_bins(first: int, last: int, most: int = MAX_STEP_BINS) -> np.ndarray:
    """Edges of at most ``most`` equal bins covering steps first..last."""
    count = min(most, last - first + 1)
    return np.unique(np.round(np.linspace(first, last + 1, count + 1)).astype(np.int64))


def rank_heatmap(run: GroupRun, values: str, edges: np.ndarray) -> pd.DataFrame:
    """``[rank, step bin]`` median of a per-rank StepStats field (compute slowdown or
    load ratio) over the steps of each bin."""
    frame = pd.DataFrame(
        np.stack([getattr(s, values) for s in run.steps]),
        index=pd.Index([s.step for s in run.steps], name="step"),
    )
    bins = pd.cut(frame.index, edges, right=False)
    return frame.groupby(bins, observed=False).median().T


def _top_ranks(heat: pd.DataFrame) -> list[int | None]:
    """The rank with the highest value in each step bin (None where all are unknown)."""
    filled = heat.fillna(-np.inf)
    return [int(filled[c].idxmax()) if np.isfinite(filled[c].max()) else None for c in heat]


# -- Hockney scatter ---------------------------------------------------------------------
def hockney_points(run: GroupRun, phase: Phase) -> tuple[np.ndarray, np.ndarray]:
    """The points the estimators fitted for ``phase``: (V, t_xfer) of every layer of
    every step, V the busiest NIC direction and t_xfer the shortest duration."""
    v = np.concatenate([s.volume_bytes[:, phase] for s in run.steps])
    t = np.concatenate([s.transfer_s[:, phase] for s in run.steps])
    return v.astype(np.float64), t.astype(np.float64)


def _subsample(n: int, most: int) -> np.ndarray:
    if n <= most:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, most, replace=False))


def _fit_json(diagnosed: dict[str, Any]) -> dict[str, Any]:
    """The phase's fit as the diagnosis reports it, with the reason when a fit gate
    leaves the regime ``unknown`` (null while the estimators give none)."""
    return {**diagnosed, "regime_reason": diagnosed.get("regime_reason", diagnosed.get("reason"))}


# -- wait matrix -------------------------------------------------------------------------
def _mean_matrix(rows: PeerRows, index: np.ndarray, world: int) -> np.ndarray:
    """``[source, destination]`` mean wait of the destination for the source's data."""
    if not len(index):
        return np.full((world, world), np.nan)
    waits = pd.DataFrame(rows.wait_s[index])
    by_receiver = waits.groupby(rows.rank[index]).mean().reindex(range(world))
    return by_receiver.to_numpy().T


def _standout(m: np.ndarray) -> float:
    """How far the most waited-for source (row) or the most waiting destination
    (column) stands above the typical cell: what makes an interval worth a look."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        typical = np.nanmedian(m)
        top = max(np.nanmax(np.nanmean(m, axis=1)), np.nanmax(np.nanmean(m, axis=0)))
        score = top / typical
    return float(score) if np.isfinite(score) else -np.inf


def wait_matrices(rows: PeerRows | None, world: int) -> dict[str, Any] | None:
    """Per phase, the mean wait matrix over the window and over its worst interval:
    of at most ``MAX_WAIT_INTERVALS`` cuts of the sampled steps, the one where a rank
    stands out most (as the source everyone waits for, or the destination waiting
    for everyone), in either phase."""
    if rows is None or not len(rows) or not rows.wait_s.size or world > MAX_WAIT_MATRIX_RANKS:
        return None
    sampled = np.unique(rows.step)
    cuts = min(MAX_WAIT_INTERVALS, len(sampled))
    interval = pd.Series(pd.qcut(sampled, cuts, labels=False, duplicates="drop"), index=sampled)
    row_interval = interval.reindex(rows.step).to_numpy()
    phases = {p: rows.phase == p for p in (D, C)}
    per_interval = {
        (i, p): _mean_matrix(rows, np.flatnonzero(mine & (row_interval == i)), world)
        for i in np.unique(row_interval).tolist()
        for p, mine in phases.items()
    }
    worst = max(per_interval, key=lambda key: _standout(per_interval[key]))[0]
    worst_steps = sampled[interval.to_numpy() == worst]
    out: dict[str, Any] = {
        "worst_interval_steps": [int(worst_steps.min()), int(worst_steps.max())],
        "sampled_steps": len(sampled),
        "rows": len(rows),
    }
    for phase, mine in phases.items():
        window = _mean_matrix(rows, np.flatnonzero(mine), world)
        out[PHASE_NAMES[Phase(phase)]] = {
            "mean_s": window,
            "worst_s": per_interval[(worst, phase)],
            "top_source": _top(np.nanmean(window, axis=1)),
            "top_destination": _top(np.nanmean(window, axis=0)),
        }
    return out


def _top(values: np.ndarray) -> int | None:
    return int(np.nanargmax(values)) if np.isfinite(values).any() else None


# -- per-layer skew ----------------------------------------------------------------------
def layer_skew(run: GroupRun, since: int | None) -> pd.DataFrame:
    """Per layer, the median routing skew (max_r n / mean_r n of its dispatch) over the
    analysed steps and over those since ``since``, and the rank receiving the most
    in most of those steps: the layers that carry a hot expert, and whose it is."""
    frame = (
        run.recording.records.select(["step", "layer", "phase", "rank", "recv_tokens"])
        .filter(_is_dispatch(run.recording.records))
        .to_pandas()
    )
    frame = frame[frame["step"].isin([s.step for s in run.steps])]
    keys = ["step", "layer"]
    grouped = frame.groupby(keys)["recv_tokens"]
    per_step = pd.DataFrame({"skew": grouped.max() / grouped.mean()})
    top = frame.sort_values("recv_tokens", kind="stable").drop_duplicates(keys, keep="last")
    per_step["top_rank"] = top.set_index(keys)["rank"]
    per_step = per_step.reset_index()
    recent = per_step if since is None else per_step[per_step["step"] >= since]
    out = pd.DataFrame(
        {
            "skew_median": per_step.groupby("layer")["skew"].median(),
            "skew_since": recent.groupby("layer")["skew"].median(),
            "top_rank": recent.groupby("layer")["top_rank"].agg(lambda r: r.mode().iloc[0]),
            "top_rank_share": recent.groupby("layer")["top_rank"].agg(
                lambda r: (r == r.mode().iloc[0]).mean()
            ),
        }
    )
    return out


def _is_dispatch(records: Any) -> Any:
    import pyarrow.compute as pc

    return pc.equal(records.column("phase"), int(Phase.DISPATCH))


# -- everything --------------------------------------------------------------------------
@dataclass
class FigureData:
    """One EP group's report: the diagnosis and the data of each figure."""

    run: GroupRun
    episodes: list[dict[str, Any]]
    times: pd.Series
    series: pd.DataFrame
    edges: np.ndarray
    compute: pd.DataFrame
    load: pd.DataFrame
    hockney: dict[str, dict[str, Any]]
    waits: dict[str, Any] | None
    layers: pd.DataFrame
    layer_since: int | None

    def to_json(self) -> dict[str, Any]:
        r = self.run.report
        rec = self.run.recording
        bins = [[int(a), int(b) - 1] for a, b in zip(self.edges[:-1], self.edges[1:], strict=True)]
        waits = None
        if self.waits is not None:
            waits = dict(self.waits)
            for phase in ("dispatch", "combine"):
                m = self.waits[phase]
                waits[phase] = {**m, "mean_s": _nums(m["mean_s"]), "worst_s": _nums(m["worst_s"])}
        return {
            "ep_group": rec.name,
            "ranks": rec.world_size,
            "nodes": sorted(set(r.nodes)),
            "records": rec.records.num_rows,
            "peer_rows": 0 if rec.peers is None else rec.peers.num_rows,
            "steps": r.steps,
            "first_step": int(self.series.index.min()) if len(self.series) else None,
            "last_step": int(self.series.index.max()) if len(self.series) else None,
            "first_time": iso(self.times.min()) if len(self.times) else None,
            "last_time": iso(self.times.max()) if len(self.times) else None,
            "diagnosis": r.to_json(),
            "episodes": self.episodes,
            "gamma_skew": {
                "step": self.series.index.tolist(),
                **{c: _nums(self.series[c]) for c in self.series.columns},
            },
            "rank_heatmaps": {
                "step_bins": bins,
                "compute_slowdown": _nums(self.compute.to_numpy()),
                "load_ratio": _nums(self.load.to_numpy()),
                "top_rank_compute": _top_ranks(self.compute),
                "top_rank_load": _top_ranks(self.load),
            },
            "hockney": self.hockney,
            "wait_matrix": waits,
            "layer_skew": {
                "since_step": self.layer_since,
                "layer": self.layers.index.tolist(),
                "skew_median": _nums(self.layers["skew_median"]),
                "skew_since": _nums(self.layers["skew_since"]),
                "top_rank": [int(v) for v in self.layers["top_rank"]],
                "top_rank_share": _nums(self.layers["top_rank_share"]),
            },
        }


def figure_data(run: GroupRun) -> FigureData:
    """Everything the report draws for one replayed EP group (with at least one
    analysed step)."""
    times = step_times(run.recording.records)
    eps = episodes(run, times)
    steps = [s.step for s in run.steps]
    edges = step_bins(min(steps), max(steps))
    hockney: dict[str, dict[str, Any]] = {}
    diagnosis = run.report.to_json()
    for phase in (Phase.DISPATCH, Phase.COMBINE):
        name = PHASE_NAMES[phase]
        v, t = hockney_points(run, phase)
        keep = _subsample(len(v), MAX_SCATTER_POINTS)
        hockney[name] = {
            **_fit_json(diagnosis[name]),
            "points_total": len(v),
            "bytes": _nums(v[keep]),
            "seconds": _nums(t[keep]),
        }
    since = onset(eps, "routing")
    return FigureData(
        run=run,
        episodes=eps,
        times=times,
        series=gamma_skew(run),
        edges=edges,
        compute=rank_heatmap(run, "compute_ratio", edges),
        load=rank_heatmap(run, "load_ratio", edges),
        hockney=hockney,
        waits=wait_matrices(run.recording.peer_rows(), run.recording.world_size),
        layers=layer_skew(run, since),
        layer_since=since,
    )
