"""``epwatch report`` on a recording of the demo's story (rank 13's GPU slows down at
step 50, rank 29's expert turns hot at step 100): the data behind every figure shows
them, the HTML opens in real headless Chromium without errors or requests, and the
Perfetto trace is valid Chrome trace-event JSON with one span per recorded collective.

The recording is written by the collector's own recorder from the simulator (records
and per-peer rows, one batch per node and step), 8 layers instead of 61 to stay lean.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import re
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epwatch.cli.demo import add_arguments, demo_scenario
from epwatch.cli.simrecord import record_scenario
from epwatch.collector.recorder import Recorder, RecorderConfig
from epwatch.simulator.scenario import load_scenario
from tests import headless
from tests.helpers import make_records

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.timeout(240)

START = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
SLOW_RANK, SLOW_STEP = 13, 37  # the demo's faults (cli/demo.py)
HOT_RANK, HOT_STEP = 29, 75
RANKS, LAYERS = 32, 8


def report_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "report", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    scenario = demo_scenario(parser.parse_args([f"--layers={LAYERS}"]))
    faults = {(f.kind, f.rank if f.kind != "hot_expert" else f.expert // 8, f.start_step)
              for f in scenario.faults}  # fmt: skip
    assert faults == {("slow_gpu", SLOW_RANK, SLOW_STEP), ("hot_expert", HOT_RANK, HOT_STEP)}
    directory = tmp_path_factory.mktemp("recording")
    written = record_scenario(scenario, directory, start_ns=int(START.timestamp()) * 10**9)
    return directory, written


@pytest.fixture(scope="module")
def report(recording: tuple[Path, int]) -> dict[str, Any]:
    """One run of the real command: the HTML, the JSON and the trace."""
    directory, written = recording
    html, trace = directory / "report.html", directory / "trace.json"
    out = report_cli(str(directory), "--out", str(html), "--json", "--perfetto", str(trace))
    assert out.returncode == 0, out.stderr
    (group,) = json.loads(out.stdout)["groups"]
    return {"group": group, "html": html, "trace": trace, "records": written, "out": out}


def test_the_summary_names_both_ranks_with_their_steps_and_times(report: dict) -> None:
    group = report["group"]
    assert group["ranks"] == RANKS and group["records"] == report["records"]
    assert group["peer_rows"] > 0 and group["steps"] == group["last_step"] + 1
    eps = {(e["rank"], e["node"], e["cause"]): e for e in group["episodes"]}
    assert set(eps) == {(SLOW_RANK, "node-1", "compute"), (HOT_RANK, "node-3", "routing")}
    slow, hot = eps[(SLOW_RANK, "node-1", "compute")], eps[(HOT_RANK, "node-3", "routing")]
    # first_step is the evidence's change point: within a few steps of the onset
    assert SLOW_STEP - 3 <= slow["first_step"] <= SLOW_STEP + 10
    assert HOT_STEP - 3 <= hot["first_step"] <= HOT_STEP + 10
    assert slow["slowdown"] == pytest.approx(1.25, abs=0.03)
    assert hot["last_step"] == group["last_step"] and hot["active"]
    # intervals pass through when the estimators give them, null until then
    assert "slowdown_low" in slow and "slowdown_high" in slow
    # wall-clock times of the steps: within the simulated run after START
    first = datetime.fromisoformat(slow["first_time"])
    assert START < first < datetime.fromisoformat(hot["first_time"])
    assert report["group"]["diagnosis"]["stragglers"][0]["rank"] == SLOW_RANK


def test_gamma_and_skew_over_time_step_up_at_each_onset(report: dict) -> None:
    series = report["group"]["gamma_skew"]
    step = np.array(series["step"])
    gamma = np.array(series["gamma_median"], dtype=float)
    skew = np.array(series["skew_median"], dtype=float)
    before, hot = step < SLOW_STEP, step > HOT_STEP
    slow_only = (step > SLOW_STEP) & (step < HOT_STEP)
    # γ = max / mean over 32 noisy ranks sits near 1.1; a 1.25x GPU lifts it to about 1.25
    assert np.median(gamma[slow_only]) > 1.2 > 1.15 > np.median(gamma[before])
    assert np.median(skew[before]) < 1.2 and np.median(skew[slow_only]) < 1.2
    assert np.median(skew[hot]) > 2.5
    assert (np.array(series["gamma_p99"], dtype=float) >= gamma - 1e-9).all()


def test_the_heatmaps_top_cells_are_rank_13_and_rank_29_after_onset(report: dict) -> None:
    heat = report["group"]["rank_heatmaps"]
    starts = np.array([b[0] for b in heat["step_bins"]])
    compute = np.array(heat["compute_slowdown"], dtype=float)  # [rank, bin]
    load = np.array(heat["load_ratio"], dtype=float)
    assert compute.shape == load.shape == (RANKS, len(starts))
    after_slow, after_hot = starts >= SLOW_STEP + 2, starts >= HOT_STEP + 2
    assert {heat["top_rank_compute"][i] for i in np.flatnonzero(after_slow)} == {SLOW_RANK}
    assert {heat["top_rank_load"][i] for i in np.flatnonzero(after_hot)} == {HOT_RANK}
    # and the straggler is not there before its onset, nor the hot rank's load
    assert np.nanmax(compute[SLOW_RANK, starts < SLOW_STEP - 2]) < 1.05
    assert np.nanmax(load[HOT_RANK, starts < HOT_STEP - 2]) < 1.3
    assert np.nanmin(compute[SLOW_RANK, after_slow]) > 1.2
    # a hot expert's rank computes more tokens at a normal per-token cost
    assert np.nanmax(compute[HOT_RANK, after_hot]) < 1.05


def test_the_hockney_scatter_holds_the_fitted_points_and_line(report: dict) -> None:
    group = report["group"]
    for phase in ("dispatch", "combine"):
        fit, diagnosed = group["hockney"][phase], group["diagnosis"][phase]
        assert fit["points_total"] == diagnosed["n"] == group["steps"] * LAYERS
        assert fit["latency_s"] == diagnosed["latency_s"] > 0
        assert fit["bandwidth_Bps"] == diagnosed["bandwidth_Bps"] > 0
        assert fit["crossover_bytes"] == pytest.approx(fit["latency_s"] * fit["bandwidth_Bps"])
        v, t = np.array(fit["bytes"]), np.array(fit["seconds"])
        line = fit["latency_s"] + v / fit["bandwidth_Bps"]
        assert np.median(np.abs(t - line) / t) < 0.1  # the points lie along the line
        assert fit["regime"] in ("latency-bound", "bandwidth-bound", "unknown")


def test_the_wait_matrix_shows_who_waits_for_whom(report: dict) -> None:
    waits = report["group"]["wait_matrix"]
    assert waits is not None and waits["rows"] == report["group"]["peer_rows"]
    dispatch = np.array(waits["dispatch"]["mean_s"], dtype=float)  # [source, destination]
    combine = np.array(waits["combine"]["mean_s"], dtype=float)
    assert dispatch.shape == combine.shape == (RANKS, RANKS)
    # the hot expert's rank receives the most on dispatch and sends the most back
    assert waits["dispatch"]["top_destination"] == HOT_RANK
    assert waits["combine"]["top_source"] == HOT_RANK
    # after it, everyone waits most for the slow GPU's late combine
    by_source = np.nanmean(combine, axis=1)
    by_source[HOT_RANK] = np.nan
    assert int(np.nanargmax(by_source)) == SLOW_RANK
    lo, hi = waits["worst_interval_steps"]
    assert 0 <= lo <= hi <= report["group"]["last_step"]
    assert np.isfinite(np.array(waits["combine"]["worst_s"], dtype=float)).any()


def test_every_layer_carries_the_hot_expert_of_rank_29(report: dict) -> None:
    layers = report["group"]["layer_skew"]
    hot = next(e for e in report["group"]["episodes"] if e["cause"] == "routing")
    assert layers["since_step"] == hot["first_step"]
    assert layers["layer"] == list(range(LAYERS))
    assert set(layers["top_rank"]) == {HOT_RANK}
    assert min(layers["skew_since"]) > 2.5
    assert all(r > w for r, w in zip(layers["skew_since"], layers["skew_median"], strict=True))


def test_the_html_is_one_self_contained_file(report: dict) -> None:
    text = report["html"].read_text()
    images = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert len(images) == 5 and all(src.startswith("data:image/png;base64,") for src in images)
    links = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert all(link.startswith("data:") for link in links), [x[:40] for x in links]
    assert "<script" not in text
    assert '<td class="compute">13</td><td>node-1</td><td>compute</td>' in text
    assert '<td class="routing">29</td><td>node-3</td><td>routing</td>' in text
    assert f"report: {report['html']}" in report["out"].stderr  # --json: stdout is the JSON


def test_the_html_opens_in_headless_chromium_without_errors(report: dict) -> None:
    if headless.chromium() is None:
        pytest.skip(
            "chromium is not installed: run deploy/install-system-deps.sh as root "
            "(or apt-get install chromium) for this test"
        )
    images_ok = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    page = headless.visit(
        report["html"].resolve().as_uri(), (images_ok, "document.images.length", "document.title")
    )
    assert page.errors() == []
    assert page.console == []  # not even a warning
    assert page.values == {images_ok: True, "document.images.length": 5,
                           "document.title": "epwatch report"}  # fmt: skip
    outside = [u[:60] for u in page.requests if not u.startswith(("data:", "file:"))]
    assert outside == [], "the report must not reach the network"
    from PIL import Image

    shot = Image.open(io.BytesIO(page.screenshot_png)).convert("RGB")
    pixels = np.asarray(shot).reshape(-1, 3)
    assert shot.size[0] >= 800
    not_white = (pixels < 240).any(axis=1).mean()
    colours = len(np.unique(pixels // 16, axis=0))
    assert not_white > 0.05 and colours > 20, (not_white, colours)


def _trace(report: dict) -> list[dict[str, Any]]:
    document = json.loads(report["trace"].read_text())
    assert document["displayTimeUnit"] == "ms"
    return document["traceEvents"]


def test_the_perfetto_trace_is_valid_and_has_one_span_per_collective(
    report: dict, recording: tuple[Path, int]
) -> None:
    events = _trace(report)
    for e in events:
        assert {"ph", "ts", "pid", "tid"} <= e.keys(), e
        assert isinstance(e["ts"], int | float) and np.isfinite(e["ts"])
        if e["ph"] == "X":
            assert e["dur"] >= 0
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == report["records"]
    keys = Counter((e["tid"], e["args"]["step"], e["args"]["layer"], e["cat"]) for e in spans)
    assert len(keys) == len(spans)  # one span per (rank, step, layer, phase)
    assert {e["tid"] for e in spans} == set(range(RANKS))
    assert {e["cat"] for e in spans} == {"dispatch", "combine"}
    # each span carries its own record's bytes, tokens and duration (rank-local clock)
    import pyarrow.parquet as pq

    directory, _ = recording
    recorded = pq.read_table(sorted(directory.glob("records-*.parquet"))).to_pylist()
    phase = {0: "dispatch", 1: "combine"}
    want = {(r["rank"], r["step"], r["layer"], phase[r["phase"]]):
            (r["send_bytes"], r["recv_bytes"], r["recv_tokens"],
             round((r["exit_ns"] - r["enter_ns"]) / 1e3, 3)) for r in recorded}  # fmt: skip
    got = {(e["tid"], e["args"]["step"], e["args"]["layer"], e["cat"]):
           (e["args"]["send_bytes"], e["args"]["recv_bytes"], e["args"]["recv_tokens"],
            round(e["dur"], 3)) for e in spans}  # fmt: skip
    assert got == want
    # one process per node, each rank's thread in its node's process
    names = {e["pid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "process_name"}  # fmt: skip
    node_of_pid = {pid: n.split()[0] for pid, n in names.items() if n.startswith("node-")}
    assert sorted(node_of_pid.values()) == ["node-0", "node-1", "node-2", "node-3"]
    assert {(e["tid"], node_of_pid[e["pid"]]) for e in spans} == {
        (r, f"node-{r // 8}") for r in range(RANKS)
    }
    # flags as instant events on their rank's thread, γ as a counter per analysed step
    flagged = {(e["tid"], e["args"]["cause"]) for e in events if e["ph"] == "i"}
    assert flagged == {(SLOW_RANK, "compute"), (HOT_RANK, "routing")}
    counters = [e for e in events if e["ph"] == "C"]
    assert len(counters) == report["group"]["steps"]
    assert all(c["name"] == "gamma" and c["args"]["p99"] >= c["args"]["median"] for c in counters)


def test_the_trace_lines_ranks_up_on_the_clock_free_basis(report: dict) -> None:
    """Ranks' clocks differ by hours; on the trace every collective ends at one instant
    for all its ranks, steps follow each other, and a rank's combine starts after its
    dispatch of the same layer ended."""
    spans = [e for e in _trace(report) if e["ph"] == "X"]
    ends: dict[tuple, list[float]] = {}
    for e in spans:
        ends.setdefault((e["args"]["step"], e["args"]["layer"], e["cat"]), []).append(
            e["ts"] + e["dur"]
        )
    spread = max(max(v) - min(v) for v in ends.values())
    assert spread < 0.01  # µs: one instant (rounding of the printed times only)
    starts = {}
    for e in spans:
        key = e["args"]["step"]
        starts[key] = min(starts.get(key, np.inf), e["ts"])
    ordered = [starts[s] for s in sorted(starts)]
    assert all(b > a for a, b in itertools.pairwise(ordered))
    by_rank: dict[tuple, dict[str, dict]] = {}
    for e in spans:
        by_rank.setdefault((e["tid"], e["args"]["step"], e["args"]["layer"]), {})[e["cat"]] = e
    late = [k for k, p in by_rank.items()
            if p["combine"]["ts"] < p["dispatch"]["ts"] + p["dispatch"]["dur"] - 1.0]  # fmt: skip
    assert late == []


def test_time_window_and_group_select_and_errors_are_clear(
    recording: tuple[Path, int], report: dict
) -> None:
    directory, _ = recording
    full = report["group"]
    cut = full["episodes"][1]["first_time"]  # when the hot expert was flagged
    out = report_cli(str(directory), "--json", "--from", cut)
    assert out.returncode == 0, out.stderr
    (late,) = json.loads(out.stdout)["groups"]
    assert late["first_step"] >= HOT_STEP and late["records"] < full["records"]
    assert datetime.fromisoformat(late["first_time"]) >= datetime.fromisoformat(cut)
    missing = report_cli(str(directory), "--json", "--ep-group", "nope")
    assert missing.returncode == 2 and "no EP group 'nope'" in missing.stderr
    empty = report_cli(str(directory), "--json", "--to", "2000-01-01")
    assert empty.returncode == 2 and "in the time window" in empty.stderr
    bad = report_cli(str(directory), "--from", "yesterday")
    assert bad.returncode == 2 and "expected an ISO 8601 time" in bad.stderr
    nothing = report_cli(str(directory / "nowhere"))
    assert nothing.returncode == 2 and "no such file or folder" in nothing.stderr
    for out in (missing, empty, bad, nothing):
        assert "Traceback" not in out.stderr


def test_the_live_paths_never_import_pandas_or_matplotlib() -> None:
    code = (
        "import sys\n"
        "import epwatch.collector.service, epwatch.cli.collector, epwatch.cli.replay\n"
        "import epwatch.collector.replay, epwatch.agent.daemon\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


TINY = {
    "seed": 5,
    "steps": 40,
    "cluster": {"ranks": 4, "ranks_per_node": 2, "ep_group": "tiny"},
    "model": {"layers": 2, "experts": 8},
    "probe": {"peer_sample_every": 4},
}


def test_a_group_without_a_complete_step_is_left_out_with_a_note(tmp_path: Path) -> None:
    record_scenario(load_scenario(TINY), tmp_path)
    partial = Recorder(RecorderConfig(str(tmp_path), flush_seconds=0.01), lambda n: None)
    partial.start()
    partial.put("partial", "n9", 16, make_records(64, 16))  # dispatch only: never complete
    partial.stop()
    out = report_cli(str(tmp_path), "--json", "--out", str(tmp_path / "r.html"))
    assert out.returncode == 0, out.stderr
    assert [g["ep_group"] for g in json.loads(out.stdout)["groups"]] == ["tiny"]
    assert "EP group partial: no complete step" in out.stderr
    only = report_cli(str(tmp_path), "--json", "--ep-group", "partial")
    assert only.returncode == 2 and "no EP group has a complete step" in only.stderr


def test_a_malformed_per_peer_file_is_a_clear_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    record_scenario(load_scenario(TINY), tmp_path)
    (good,) = tmp_path.glob("peers-*.parquet")
    table = pq.read_table(good)
    bad = table.set_column(
        table.column_names.index("wait_s"), "wait_s", pa.array(["x"] * table.num_rows)
    )
    pq.write_table(bad, good)
    for command in ("report", "replay"):
        out = subprocess.run(
            [sys.executable, "-m", "epwatch.cli", command, str(tmp_path), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert "per-peer rows" in out.stderr and "Traceback" not in out.stderr


def test_progress_lines_name_each_stage_once_and_stay_quiet_on_small_work() -> None:
    from epwatch.cli.report import Progress

    big = io.StringIO()
    progress = Progress(big, big=True, every_s=3600)
    progress("reading the recording")
    progress("EP group ep0: estimators", 0.25)
    progress("EP group ep0: estimators", 0.5)  # within every_s of the last line: quiet
    progress("drawing the figures")
    lines = big.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "epwatch report: reading the recording",
        "epwatch report: EP group ep0: estimators  25%",
        "epwatch report: drawing the figures",
    ]
    small = io.StringIO()
    quiet = Progress(small, big=False, after_s=3600)
    quiet("reading the recording")
    quiet("EP group ep0: estimators", 0.5)
    assert small.getvalue() == ""


def test_unreadable_files_are_left_out_and_named_on_stderr_in_the_page_and_json(
    tmp_path: Path,
) -> None:
    """A records file and a per-peer file cut short by a crash, beside good ones: the
    report is made from the good files, and says which were left out and why, on
    stderr (as `epwatch replay` does), in the HTML and in the JSON."""
    written = record_scenario(load_scenario(TINY), tmp_path)
    (good_records,) = tmp_path.glob("records-*.parquet")
    (good_peers,) = tmp_path.glob("peers-*.parquet")
    cut_records = tmp_path / "records-29990101T000000Z-1-0001.parquet"
    cut_peers = tmp_path / "peers-29990101T000000Z-1-0001.parquet"
    for good, cut in ((good_records, cut_records), (good_peers, cut_peers)):
        data = good.read_bytes()
        cut.write_bytes(data[: len(data) // 2])  # no footer
    html = tmp_path / "r.html"
    out = report_cli(str(tmp_path), "--json", "--out", str(html))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (group,) = doc["groups"]
    assert group["records"] == written and group["peer_rows"] > 0  # the good files, once
    assert sorted(s["path"] for s in doc["skipped"]) == sorted(map(str, (cut_peers, cut_records)))
    assert all(s["why"] for s in doc["skipped"])
    for cut in (cut_records, cut_peers):
        assert f"epwatch report: skipped {cut}: " in out.stderr
    page = html.read_text()
    assert "2 unreadable recording files left out of this report" in page
    assert str(cut_records) in page and str(cut_peers) in page
    # a clean recording: an empty list in the JSON, no note in the page
    good_only = report_cli(str(good_records), str(good_peers), "--json", "--out", str(html))
    assert good_only.returncode == 0, good_only.stderr
    assert json.loads(good_only.stdout)["skipped"] == []
    assert "skipped" not in good_only.stderr and "unreadable" not in html.read_text()
    # nothing readable: one clear error naming the file, not said twice
    alone = report_cli(str(cut_records), "--json")
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "skipped" not in alone.stderr and len(alone.stderr.splitlines()) == 1
    assert f"no readable recording: {cut_records}: " in alone.stderr
