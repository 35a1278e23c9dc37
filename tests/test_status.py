"""``epwatch status`` against the live demo, and its errors when no collector answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from epwatch.cli import main
from epwatch.cliargs import free_port
from epwatch.webserver import WebServer

SLOW, HOT = (13, "node-1", "compute"), (29, "node-3", "routing")


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epwatch.cli", "status", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_unreachable_collector_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["status", "--collector-url", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the collector at http://127.0.0.1:{port}/api/v1/diagnosis" in err
    assert "Connection refused" in err and "--metrics-listen" in err
    assert main(["status", "--collector-url", "ftp://x"]) == 1
    assert "not an http(s) URL" in capsys.readouterr().err


def test_a_server_without_the_api_is_named_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    server = WebServer(CollectorRegistry(), "127.0.0.1", 0).start()  # /metrics only
    try:
        assert main(["status", "--collector-url", f"http://127.0.0.1:{server.port}"]) == 1
    finally:
        server.stop()
    assert "404, no diagnosis API there" in capsys.readouterr().err


def flags(port: int) -> set[tuple[int, str, str]]:
    url = f"http://127.0.0.1:{port}/api/v1/diagnosis"
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    return {
        (s["rank"], s["node"], s["cause"])
        for g in doc["groups"]
        for s in g["stragglers"]
        if s["active"]
    }


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_live_api_and_status_while_the_demo_runs() -> None:
    """The default story on 32 ranks (shortened): the API lists the slow GPU's rank 13
    as compute and the hot expert's rank 29 as routing while the demo still runs, and
    `status` prints them, once and with --watch."""
    port = free_port()
    demo = subprocess.Popen(
        [
            sys.executable, "-m", "epwatch.cli", "demo", "--ranks=32", "--layers=4",
            "--steps-per-second=10", "--duration=40", f"--metrics-listen=127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        seen: set[tuple[int, str, str]] = set()
        while not {SLOW, HOT} <= seen:
            assert demo.poll() is None, demo.communicate()
            assert time.monotonic() < deadline, f"API flags: {seen}"
            time.sleep(0.5)
            try:
                seen = flags(port)
            except OSError:
                continue
        assert seen == {SLOW, HOT}  # and nothing else

        once = status("--collector-url", f"http://127.0.0.1:{port}")
        assert once.returncode == 0, once.stderr
        assert "rank 13 on node-1: compute, since step" in once.stdout
        assert "rank 29 on node-3: routing, since step" in once.stdout

        watching = subprocess.Popen(
            [sys.executable, "-m", "epwatch.cli", "status", "--collector-url",
             f"127.0.0.1:{port}", "--watch", "0.5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(4)
        watching.send_signal(signal.SIGINT)
        out, err = watching.communicate(timeout=20)
        assert watching.returncode == 0, err
        frames = out.split("\x1b[H\x1b[2J")
        assert len(frames) >= 3, out  # redrawn in place
        last = frames[-1]
        assert "EP group demo: 32 ranks" in last and "γ p50" in last
        assert "rank   13 on node-1: compute" in last and "rank   29 on node-3: routing" in last
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.communicate(timeout=60)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert demo.returncode == 0
