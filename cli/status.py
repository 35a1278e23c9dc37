"""``epwatch status``: the live diagnosis of a running collector, once or like ``top``.

Reads ``GET /api/v1/diagnosis`` on the collector's metrics address (the JSON of
``epwatch simulate --json``) and prints the same report ``simulate`` and ``replay``
print; ``--watch`` redraws a compact view in place every few seconds until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

from epwatch.collector.estimators.report import GroupReport, PhaseReport
from epwatch.collector.estimators.text import format_report
from epwatch.collector.service import DIAGNOSIS_PATH

DEFAULT_URL = "http://127.0.0.1:9401"
MAX_RESPONSE_BYTES = 64 << 20  # a diagnosis of 64 groups of 1024 ranks is far below
CLEAR = "\x1b[H\x1b[2J"


class StatusError(Exception):
    """The collector could not be asked, or did not answer with a diagnosis."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 0.1..3600 seconds, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--collector-url",
        default=DEFAULT_URL,
        metavar="URL",
        help="the collector's metrics address, where it serves /metrics and "
        f"{DIAGNOSIS_PATH} (default %(default)s, `epwatch collector --metrics-listen`)",
    )
    p.add_argument("--ep-group", metavar="NAME", help="only this EP group")
    p.add_argument("--json", action="store_true", help="print the diagnosis JSON as served")
    p.add_argument(
        "--watch",
        type=_seconds,
        metavar="SECONDS",
        help="refresh in place every SECONDS (like top): γ, skew, L, BW_eff and the flagged "
        "ranks with their cause, until Ctrl-C",
    )
    p.add_argument(
        "--timeout", type=_seconds, default=5.0, metavar="SECONDS",
        help="how long to wait for the collector (default %(default)s)",
    )  # fmt: skip


def diagnosis_url(base: str, ep_group: str | None) -> str:
    """``base`` + the API path (+ the group filter); ``base`` may already name the path."""
    parsed = urllib.parse.urlsplit(base if "://" in base else f"http://{base}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StatusError(f"not an http(s) URL: {base!r}")
    path = parsed.path.rstrip("/")
    if not path.endswith(DIAGNOSIS_PATH):
        path += DIAGNOSIS_PATH
    query = urllib.parse.urlencode({"ep_group": ep_group}) if ep_group else ""
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, query, ""))


def fetch(url: str, timeout: float) -> dict[str, Any]:
    """The diagnosis document, or a :class:`StatusError` saying what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as err:
        detail = _error_text(err)
        if err.code == 404 and "no EP group" in detail:
            raise StatusError(detail) from None
        if err.code == 404:
            raise StatusError(
                f"{url}: 404, no diagnosis API there (an epwatch collector's metrics address "
                "is what --collector-url wants; older collectors have no live diagnosis)"
            ) from None
        raise StatusError(f"{url}: HTTP {err.code} {detail}".rstrip()) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StatusError(
            f"cannot reach the collector at {url}: {reason} (is `epwatch collector` running, "
            "and is this its --metrics-listen address?)"
        ) from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise StatusError(f"{url}: answer larger than {MAX_RESPONSE_BYTES >> 20} MiB; refused")
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(f"{url}: the answer is not JSON (not an epwatch collector?)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise StatusError(f"{url}: the answer is not an epwatch diagnosis")
    return doc


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read(4096)).get("error", ""))
    except Exception:
        return ""


def reports_of(doc: dict[str, Any]) -> list[GroupReport]:
    try:
        return [GroupReport.from_json(g) for g in doc["groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StatusError(f"the diagnosis is malformed: {err!r}") from None


def _n(v: float, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v * scale:{fmt}}{unit}"


def _phase(name: str, p: PhaseReport) -> str:
    if p.fit_problem:
        return f"{name:<8} L -  BW_eff -  ({p.fit_problem})"
    return (
        f"{name:<8} L {_n(p.latency_s, '.0f', 1e6, ' µs')}  BW_eff "
        f"{_n(p.bandwidth_Bps, '.2f', 1e-9, ' GB/s')}  R² {_n(p.r2, '.2f')}  {p.regime}"
    )


def watch_view(url: str, reports: list[GroupReport], now: str) -> str:
    """The compact view ``--watch`` redraws."""
    lines = [f"epwatch status  {url}  {now}", ""]
    if not reports:
        lines.append("no EP group has reported yet")
    for r in reports:
        lines.append(
            f"EP group {r.ep_group}: {r.ranks} ranks, step {r.last_step}  "
            f"γ p50 {_n(r.gamma_median, '.3f')} p99 {_n(r.gamma_p99, '.3f')}  "
            f"skew p50 {_n(r.skew_median, '.2f')} max {_n(r.skew_max, '.2f')}"
            + (f"  STALLED {r.stalled_s:.0f} s" if r.stalled_s and r.stalled_s > 0 else "")
        )
        for name in ("dispatch", "combine"):
            if name in r.phases:
                lines.append("  " + _phase(name, r.phases[name]))
        active = [s for s in r.stragglers if s.active]
        if not active:
            lines.append("  flagged: none")
        for s in active:
            how = (
                f"stalled {r.stalled_s:.0f} s" if s.cause == "hang"
                else f"x{_n(s.slowdown, '.2f')}"
            )  # fmt: skip
            lines.append(
                f"  rank {s.rank:>4} on {s.node or '?'}: {s.cause:<8} {how:<10} "
                f"since step {s.first_step}" + (f"  ({s.evidence[0]})" if s.evidence else "")
            )
        lines.append("")
    return "\n".join(lines)


def show_once(args: argparse.Namespace, url: str, out: TextIO) -> None:
    doc = fetch(url, args.timeout)
    if args.json:
        print(json.dumps(doc), file=out)
        return
    reports = reports_of(doc)
    if not reports:
        print("the collector has no EP group yet (no hook records received)", file=out)
    print("\n\n".join(format_report(r) for r in reports), file=out)


def watch(args: argparse.Namespace, url: str, out: TextIO) -> None:
    """Redraw until Ctrl-C; an unreachable collector is shown, not fatal."""
    while True:
        now = time.strftime("%H:%M:%S")
        try:
            view = watch_view(url, reports_of(fetch(url, args.timeout)), now)
        except StatusError as err:
            view = f"epwatch status  {url}  {now}\n\n{err}\n(retrying every {args.watch:g} s)"
        out.write(CLEAR + view + "\n")
        out.flush()
        time.sleep(args.watch)


def run(args: argparse.Namespace) -> int:
    try:
        url = diagnosis_url(args.collector_url, args.ep_group)
        if args.watch:
            watch(args, url, sys.stdout)
        show_once(args, url, sys.stdout)
    except StatusError as err:
        print(f"epwatch status: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
