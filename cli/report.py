"""``epwatch report``: a post-mortem to look at, from the collector's ``--record`` files.

The recording goes through the estimators as ``epwatch replay`` runs it, and the
result is one self-contained HTML page (figures embedded; it opens offline): the
diagnosis with each episode's rank, node, cause, slowdown, first and last step and
evidence; γ and the routing skew over time with the episodes shaded; per-rank
heatmaps of the per-token compute slowdown and the load ratio; the Hockney fit per
phase; the wait matrix from the sampled per-peer rows; the routing skew per layer.

  epwatch report /var/lib/epwatch/rec --out incident.html
  epwatch report rec/ --from 2025-06-01T10:00 --to 2025-06-01T10:30 --ep-group ep0
  epwatch report rec/ --json > figures.json        # the data behind every figure
  epwatch report rec/ --perfetto trace.json        # open in ui.perfetto.dev

Without --out, the page goes to report.html unless only --json or --perfetto was asked
for. Times (--from, --to) are when the collector received the records: ISO 8601
(UTC unless it names a zone) or Unix seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from epwatch.collector.replay import ReplayError, peer_files, recording_files

BIG_RECORDING_BYTES = 16 << 20  # about a million records: show progress from the start
INSTALL = "install the report extra: pip install 'epwatch[report]' (pandas, matplotlib)"


def parse_time(value: str) -> int:
    """ISO 8601 (UTC when no zone is given) or Unix seconds, as ns since the epoch."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an ISO 8601 time (2025-06-01T10:00:00Z) or Unix seconds, got {value!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp()
    if not math.isfinite(seconds) or not 0 <= seconds < 1 << 33:
        raise argparse.ArgumentTypeError(f"time out of range: {value!r}")
    return round(seconds * 1e9)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("paths", type=Path, nargs="+", help="recording files or --record folders")
    p.add_argument(
        "--out", type=Path, metavar="FILE", help="the HTML report to write (default report.html)"
    )
    p.add_argument(
        "--from", dest="start", type=parse_time, metavar="T",
        help="only records received at or after T",
    )  # fmt: skip
    p.add_argument(
        "--to", dest="end", type=parse_time, metavar="T", help="only records received before T"
    )
    p.add_argument("--ep-group", metavar="G", help="only this EP group (default: every group)")
    p.add_argument("--json", action="store_true", help="print the data behind every figure as JSON")
    p.add_argument(
        "--perfetto", type=Path, metavar="FILE",
        help="write a Chrome trace-event JSON for ui.perfetto.dev / chrome://tracing: one "
        "process per node, one thread per rank, a span per recorded collective",
    )  # fmt: skip


class Progress:
    """Progress lines on stderr, for reports that take more than a few seconds: from
    the start for a big recording, otherwise once ``after_s`` have passed."""

    def __init__(
        self, stream: TextIO, big: bool, after_s: float = 2.0, every_s: float = 2.0
    ) -> None:
        self.stream = stream
        self.start = time.monotonic()
        self.after_s = 0.0 if big else after_s
        self.every_s = every_s
        self._last_what = ""
        self._last_s = -math.inf

    def __call__(self, what: str, fraction: float | None = None) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.after_s:
            return
        if what == self._last_what and now - self._last_s < self.every_s:
            return
        done = "" if fraction is None else f" {100 * min(fraction, 1.0):3.0f}%"
        print(f"epwatch report: {what}{done} ({elapsed:.1f} s)", file=self.stream, flush=True)
        self._last_what, self._last_s = what, now


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_report(
    paths: list[Path],
    out: Path | None = None,
    perfetto: Path | None = None,
    want_json: bool = False,
    start_ns: int | None = None,
    end_ns: int | None = None,
    ep_group: str | None = None,
    progress: Progress | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> dict | None:
    """Everything ``epwatch report`` does; returns the figures' data when asked for.
    Raises ReplayError (bad recording, empty selection) or OSError (unwritable file).
    Recording files that cannot be read are left out, named in the page and the JSON
    (``skipped``: path and why), and appended to ``skipped`` for the caller to say."""
    # pandas and matplotlib load here, never on the collector's live path.
    from epwatch.collector.postmortem.figures import figure_data
    from epwatch.collector.postmortem.load import Selection, diagnose, load
    from epwatch.collector.postmortem.page import group_section, render
    from epwatch.collector.postmortem.perfetto import write_trace

    def say(what: str, fraction: float | None = None) -> None:
        if progress is not None:
            progress(what, fraction)

    skipped = [] if skipped is None else skipped
    say("reading the recording")
    groups = load(paths, Selection(start_ns, end_ns, ep_group), skipped)
    runs = [diagnose(g, say) for g in groups]
    data = None
    if out is not None or want_json:
        analysed = [run for run in runs if run.steps]
        for run in runs:
            if not run.steps:
                print(
                    f"epwatch report: EP group {run.recording.name}: no complete step in the "
                    "window (every rank's records of every layer); left out of the report",
                    file=sys.stderr,
                )
        if not analysed:
            raise ReplayError("no EP group has a complete step in the window")
        say("computing the figures' data")
        figures = [figure_data(run) for run in analysed]
        if out is not None:
            say("drawing the figures")
            _write_atomically(out, render([group_section(f) for f in figures], skipped))
        if want_json:
            data = {
                "groups": [f.to_json() for f in figures],
                "skipped": [{"path": str(path), "why": why} for path, why in skipped],
            }
    if perfetto is not None:
        say("writing the Perfetto trace")
        tmp = perfetto.with_name(f".{perfetto.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                write_trace(runs, f)
            os.replace(tmp, perfetto)
        finally:
            tmp.unlink(missing_ok=True)
    return data


def run(args: argparse.Namespace) -> int:
    out = args.out
    if out is None and not (args.json or args.perfetto):
        out = Path("report.html")
    skipped: list[tuple[Path, str]] = []

    def say_skipped(error: str = "") -> None:
        for path, why in skipped:
            if f"{path}: " not in error:  # "no readable recording" lists them already
                print(f"epwatch report: skipped {path}: {why}", file=sys.stderr)

    try:
        files = recording_files(args.paths) + peer_files(args.paths)
        size = sum(f.stat().st_size for f in files)
        data = make_report(
            args.paths,
            out=out,
            perfetto=args.perfetto,
            want_json=args.json,
            start_ns=args.start,
            end_ns=args.end,
            ep_group=args.ep_group,
            progress=Progress(sys.stderr, big=size >= BIG_RECORDING_BYTES),
            skipped=skipped,
        )
    except ReplayError as err:
        say_skipped(str(err))
        print(f"epwatch report: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"epwatch report: {err.name or err} is missing: {INSTALL}", file=sys.stderr)
        return 2
    except OSError as err:
        say_skipped()
        print(f"epwatch report: cannot write: {err}", file=sys.stderr)
        return 2
    say_skipped()
    said = sys.stderr if args.json else sys.stdout
    if out is not None:
        print(f"report: {out}", file=said)
    if args.perfetto is not None:
        print(f"Perfetto trace: {args.perfetto} (open it in ui.perfetto.dev)", file=said)
    if data is not None:
        print(json.dumps(data))
    return 0
