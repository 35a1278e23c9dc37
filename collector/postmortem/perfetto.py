"""A Chrome trace-event JSON of the recording, for ui.perfetto.dev and chrome://tracing.

One process per node, one thread per rank; every recorded dispatch and combine is a
complete event with its bytes and tokens; flags are instant events on their rank's
thread and γ is a counter track of the EP group.

Ranks' clocks are not comparable (hosts differ by hours), so times are aligned the way
the estimators reason, clock-free: every rank leaves an all-to-all when the last data
arrives, so all of a collective's exits are one instant. A rank's offset in a step is
read from its exit of the step's first dispatch; the step's place on the trace is the
median, over ranks, of how far that exit moved since the previous step (differences
on one clock). Each collective then ends at the median of its ranks' aligned exits and
each rank's span starts its own duration before that: the late arriver has the short
bar, exactly the arrival lag the estimators read.

Events are written in chunks straight to the file; nothing holds the whole trace.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np
import pandas as pd

from epwatch.collector.postmortem.load import GroupRun
from epwatch.collector.replay import codes
from epwatch.schema import PHASE_NAMES, Phase

CHUNK = 100_000  # records formatted per write
PHASES = {int(p): PHASE_NAMES[p] for p in Phase}
_SPAN = (
    '{"ph":"X","cat":"%s","name":"%s %d","pid":%d,"tid":%d,"ts":%.3f,"dur":%.3f,'
    '"args":{"step":%d,"layer":%d,"send_bytes":%d,"recv_bytes":%d,"recv_tokens":%d}}'
)


def aligned_times(records: Any) -> tuple[pd.DataFrame, pd.Series]:
    """Per record, its span on the common time base (``ts_ns``, ``dur_ns``; NaN where
    no rank of its collective could be aligned), and each step's start on that base
    (ns, the first step at 0)."""
    cols = ["rank", "step", "layer", "phase", "enter_ns", "exit_ns"]
    frame = records.select(cols).to_pandas()
    dispatch = frame[frame["phase"] == int(Phase.DISPATCH)]
    first_layer = dispatch.groupby("step")["layer"].transform("min")
    ref = (
        dispatch[dispatch["layer"] == first_layer]
        .drop_duplicates(["step", "rank"])
        .pivot(index="step", columns="rank", values="exit_ns")
        .sort_index()
    )
    # Readings relative to each rank's first one: small numbers, exact as floats.
    zero = ref.min(axis=0)
    local = ref.sub(zero, axis=1).astype(np.float64)
    # How far each step moved on every rank's own clock; the median is the step's move.
    moves = local.diff().median(axis=1)
    typical = float(moves.median()) if moves.notna().any() else 0.0
    start = moves.fillna(typical).clip(lower=0).cumsum()
    start -= start.iloc[0] if len(start) else 0.0
    # A rank's offset in a step; a step without its reference takes the nearest one.
    offset = local.sub(start, axis=0).ffill().bfill().add(zero.astype(np.float64), axis=1)
    keys = pd.MultiIndex.from_arrays([frame["step"], frame["rank"]])
    frame["offset"] = offset.stack().reindex(keys).to_numpy()  # in the records' order
    aligned_exit = frame["exit_ns"] - frame["offset"]
    common_exit = aligned_exit.groupby([frame["step"], frame["layer"], frame["phase"]]).transform(
        "median"
    )  # medians skip ranks that could not be aligned: they still end with the others
    frame["dur_ns"] = (frame["exit_ns"] - frame["enter_ns"]).astype(np.float64)
    frame["ts_ns"] = common_exit - frame["dur_ns"]
    return frame, start


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> str:
    return json.dumps({"ph": "M", "name": name, "pid": pid, "tid": tid, "ts": 0, "args": args})


def _spans(
    run: GroupRun, frame: pd.DataFrame, pid_of: np.ndarray, node_code: np.ndarray, ok: np.ndarray
) -> Iterator[str]:
    """The records as complete events, a chunk of text at a time."""
    rec = run.recording.records
    cols = {
        "layer": frame["layer"].to_numpy(),
        "rank": frame["rank"].to_numpy(),
        "step": frame["step"].to_numpy(),
        "phase": frame["phase"].to_numpy(),
        "ts": frame["ts_ns"].to_numpy() / 1e3,
        "dur": frame["dur_ns"].to_numpy() / 1e3,
        **{n: rec.column(n).to_numpy() for n in ("send_bytes", "recv_bytes", "recv_tokens")},
    }
    for start in range(0, len(frame), CHUNK):
        part = np.arange(start, min(start + CHUNK, len(frame)))
        part = part[ok[part]]
        c = {name: values[part].tolist() for name, values in cols.items()}
        names = [PHASES[p] for p in c["phase"]]
        rows = zip(
            names, names, c["layer"], pid_of[node_code[part]].tolist(), c["rank"], c["ts"],
            c["dur"], c["step"], c["layer"], c["send_bytes"], c["recv_bytes"],
            c["recv_tokens"], strict=True,
        )  # fmt: skip
        yield ",\n".join(_SPAN % row for row in rows)


def _group_events(
    run: GroupRun, start: pd.Series, pid: int, node_pid: dict[str, int], rank_pid: dict[int, int]
) -> Iterator[str]:
    """Metadata, flags and the γ counter of one group."""
    name = run.recording.name
    yield _meta("process_name", pid, 0, {"name": f"EP group {name}: estimators"})
    yield _meta("process_sort_index", pid, 0, {"sort_index": pid})
    for node, npid in node_pid.items():
        yield _meta("process_name", npid, 0, {"name": f"{node} (EP group {name})"})
        yield _meta("process_sort_index", npid, 0, {"sort_index": npid})
    for rank, rpid in rank_pid.items():
        yield _meta("thread_name", rpid, rank, {"name": f"rank {rank}"})
        yield _meta("thread_sort_index", rpid, rank, {"sort_index": rank})
    at = start / 1e3

    def when(step: int) -> float:  # the step's start, or the nearest recorded step's
        return float(at.iloc[min(at.index.searchsorted(step), len(at) - 1)])

    for s in run.report.stragglers:
        args = {"cause": s.cause, "slowdown": s.slowdown, "node": s.node,
                "first_step": s.first_step, "last_step": s.last_step}  # fmt: skip
        tid, fpid = s.rank, rank_pid.get(s.rank, pid)
        title = f"{s.cause} straggler: rank {s.rank}"
        yield json.dumps({"ph": "i", "s": "t", "name": f"{title} flagged", "pid": fpid,
                          "tid": tid, "ts": when(s.first_step), "args": args})  # fmt: skip
        if not s.active:
            yield json.dumps({"ph": "i", "s": "t", "name": f"{title} cleared", "pid": fpid,
                              "tid": tid, "ts": when(s.last_step), "args": args})  # fmt: skip
    for step in run.steps:
        if step.step not in at.index:
            continue
        gamma = step.gamma[np.isfinite(step.gamma)]
        if not len(gamma):
            continue
        yield json.dumps(
            {"ph": "C", "name": "gamma", "pid": pid, "tid": 0, "ts": float(at[step.step]),
             "args": {"median": float(np.median(gamma)),
                      "p99": float(np.percentile(gamma, 99))}}
        )  # fmt: skip


def write_trace(runs: list[GroupRun], out: TextIO) -> tuple[int, int]:
    """Write the trace of every group; returns the spans written and the records left
    out (those of collectives no rank of which could be aligned)."""
    out.write('{"displayTimeUnit":"ms","traceEvents":[\n')
    spans = skipped = 0
    pid = 0
    separator = ""
    for run in runs:
        frame, start = aligned_times(run.recording.records)
        node_code, node_names = codes(run.recording.records, "node")
        group_pid = pid + 1
        node_pid = {node: group_pid + 1 + i for i, node in enumerate(node_names)}
        pid = group_pid + len(node_names)
        pid_of = np.array([node_pid[n] for n in node_names], dtype=np.int64)
        ranks, first = np.unique(frame["rank"].to_numpy(), return_index=True)
        rank_pid = {int(r): int(pid_of[node_code[i]]) for r, i in zip(ranks, first, strict=True)}
        ok = frame["ts_ns"].notna().to_numpy()
        skipped += int((~ok).sum())
        events = itertools.chain(
            _group_events(run, start, group_pid, node_pid, rank_pid),
            _spans(run, frame, pid_of, node_code, ok),
        )
        for text in events:
            if text:
                out.write(separator + text)
                separator = ",\n"
        spans += int(ok.sum())
    out.write("\n]}\n")
    return spans, skipped
