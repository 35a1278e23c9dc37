"""``epwatch demo --prometheus`` on a real Prometheus and Alertmanager.

Two demos run side by side, each with its own Prometheus (1 s scrape and evaluation
intervals, every ``for:`` shortened to 1 s) and Alertmanager, which notifies a webhook
receiver of this test:

- the default story (a slow GPU, later a hot expert): every query of every dashboard
  panel returns data, EPStragglerRank fires for the slow GPU's rank with cause
  ``compute``, the webhook receives it and the demo prints it;
- a clean cluster (``--clean``): at no second is any alert pending or firing, and the
  webhook hears nothing. An alert here is a bug in a rule or in the simulated data.

Both demos stop on SIGINT, and their Prometheus goes with them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from epwatch.cli.demo_view import AlertWatch, alert_line
from tests.promstack import (
    INSTALL_HINT,
    WebhookReceiver,
    dashboard_files,
    empty_dashboard_queries,
    http_get_json,
    labels_match,
    missing_binaries,
)

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

SLOW_GPU = {"ep_group": "demo", "rank": "13", "node": "node-1", "cause": "compute"}
VARIABLES = {"ep_group": "demo", "node": "node-1", "datasource": "prometheus"}
CLEAN_WATCH_S = 25.0  # seconds of a clean run in which no alert may show up


class Demo:
    """An ``epwatch demo --prometheus`` subprocess whose output is read as it comes."""

    def __init__(self, *extra: str, webhook: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "epwatch.cli",
                "demo",
                "--ranks=16",
                "--layers=8",
                "--steps-per-second=10",
                "--duration=60",  # an upper bound: the test interrupts it
                "--metrics-listen=127.0.0.1:0",
                "--prometheus",
                "--prometheus-for=1",
                f"--alertmanager-webhook={webhook}",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output}")

    def prometheus_url(self) -> str:
        return self.wait_for_line(r"^Prometheus: (http://127\.0\.0\.1:\d+) ", 60).group(1)

    def interrupt(self) -> int:
        """Ctrl-C; the exit status once the demo has stopped and printed its diagnosis."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def active_alerts(url: str) -> list[dict[str, Any]]:
    return list(http_get_json(f"{url}/api/v1/alerts", timeout=3)["data"]["alerts"])


class AlertRecorder:
    """Every alert a Prometheus shows (pending or firing), polled once a second."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                alerts = active_alerts(self.url)
            except OSError:
                continue
            self.polls += 1
            self.seen += [(a["labels"]["alertname"], a["state"], a["labels"]) for a in alerts]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _answers(url: str) -> bool:
    try:
        http_get_json(f"{url}/-/ready", timeout=2)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def test_demo_fires_the_straggler_alert_fills_every_panel_and_stays_silent_when_clean() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; {INSTALL_HINT}")
    started = time.monotonic()
    with WebhookReceiver() as hook, WebhookReceiver() as clean_hook:
        faulty = Demo(webhook=hook.url)
        clean = Demo("--clean", webhook=clean_hook.url)
        recorder: AlertRecorder | None = None
        try:
            url, clean_url = faulty.prometheus_url(), clean.prometheus_url()
            recorder = AlertRecorder(clean_url)
            clean.wait_for_line(r"^\s+t\s+step", 30)  # the table: ranks are running
            clean_started = time.monotonic()

            # (b) the slow GPU's rank fires with cause compute, in Prometheus ...
            deadline = time.monotonic() + 60
            while not any(
                a["labels"]["alertname"] == "EPStragglerRank"
                and a["state"] == "firing"
                and labels_match(a["labels"], SLOW_GPU)
                for a in active_alerts(url)
            ):
                assert time.monotonic() < deadline, f"no EPStragglerRank:\n{faulty.output}"
                time.sleep(0.5)
            # ... reaches Alertmanager's webhook, and the demo says so.
            sent = hook.wait_for_alert("EPStragglerRank", SLOW_GPU, timeout=30)
            assert "rank 13 on node-1 is a compute straggler" in sent["annotations"]["summary"]
            faulty.wait_for_line(
                r'FIRING\s+EPStragglerRank\{cause="compute", ep_group="demo", node="node-1", '
                r'rank="13", severity="warning"\}: EP group demo: rank 13 on node-1',
                10,
            )

            # (a) every query of every dashboard panel returns data.
            deadline = time.monotonic() + 30
            while empty := empty_dashboard_queries(url, dashboard_files(), VARIABLES):
                if time.monotonic() > deadline:
                    pytest.fail("dashboard queries without data:\n" + "\n".join(map(str, empty)))
                time.sleep(1)

            # (c) the clean cluster, watched for long enough to fire anything it would.
            time.sleep(max(0.0, clean_started + CLEAN_WATCH_S - time.monotonic()))
            recorder.stop()
            query = f"{clean_url}/api/v1/query?query=epwatch_group_last_step"
            assert http_get_json(query)["data"]["result"], "the clean Prometheus has no data"
        finally:
            if recorder is not None:
                recorder.stop()
            rcs: list[int | None] = []
            for demo in (faulty, clean):
                try:
                    rcs.append(demo.interrupt())
                except subprocess.TimeoutExpired:
                    rcs.append(None)
                finally:
                    demo.kill()
        assert rcs == [0, 0], f"{faulty.output}\n-----\n{clean.output}"
        assert recorder.polls >= CLEAN_WATCH_S - 5
        assert recorder.seen == [], f"alerts in a clean run: {recorder.seen}"
        assert clean_hook.alerts() == []
        assert "FIRING" not in clean.output and "stragglers: none" in clean.output
        assert "alerts firing at the end: none" in clean.output
        # Ctrl-C stopped each demo's Prometheus with it.
        assert not _answers(url) and not _answers(clean_url)
    assert time.monotonic() - started < 90


class _FakePrometheus:
    """What AlertWatch reads of a Prometheus: whether it runs and its active alerts."""

    def __init__(self) -> None:
        self.active: list[dict[str, Any]] = []
        self.running = True
        self.log_path = "prometheus.log"

    def alerts(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        return self.active


def test_alert_watch_says_when_an_alert_fires_and_resolves_not_while_pending() -> None:
    prom = _FakePrometheus()
    watch = AlertWatch(prom)  # type: ignore[arg-type]
    alert = {
        "labels": {"alertname": "EPStragglerRank", "rank": "13", "job": "j", "instance": "i"},
        "annotations": {"summary": "EP group demo:\n rank 13 is slow"},
        "state": "pending",
    }
    prom.active = [alert]
    assert watch.poll(3) == []
    prom.active = [{**alert, "state": "firing"}]
    assert watch.poll(4) == [
        '   4s FIRING   EPStragglerRank{rank="13"}: EP group demo: rank 13 is slow'
    ]
    assert watch.poll(5) == []
    prom.active = []
    assert watch.poll(9) == ['   9s RESOLVED EPStragglerRank{rank="13"}']
    prom.running = False
    assert watch.poll(10) == ["  10s Prometheus exited; see prometheus.log"]
    assert watch.poll(11) == []
    assert alert_line(1, "RESOLVED", {"labels": {}}) == "   1s RESOLVED ?{}"


@pytest.mark.timeout(60)
def test_demo_without_prometheus_says_how_to_install_it_and_runs_on(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "epwatch.cli",
            "demo",
            "--ranks=8",
            "--layers=2",
            "--duration=2",
            "--metrics-listen=127.0.0.1:0",
            "--prometheus",
        ],
        env={**os.environ, "PATH": str(tmp_path)},  # no prometheus on it
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    assert "apt-get install prometheus prometheus-alertmanager" in out.stderr
    assert "EP group demo" in out.stdout  # the diagnosis: the demo ran without it
