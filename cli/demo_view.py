"""What the demo prints: a table row per second from the collector's newest report,
and the alerts Prometheus starts or stops firing."""

from __future__ import annotations

import math
from typing import Any

from epwatch.cli import promstack
from epwatch.collector.estimators.report import GroupReport, PhaseReport


def _num(v: Any, scale: float = 1.0, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v * scale:{fmt}}"


HEADER = (
    f"{'t':>5} {'step':>5}  {'γ p50':>6} {'γ p99':>6}  {'skew':>5} {'max':>5}  "
    f"{'L disp':>8} {'BW_eff disp':>12}  {'regime':<15}  flagged"
)


def table_row(elapsed: float, rep: GroupReport | None) -> str:
    """One line of the live table: γ, skew, the dispatch fit and the flagged ranks."""
    rep = rep or GroupReport("", 0, steps=0, last_step=-1)
    disp = rep.phases.get("dispatch", PhaseReport())
    flagged = ", ".join(
        f"{s.rank}@{s.node} {s.cause} x{_num(s.slowdown)}" for s in rep.stragglers if s.active
    )
    return (
        f"{elapsed:>4.0f}s {rep.last_step:>5}  "
        f"{_num(rep.gamma_median, fmt='.3f'):>6} "
        f"{_num(rep.gamma_p99, fmt='.3f'):>6}  {_num(rep.skew_median):>5} "
        f"{_num(rep.skew_max):>5}  {_num(disp.latency_s, 1e6, '.0f') + ' µs':>8} "
        f"{_num(disp.bandwidth_Bps, 1e-9, '.1f') + ' GB/s':>12}  "
        f"{disp.regime if rep.phases else '-':<15}  {flagged or '-'}"
    )


_QUIET_LABELS = frozenset({"alertname", "job", "instance"})


def alert_key(alert: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Identity of an alert: its name and labels (as Prometheus and Alertmanager see it)."""
    labels = alert.get("labels") or {}
    return str(labels.get("alertname", "?")), tuple(sorted(labels.items()))


def alert_line(elapsed: float, event: str, alert: dict[str, Any]) -> str:
    """``  16s FIRING   EPStragglerRank{cause="compute", ...}: summary``."""
    labels = alert.get("labels") or {}
    shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k not in _QUIET_LABELS)
    summary = " ".join(str((alert.get("annotations") or {}).get("summary", "")).split())
    line = f"{elapsed:>4.0f}s {event:<8} {labels.get('alertname', '?')}{{{shown}}}"
    return f"{line}: {summary}" if summary and event == "FIRING" else line


class AlertWatch:
    """Polls Prometheus's alerts API and says when an alert starts firing or resolves
    (pending alerts are not news yet: their `for:` has not passed)."""

    def __init__(self, prometheus: promstack.Prometheus) -> None:
        self.prometheus = prometheus
        self.firing: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
        self._lost = False

    def poll(self, elapsed: float) -> list[str]:
        """Lines for what changed since the last poll; none while Prometheus is away."""
        if not self.prometheus.running:
            if self._lost:
                return []
            self._lost = True
            return [f"{elapsed:>4.0f}s Prometheus exited; see {self.prometheus.log_path}"]
        try:
            active = self.prometheus.alerts(timeout=2.0)
        except (OSError, ValueError, promstack.PromStackError):
            return []
        now = {alert_key(a): a for a in active if a.get("state") == "firing"}
        lines = [alert_line(elapsed, "FIRING", a) for k, a in now.items() if k not in self.firing]
        lines += [
            alert_line(elapsed, "RESOLVED", a) for k, a in self.firing.items() if k not in now
        ]
        self.firing = now
        return lines
