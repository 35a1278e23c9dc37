"""Reading the part of a recording a report is about: the files, a time window and
the EP groups, read once, then run through the estimators as ``replay`` does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epwatch.collector.estimators import GroupReport
from epwatch.collector.estimators.stats import StepStats
from epwatch.collector.offline import OfflineRun
from epwatch.collector.replay import (
    GroupRecording,
    ReplayError,
    peer_files,
    read_peers,
    read_recording,
    recording_files,
    replay_group,
    split_groups,
)

# (what is being done, fraction done or None) for long reports' progress lines.
ProgressFn = Callable[[str, float | None], None]


@dataclass(frozen=True)
class Selection:
    """Which part of the recording: receive times in [start_ns, end_ns), one EP group."""

    start_ns: int | None = None
    end_ns: int | None = None
    ep_group: str | None = None


@dataclass
class GroupRun:
    """One EP group of the recording, replayed: the diagnosis and every step's
    statistics as the estimators computed them."""

    recording: GroupRecording
    report: GroupReport
    steps: list[StepStats]


def _window(table: Any, sel: Selection) -> Any:
    import pyarrow.compute as pc

    if table is None:
        return None
    keep = None
    t = table.column("received_unix_ns")
    if sel.start_ns is not None:
        keep = pc.greater_equal(t, sel.start_ns)
    if sel.end_ns is not None:
        before = pc.less(t, sel.end_ns)
        keep = before if keep is None else pc.and_(keep, before)
    if sel.ep_group is not None:
        mine = pc.equal(table.column("ep_group").cast("string"), sel.ep_group)
        keep = mine if keep is None else pc.and_(keep, mine)
    return table if keep is None else table.filter(keep)


def load(
    paths: list[Path], sel: Selection, skipped: list[tuple[Path, str]] | None = None
) -> list[GroupRecording]:
    """The selected records and per-peer rows, split by EP group; clear errors when
    nothing is left. Files that cannot be read (cut short by a crash, not a recording)
    are left out and appended to ``skipped`` as (path, why), as ``replay`` does."""
    table = read_recording(recording_files(paths), skipped)
    peers = read_peers(peer_files(paths), skipped)
    total = table.num_rows
    table, peers = _window(table, sel), _window(peers, sel)
    if table.num_rows == 0:
        what = f"EP group {sel.ep_group!r}" if sel.ep_group else "records"
        window = "" if sel.start_ns is None and sel.end_ns is None else " in the time window"
        raise ReplayError(f"the recording ({total:,} records) has no {what}{window}")
    return split_groups(table, peers)


def diagnose(group: GroupRecording, progress: ProgressFn | None = None) -> GroupRun:
    """Replay one group through fresh estimators, keeping every step's statistics."""
    steps: list[StepStats] = []
    total = max(group.records.num_rows, 1)
    done = 0

    def collect(run: OfflineRun, records: int) -> None:
        nonlocal done
        steps.extend(run.new_steps())
        done += records
        if progress is not None:
            progress(f"EP group {group.name}: estimators", done / total)

    report = replay_group(group, after_batch=collect)
    return GroupRun(group, report, steps)
