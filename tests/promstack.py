"""Real Prometheus and Alertmanager for tests, and a check of every dashboard query.

The alert rules and dashboards are only worth something if a real Prometheus loads
them, evaluates them against what epwatch really exposes, and a real Alertmanager
delivers the alerts. ``epwatch.cli.promstack`` starts both on 127.0.0.1 (free ports, a
work directory, 1 s scrape and evaluation intervals); this module adds a tiny webhook
receiver that records what Alertmanager posts, and the dashboard query check:

    with PromStack(tmp_path, targets=["127.0.0.1:9478"]) as stack:
        stack.prometheus.wait_for_alert("EPStragglerRank", labels={"rank": "5"})
        stack.webhook.wait_for_alert("EPStragglerRank")
        empty = empty_dashboard_queries(stack.prometheus, dashboard_files(), {...})

Only the standard library is used, so that the helper runs wherever the tests run.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from epwatch.cli import promstack as _product
from epwatch.cli.promstack import (
    COLLECTOR_JOB,
    INSTALL_HINT,
    REPO_ROOT,
    RULES_DIR,
    Alertmanager,
    Prometheus,
    PromStackError,
    alertmanager_binary,
    find_alert,
    find_binary,
    free_port,
    http_get_json,
    labels_match,
    missing_binaries,
    prepare_rule_files,
    prometheus_binary,
    promtool_binary,
    rule_files,
    wait_until,
)

__all__ = [
    "CONTRACTS",
    "GRAFANA_BUILTINS",
    "GRAFANA_DIR",
    "INSTALL_HINT",
    "REPO_ROOT",
    "RULES_DIR",
    "Alertmanager",
    "PanelQuery",
    "PromStack",
    "PromStackError",
    "Prometheus",
    "WebhookReceiver",
    "alertmanager_binary",
    "contract_metric_names",
    "dashboard_files",
    "dashboard_queries",
    "empty_dashboard_queries",
    "find_binary",
    "free_port",
    "http_get_json",
    "iter_panels",
    "labels_match",
    "metric_names_in",
    "missing_binaries",
    "prepare_rule_files",
    "prometheus_binary",
    "promtool_binary",
    "rule_files",
    "substitute_variables",
]

GRAFANA_DIR = REPO_ROOT / "dashboards" / "grafana"
CONTRACTS = REPO_ROOT / "docs" / "contracts.md"

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

        return wait_until(
            lambda: find_alert(self.alerts(), alertname, labels, "status", status),
            timeout,
            f"webhook to receive {status} {alertname} {labels or ''}",
        )

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PromStack(_product.PromStack):
    """Webhook receiver, Alertmanager and Prometheus wired together (a context manager);
    every alert Alertmanager sends lands in `webhook`."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        rules: Sequence[Path] | None = None,
        for_duration: str | None = "1s",
        interval: str = "1s",
        job: str = COLLECTOR_JOB,
    ) -> None:
        super().__init__(workdir, targets, rules, for_duration, interval, job, alertmanager=True)
        self.webhook = WebhookReceiver()

    def start(self, timeout: float = 30.0) -> PromStack:
        missing = missing_binaries()
        if missing:
            raise PromStackError(f"missing {', '.join(missing)}; {INSTALL_HINT}")
        self.webhook.start()
        self.webhook_url = self.webhook.url
        try:
            super().start(timeout)
        except BaseException:
            self.webhook.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Prometheus first (no more alerts sent), then Alertmanager, then the webhook."""
        super().stop()
        self.webhook.stop()


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
