"""A real Prometheus (and Alertmanager) on 127.0.0.1 evaluating epwatch's own rules.

``epwatch demo --prometheus`` and the tests use this to show and prove that the alert
rules in ``dashboards/prometheus/`` fire on what epwatch really exposes. Everything
runs on free loopback ports in a work directory the caller owns; ``for:`` durations
can be shortened so that alerts fire within a demo's or a test's seconds:

    with PromStack(workdir, targets=["127.0.0.1:9401"], for_duration="5s") as stack:
        print(stack.prometheus.url, stack.prometheus.alerts())

Only the standard library is used: the agent's and the collector's dependencies stay
as they are, and Prometheus and Alertmanager are external binaries (Debian packages
``prometheus`` and ``prometheus-alertmanager``).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from epwatch.cliargs import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = REPO_ROOT / "dashboards" / "prometheus"
#: The scrape job the rules expect for the collector (EPCollectorDown).
COLLECTOR_JOB = "epwatch-collector"

INSTALL_HINT = (
    "install Debian's Prometheus and Alertmanager: "
    "apt-get install prometheus prometheus-alertmanager (or run `make system-deps`)"
)


class ServerExited(RuntimeError):
    """The server process is gone: waiting longer cannot help."""


class PromStackError(RuntimeError):
    """A server did not start, answer or produce what was waited for."""


# --------------------------------------------------------------------------- binaries


def find_binary(*names: str) -> str | None:
    """First of `names` on PATH (Debian and upstream name the same tools differently)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def prometheus_binary() -> str | None:
    return find_binary("prometheus")


def promtool_binary() -> str | None:
    return find_binary("promtool")


def alertmanager_binary() -> str | None:
    return find_binary("prometheus-alertmanager", "alertmanager")


def missing_binaries() -> list[str]:
    """Names of the Debian tools (server, promtool, Alertmanager) that are not installed."""
    found = {
        "prometheus": prometheus_binary(),
        "promtool": promtool_binary(),
        "prometheus-alertmanager": alertmanager_binary(),
    }
    return [name for name, path in found.items() if path is None]


# ------------------------------------------------------------------------------ HTTP


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    """GET `url` and decode its JSON body (an HTTP error body too: Prometheus explains)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            return json.loads(body)
        except ValueError:
            raise PromStackError(f"GET {url}: HTTP {err.code}: {body[:500]}") from err


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call `check` until it returns something truthy; PromStackError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except ServerExited as err:
            raise PromStackError(str(err)) from err
        except (OSError, PromStackError) as err:
            last_error = err
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise PromStackError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def labels_match(labels: Mapping[str, str], expected: Mapping[str, str] | None) -> bool:
    """True when every expected label has the expected value."""
    return all(labels.get(key) == value for key, value in (expected or {}).items())


def find_alert(
    alerts: list[dict[str, Any]],
    alertname: str,
    labels: Mapping[str, str] | None,
    field: str,
    value: str,
) -> dict[str, Any] | None:
    """The first alert with that name and labels whose ``field`` (Prometheus' ``state``,
    a webhook's ``status``) is ``value``."""
    for alert in alerts:
        alert_labels = alert.get("labels", {})
        if (
            alert_labels.get("alertname") == alertname
            and alert.get(field) == value
            and labels_match(alert_labels, labels)
        ):
            return alert
    return None


# -------------------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+)(ms|[smhdwy])")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration such as ``30s``, ``1m30s`` or ``500ms``."""
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """A Prometheus duration for `seconds` (whole seconds, else milliseconds)."""
    if seconds < 0:
        raise ValueError(f"negative duration: {seconds}")
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# ---------------------------------------------------------------------------- servers


class _Server:
    """A child process serving HTTP on 127.0.0.1, with its log in the work directory."""

    name = "server"

    def __init__(self, workdir: Path, binary: str | None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if binary is None:
            raise PromStackError(f"{self.name} not found; {INSTALL_HINT}")
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> _Server:
        """Start on a free port and wait for /-/ready; retry if the port got taken."""
        for _attempt in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self._command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                )
            try:
                wait_until(self._ready, timeout, f"{self.name} on {self.url} to be ready")
                return self
            except PromStackError as err:
                exited = self.process.poll() is not None
                self.stop()
                if exited and "address already in use" in self.log_tail().lower():
                    continue
                raise PromStackError(f"{err}\n--- {self.name} log ---\n{self.log_tail()}") from err
        raise PromStackError(f"{self.name}: no free port after 3 tries\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise ServerExited(f"{self.name} exited")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Alertmanager(_Server):
    """Alertmanager (no clustering) that notifies one webhook per alert, or only holds
    the alerts (its UI and API show them) when no webhook is given."""

    name = "alertmanager"

    def __init__(
        self, workdir: Path, webhook_url: str | None = None, binary: str | None = None
    ) -> None:
        super().__init__(workdir, binary or alertmanager_binary())
        self.config_path = self.workdir / "alertmanager.yml"
        receiver: dict[str, Any] = {"name": "webhook" if webhook_url else "hold"}
        if webhook_url:
            receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
        # JSON is YAML; group_by '...' gives each alert its own notification.
        config = {
            "route": {
                "receiver": receiver["name"],
                "group_by": ["..."],
                "group_wait": "0s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [receiver],
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager holds now (API v2)."""
        return list(http_get_json(self.url + "/api/v2/alerts"))


def rule_files() -> list[Path]:
    """The shipped rule files (dashboards/prometheus/*.rules.yml)."""
    return sorted(RULES_DIR.glob("*.rules.yml"))


def _shorten(text: str, key: str, to: str) -> str:
    """Set every `key: <duration>` line to `to` where that is shorter (never longer)."""
    limit = parse_duration(to)

    def one(match: re.Match[str]) -> str:
        if parse_duration(match.group(2)) <= limit:
            return match.group(0)
        return f"{match.group(1)}{key}: {to}"

    pattern = rf"(?m)^(\s+){key}:\s*((?:\d+(?:ms|[smhdwy]))+)\s*$"
    return re.sub(pattern, one, text)


def prepare_rule_files(
    rule_files: Iterable[Path],
    dest_dir: Path,
    for_duration: str | None = None,
    group_interval: str | None = None,
) -> list[Path]:
    """Copy rule files, optionally shortening every `for:` and group `interval:`.

    A demo or a test cannot wait the minutes an alert's `for:` asks for; the
    expressions, labels and annotations stay exactly as committed, and a duration
    already shorter (`for: 0s`) is kept.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in rule_files:
        text = Path(path).read_text()
        if for_duration is not None:
            text = _shorten(text, "for", for_duration)
        if group_interval is not None:
            text = _shorten(text, "interval", group_interval)
        out = dest_dir / Path(path).name
        out.write_text(text)
        written.append(out)
    return written


class Prometheus(_Server):
    """Prometheus scraping `targets` under one job, evaluating `rules` every interval.

    The rules are loaded once every target has been scraped (a reload on SIGHUP), so
    `start` takes about 5 s: Prometheus hands new targets to its scrape loops every
    5 s, and until then ``absent(up{...})`` is true. Production ``for:`` durations
    cover that; shortened ones would turn a fresh Prometheus into an EPCollectorDown
    alert.
    """

    name = "prometheus"

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        rules: Sequence[Path] = (),
        alertmanager_url: str | None = None,
        job: str = COLLECTOR_JOB,
        interval: str = "1s",
        binary: str | None = None,
    ) -> None:
        super().__init__(workdir, binary or prometheus_binary())
        self.config_path = self.workdir / "prometheus.yml"
        self.rules = [str(Path(rule).resolve()) for rule in rules]
        self._config: dict[str, Any] = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        if alertmanager_url:
            parsed = urllib.parse.urlparse(alertmanager_url)
            self._config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [parsed.netloc]}]}]
            }
        self.config_path.write_text(json.dumps(self._config, indent=2))

    def start(self, timeout: float = 30.0) -> Prometheus:
        """Start, wait for the first scrape of every target (up or down), load the rules."""
        super().start(timeout)
        if not self.rules:
            return self

        def scraped() -> bool:
            found = self.targets()  # empty until discovery hands them over
            return bool(found) and all(t["health"] != "unknown" for t in found)

        try:
            if self._config["scrape_configs"][0]["static_configs"][0]["targets"]:
                wait_until(scraped, timeout, "the first scrape of every target")
            self.config_path.write_text(json.dumps({**self._config, "rule_files": self.rules}))
            assert self.process is not None
            self.process.send_signal(signal.SIGHUP)
            wait_until(lambda: self.api("rules")["groups"], timeout, "the rules to load")
        except PromStackError as err:
            self.stop()
            raise PromStackError(f"{err}\n--- {self.name} log ---\n{self.log_tail()}") from err
        return self

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            # Resend firing alerts every second, not every minute: the reload restarts
            # Alertmanager discovery (5 s), and what fires meanwhile must not wait 1 m.
            "--rules.alert.resend-delay=1s",
            "--log.level=warn",
        ]

    def api(self, path: str, timeout: float = 5.0, **params: str) -> Any:
        """GET /api/v1/`path`; the `data` of a success, PromStackError otherwise."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        body = http_get_json(url, timeout=timeout)
        if body.get("status") != "success":
            raise PromStackError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result list (a scalar or string comes back as one item)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Active (pending and firing) alerts."""
        return list(self.api("alerts", timeout=timeout)["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_for_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every configured target was scraped successfully."""

        def all_up() -> list[dict[str, Any]] | None:
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else None

        return wait_until(all_up, timeout, "every scrape target to be up")

    def wait_for_alert(
        self,
        alertname: str,
        labels: Mapping[str, str] | None = None,
        state: str = "firing",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """The first active alert with that name, labels and state (pending/firing)."""

        return wait_until(
            lambda: find_alert(self.alerts(), alertname, labels, "state", state),
            timeout,
            f"{alertname} {labels or ''} to be {state} in Prometheus",
        )


class PromStack:
    """Alertmanager and Prometheus wired together, started and stopped as one (a
    context manager). `for_duration` shortens every alert's `for:` (and the baseline
    groups' intervals) so that alerts fire within seconds; `alertmanager=False` runs
    Prometheus alone; `webhook_url` is where Alertmanager sends its notifications."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        rules: Sequence[Path] | None = None,
        for_duration: str | None = "1s",
        interval: str = "1s",
        job: str = COLLECTOR_JOB,
        alertmanager: bool = True,
        webhook_url: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.rule_sources = list(rule_files() if rules is None else rules)
        self.for_duration = for_duration
        self.interval = interval
        self.job = job
        self.with_alertmanager = alertmanager
        self.webhook_url = webhook_url
        self.alertmanager: Alertmanager | None = None
        self.prometheus: Prometheus | None = None

    def start(self, timeout: float = 30.0) -> PromStack:
        missing = [] if prometheus_binary() else ["prometheus"]
        if self.with_alertmanager and alertmanager_binary() is None:
            missing.append("prometheus-alertmanager")
        if missing:
            raise PromStackError(f"missing {', '.join(missing)}; {INSTALL_HINT}")
        if not self.rule_sources:
            raise PromStackError(f"no rule files in {RULES_DIR} (an incomplete installation?)")
        rules = prepare_rule_files(
            self.rule_sources,
            self.workdir / "rules",
            for_duration=self.for_duration,
            group_interval=self.interval if self.for_duration is not None else None,
        )
        try:
            if self.with_alertmanager:
                self.alertmanager = Alertmanager(self.workdir / "alertmanager", self.webhook_url)
                self.alertmanager.start(timeout)
            self.prometheus = Prometheus(
                self.workdir / "prometheus",
                self.targets,
                rules,
                alertmanager_url=self.alertmanager.url if self.alertmanager else None,
                job=self.job,
                interval=self.interval,
            )
            self.prometheus.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Prometheus first (no more alerts sent), then Alertmanager."""
        for server in (self.prometheus, self.alertmanager):
            if server is not None:
                server.stop()

    def __enter__(self) -> PromStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
