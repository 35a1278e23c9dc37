"""``epwatch demo`` end to end: agents as subprocesses, ranks over Unix sockets, the
collector's live /metrics, the diagnosis JSON as the last line, and the run's
recording with its HTML report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epwatch.cliargs import free_port
from tests.helpers import samples, scrape

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_demo_finds_the_slow_gpu_and_the_hot_expert(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "epwatch.cli",
            "demo",
            "--ranks=16",
            "--layers=8",
            "--steps-per-second=10",
            "--duration=9",
            f"--metrics-listen=127.0.0.1:{port}",
            "--json",
            f"--record={tmp_path}",
            "--report",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        live = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                text = scrape(port)
            except OSError:
                continue
            if ("13", "compute") in {
                (dict(k)["rank"], dict(k)["cause"]) for k in samples(text, "epwatch_straggler")
            }:
                live = text
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert live, "the slow GPU never showed on the live /metrics"
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=live, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr
    lines = out.strip().splitlines()
    assert any("γ p50" in line for line in lines)  # the live table
    diagnosis = json.loads(lines[-1])
    (group,) = diagnosis["groups"]
    found = {(s["rank"], s["node"], s["cause"]) for s in group["stragglers"]}
    assert found == {(13, "node-1", "compute"), (14, "node-1", "routing")}  # and no other
    assert group["dispatch"]["bandwidth_Bps"] > 0
    slow = next(s for s in group["stragglers"] if s["rank"] == 13)
    assert any("thermal" in line for line in slow["evidence"])  # from the node samples
    # --record --report: the run's recording (records and per-peer rows) and its report
    assert f"report: {tmp_path / 'report.html'}" in lines
    assert list(tmp_path.glob("records-*.parquet")) and list(tmp_path.glob("peers-*.parquet"))
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert '<td class="compute">13</td><td>node-1</td>' in page


def test_an_unwritable_record_folder_is_a_clear_error(tmp_path: Path) -> None:
    """--record under a regular file: one line naming the folder, exit 2, no traceback,
    before any agent starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "demo", "--ranks=4", "--ranks-per-node=2",
         "--layers=2", "--duration=1", "--metrics-listen=127.0.0.1:0",
         f"--record={blocker / 'rec'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("epwatch demo: --record folder ")
    assert f"{blocker / 'rec'} is not writable" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
