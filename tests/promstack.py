"""Real Prometheus and Alertmanager for tests, and a check of every dashboard query.

The alert rules and dashboards are only worth something if a real Prometheus loads
them, evaluates them against what epwatch really exposes, and a real Alertmanager
delivers the alerts. This module starts both on 127.0.0.1 (free ports, a temporary
directory, 1 s scrape and evaluation intervals), with a tiny webhook receiver that
records what Alertmanager posts, and stops them cleanly:

    with PromStack(tmp_path, targets=["127.0.0.1:9478"]) as stack:
        stack.prometheus.wait_for_alert("EPStragglerRank", labels={"rank": "5"})
        stack.webhook.wait_for_alert("EPStragglerRank")
        empty = empty_dashboard_queries(stack.prometheus, dashboard_files(), {...})

Only the standard library is used, so that the helper runs wherever the tests run.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = REPO_ROOT / "dashboards" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "dashboards" / "grafana"
CONTRACTS = REPO_ROOT / "docs" / "contracts.md"

INSTALL_HINT = (
    "install Debian's Prometheus and Alertmanager: "
    "apt-get install prometheus prometheus-alertmanager (or run `make system-deps`)"
)

#: Values for Grafana's built-in variables when a dashboard query runs as an instant
#: query. The stacks scrape every second, so a minute holds plenty of samples.
GRAFANA_BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}


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
    """Names of the tools this module needs that are not installed."""
    found = {
        "prometheus": prometheus_binary(),
        "promtool": promtool_binary(),
        "prometheus-alertmanager": alertmanager_binary(),
    }
    return [name for name, path in found.items() if path is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call `check` until it returns something truthy; PromStackError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, PromStackError) as err:
            last_error = err
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise PromStackError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def labels_match(labels: Mapping[str, str], expected: Mapping[str, str] | None) -> bool:
    """True when every expected label has the expected value."""
    return all(labels.get(key) == value for key, value in (expected or {}).items())


# ------------------------------------------------------------------- webhook receiver


class WebhookReceiver:
    """Records every JSON document POSTed to it (what Alertmanager's webhook sends)."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise PromStackError("webhook receiver is not started")
        return f"http://127.0.0.1:{self._server.server_port}/alerts"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"invalid_json": body.decode(errors="replace")}
                with receiver._lock:
                    receiver.payloads.append(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every notification received so far, oldest first."""
        with self._lock:
            return [alert for payload in self.payloads for alert in payload.get("alerts", [])]

    def wait_for_alert(
        self,
        alertname: str,
        labels: Mapping[str, str] | None = None,
        status: str = "firing",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """The first received alert with that name, labels and status (firing/resolved)."""

        def find() -> dict[str, Any] | None:
            for alert in self.alerts():
                alert_labels = alert.get("labels", {})
                if (
                    alert_labels.get("alertname") == alertname
                    and alert.get("status") == status
                    and labels_match(alert_labels, labels)
                ):
                    return alert
            return None

        return _wait(find, timeout, f"webhook to receive {status} {alertname} {labels or ''}")

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
                _wait(self._ready, timeout, f"{self.name} on {self.url} to be ready")
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
            raise PromStackError(f"{self.name} exited")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

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
    """Alertmanager that sends every alert at once to one webhook (no clustering)."""

    name = "alertmanager"

    def __init__(self, workdir: Path, webhook_url: str, binary: str | None = None) -> None:
        super().__init__(workdir, binary or alertmanager_binary())
        self.config_path = self.workdir / "alertmanager.yml"
        # JSON is YAML; group_by '...' gives each alert its own notification.
        config = {
            "route": {
                "receiver": "webhook",
                "group_by": ["..."],
                "group_wait": "0s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {
                    "name": "webhook",
                    "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
                }
            ],
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


def prepare_rule_files(
    rule_files: Iterable[Path],
    dest_dir: Path,
    for_duration: str | None = None,
    group_interval: str | None = None,
) -> list[Path]:
    """Copy rule files, optionally shortening every `for:` and group `interval:`.

    Tests cannot wait the minutes an alert's `for:` asks for; the expressions,
    labels and annotations stay exactly as committed.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in rule_files:
        text = Path(path).read_text()
        if for_duration is not None:
            text = re.sub(
                r"(?m)^(\s+)for:\s*(?:\d+(?:ms|[smhdwy]))+\s*$", rf"\g<1>for: {for_duration}", text
            )
        if group_interval is not None:
            text = re.sub(
                r"(?m)^(\s+)interval:\s*(?:\d+(?:ms|[smhdwy]))+\s*$",
                rf"\g<1>interval: {group_interval}",
                text,
            )
        out = dest_dir / Path(path).name
        out.write_text(text)
        written.append(out)
    return written


def rule_files() -> list[Path]:
    """The committed rule files."""
    return sorted(RULES_DIR.glob("*.rules.yml"))


class Prometheus(_Server):
    """Prometheus scraping `targets` under one job, evaluating `rules` every interval."""

    name = "prometheus"

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        rules: Sequence[Path] = (),
        alertmanager_url: str | None = None,
        job: str = "epwatch-collector",
        interval: str = "1s",
        binary: str | None = None,
    ) -> None:
        super().__init__(workdir, binary or prometheus_binary())
        self.config_path = self.workdir / "prometheus.yml"
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(Path(rule).resolve()) for rule in rules],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        if alertmanager_url:
            parsed = urllib.parse.urlparse(alertmanager_url)
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [parsed.netloc]}]}]
            }
        self.config_path.write_text(json.dumps(config, indent=2))

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path`; the `data` of a success, PromStackError otherwise."""
        query = urllib.parse.urlencode(params)
        body = http_get_json(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
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

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending and firing) alerts."""
        return list(self.api("alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_for_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every configured target was scraped successfully."""

        def all_up() -> list[dict[str, Any]] | None:
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else None

        return _wait(all_up, timeout, "every scrape target to be up")

    def wait_for_query(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until `expr` returns a non-empty result."""
        return _wait(lambda: self.query(expr), timeout, f"a result for {expr!r}")

    def wait_for_alert(
        self,
        alertname: str,
        labels: Mapping[str, str] | None = None,
        state: str = "firing",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """The first active alert with that name, labels and state (pending/firing)."""

        def find() -> dict[str, Any] | None:
            for alert in self.alerts():
                alert_labels = alert.get("labels", {})
                if (
                    alert_labels.get("alertname") == alertname
                    and alert.get("state") == state
                    and labels_match(alert_labels, labels)
                ):
                    return alert
            return None

        return _wait(find, timeout, f"{alertname} {labels or ''} to be {state} in Prometheus")


class PromStack:
    """Webhook receiver, Alertmanager and Prometheus wired together, started and stopped
    as one (a context manager). `for_duration` shortens every alert's `for:` (and the
    baseline groups' intervals) so that alerts fire within seconds."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        rules: Sequence[Path] | None = None,
        for_duration: str | None = "1s",
        interval: str = "1s",
        job: str = "epwatch-collector",
    ) -> None:
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.rule_sources = list(rule_files() if rules is None else rules)
        self.for_duration = for_duration
        self.interval = interval
        self.job = job
        self.webhook = WebhookReceiver()
        self.alertmanager: Alertmanager | None = None
        self.prometheus: Prometheus | None = None

    def start(self, timeout: float = 30.0) -> PromStack:
        missing = missing_binaries()
        if missing:
            raise PromStackError(f"missing {', '.join(missing)}; {INSTALL_HINT}")
        rules = prepare_rule_files(
            self.rule_sources,
            self.workdir / "rules",
            for_duration=self.for_duration,
            group_interval=self.interval if self.for_duration is not None else None,
        )
        try:
            self.webhook.start()
            self.alertmanager = Alertmanager(self.workdir / "alertmanager", self.webhook.url)
            self.alertmanager.start(timeout)
            self.prometheus = Prometheus(
                self.workdir / "prometheus",
                self.targets,
                rules,
                alertmanager_url=self.alertmanager.url,
                job=self.job,
                interval=self.interval,
            )
            self.prometheus.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Prometheus first (no more alerts sent), then Alertmanager, then the webhook."""
        for server in (self.prometheus, self.alertmanager):
            if server is not None:
                server.stop()
        self.webhook.stop()

    def __enter__(self) -> PromStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ------------------------------------------------------------------ dashboard queries


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL query of a dashboard: where it is, as written, and as it will run."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    query: str = ""
    reason: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = f"{self.dashboard} / {self.panel} / {self.ref_id}"
        return f"{where}: {self.query or self.expr}" + (f" ({self.reason})" if self.reason else "")


_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*$", re.S)


def substitute_variables(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana's `$var`, `${var}`, `${var:fmt}` and `[[var]]` with concrete values.

    Grafana's built-ins ($__rate_interval, ...) default to GRAFANA_BUILTINS. An unknown
    variable raises KeyError: a query that cannot be run cannot be checked.
    """
    values = {**GRAFANA_BUILTINS, **variables}

    def one(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def load_dashboard(dashboard: Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(dashboard, Mapping):
        return dict(dashboard)
    return dict(json.loads(Path(dashboard).read_text()))


def dashboard_files() -> list[Path]:
    """The committed Grafana dashboards."""
    return sorted(GRAFANA_DIR.glob("*.json"))


def iter_panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(
    dashboard: Path | Mapping[str, Any], variables: Mapping[str, str] | None = None
) -> list[PanelQuery]:
    """Every query of a dashboard: panel targets, and template variables' label_values().

    With `variables`, `query` holds the expression with the variables substituted.
    """
    board = load_dashboard(dashboard)
    title = str(board.get("title", "?"))
    found: list[PanelQuery] = []
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        definition = var.get("query")
        if isinstance(definition, Mapping):
            definition = definition.get("query", "")
        match = _LABEL_VALUES.match(str(definition or ""))
        if match is None:
            continue
        selector, label = match.group(1), match.group(2)
        # label_values(metric, label) has a value exactly when this returns a series.
        expr = (
            f"group by ({label}) ({selector.strip()})"
            if selector
            else f'group by ({label}) ({{{label}!=""}})'
        )
        found.append(PanelQuery(title, f"variable ${var.get('name')}", "label_values", expr))
    for panel in iter_panels(board.get("panels", [])):
        for target in panel.get("targets", []) or []:
            expr = target.get("expr")
            if expr and not target.get("hide"):
                found.append(
                    PanelQuery(
                        title, str(panel.get("title", "?")), str(target.get("refId", "?")), expr
                    )
                )
    if variables is not None:
        found = [replace(q, query=substitute_variables(q.expr, variables)) for q in found]
    return found


def empty_dashboard_queries(
    prometheus: Prometheus | str,
    dashboards: Iterable[Path | Mapping[str, Any]],
    variables: Mapping[str, str],
) -> list[PanelQuery]:
    """Run every dashboard query as an instant query; return those without data.

    `reason` says "empty" or carries Prometheus's error (a broken query is worse than
    an empty one). `variables` maps dashboard variables (ep_group, node, datasource, ...)
    to the concrete values of the running system.
    """
    if isinstance(prometheus, str):
        url = prometheus.rstrip("/")

        def run(expr: str) -> list[dict[str, Any]]:
            body = http_get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            if body.get("status") != "success":
                raise PromStackError(f"{body.get('errorType')}: {body.get('error')}")
            return list(body["data"]["result"])

    else:
        run = prometheus.query
    problems: list[PanelQuery] = []
    for dashboard in dashboards:
        for q in dashboard_queries(dashboard, variables):
            try:
                if not run(q.query):
                    problems.append(replace(q, reason="empty"))
            except PromStackError as err:
                problems.append(replace(q, reason=str(err)))
    return problems


# ------------------------------------------------------------------------ contract


def contract_metric_names(path: Path = CONTRACTS) -> set[str]:
    """Metric names docs/contracts.md defines (expanding `..._receive_...` shorthands)."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            continue
        previous = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if token.startswith("epwatch_"):
                names.add(token)
                previous = token
            elif token.startswith("...") and previous:
                # `a_transmit_b`, `..._receive_...` means `a_receive_b`
                word = token.strip(".").strip("_")
                for other in ("transmit", "receive"):
                    if other in previous and other != word:
                        names.add(previous.replace(other, word))
    return names


def metric_names_in(expr: str) -> set[str]:
    """epwatch_* metric names an expression reads (recorded names with ':' excluded)."""
    return set(re.findall(r"(?<![\w:])(epwatch_[a-z0-9_]+)(?![\w:])", expr))
