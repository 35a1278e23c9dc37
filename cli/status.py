"""``epwatch status``: the live diagnosis of a running collector, once or like ``top``.

Reads ``GET /api/v1/diagnosis`` on the collector's metrics address (the JSON of
``epwatch simulate --json``) and prints the same report ``simulate`` and ``replay``
print; ``--watch`` redraws a compact view in place every few seconds until Ctrl-C.

A collector whose HTTP side is protected with ``--web-config`` (docs/security.md) is
read over https:// with ``--ca-file`` (the CA that signed its certificate, when not
a system one), ``--cert-file``/``--key-file`` (a client certificate, when it requires
one) and ``--user`` with ``--password-file`` (basic auth; the password is read from
the file, never taken on the command line).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import ssl
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from epwatch.collector.estimators.report import GroupReport, PhaseReport
from epwatch.collector.estimators.text import format_report
from epwatch.collector.service import DIAGNOSIS_PATH
from epwatch.webserver import is_loopback

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
    # No abbreviations: `--password SECRET` must not pass for --password-file.
    p.allow_abbrev = False
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
    tls = p.add_argument_group(
        "a collector protected with --web-config (TLS, client certificates, basic auth)"
    )
    tls.add_argument(
        "--ca-file", metavar="FILE",
        help="CA bundle (PEM) to verify the collector's HTTPS certificate with, instead of "
        "the system's (an https:// --collector-url)",
    )  # fmt: skip
    tls.add_argument(
        "--cert-file", metavar="FILE",
        help="client certificate (PEM) to present, when the collector's web config "
        "requires one; with --key-file",
    )  # fmt: skip
    tls.add_argument("--key-file", metavar="FILE", help="the client certificate's key (PEM)")
    tls.add_argument(
        "--user", metavar="NAME", help="basic auth user (one of basic_auth_users); with "
        "--password-file",
    )  # fmt: skip
    tls.add_argument(
        "--password-file", metavar="FILE",
        help="file whose first line is --user's password (never given on the command line)",
    )  # fmt: skip


@dataclass(frozen=True)
class Access:
    """How to reach a protected collector: the TLS context for https:// and the
    basic auth header, both optional."""

    context: ssl.SSLContext | None = None
    authorization: str | None = None
    client_cert: bool = False


def read_password(path: str) -> str:
    """The password file's first line (without its line end); a file others may read
    works, with a warning."""
    try:
        with open(path, "rb") as f:
            first = f.read(64 << 10).split(b"\n", 1)[0].removesuffix(b"\r")
            mode = os.fstat(f.fileno()).st_mode
    except OSError as err:
        raise StatusError(f"cannot read --password-file {path}: {err.strerror or err}") from None
    if not first:
        raise StatusError(f"--password-file {path}: its first line is empty")
    try:
        password = first.decode()
    except UnicodeDecodeError:
        raise StatusError(f"--password-file {path}: the password is not UTF-8") from None
    if mode & stat.S_IROTH:
        print(
            f"epwatch status: warning: --password-file {path} is readable by every user; "
            "chmod 600 it",
            file=sys.stderr,
        )
    return password


def access(args: argparse.Namespace, url: str) -> Access:
    """The TLS context and credentials the flags ask for, checked against the URL."""
    ca, cert, key = (getattr(args, n, None) for n in ("ca_file", "cert_file", "key_file"))
    user, password_file = getattr(args, "user", None), getattr(args, "password_file", None)
    if (cert is None) != (key is None):
        raise StatusError("--cert-file and --key-file go together (a client certificate)")
    if (user is None) != (password_file is None):
        raise StatusError("--user and --password-file go together (basic auth)")
    if user is not None and ":" in user:
        raise StatusError("--user cannot contain ':' (basic auth)")
    parsed = urllib.parse.urlsplit(url)
    https = parsed.scheme == "https"
    if not https and (ca or cert):
        flag = "--ca-file" if ca else "--cert-file"
        raise StatusError(
            f"{flag} is for TLS: give an https:// --collector-url (the collector serves "
            "https when its --web-config has tls_server_config)"
        )
    context = None
    if https:
        try:
            context = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as err:
            raise StatusError(f"cannot load --ca-file {ca}: {_ssl_reason(err)}") from None
        if cert is not None:
            try:
                context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as err:
                raise StatusError(
                    f"cannot load the client certificate --cert-file {cert} with --key-file "
                    f"{key}: {_ssl_reason(err)} (a PEM certificate and its own PEM key?)"
                ) from None
    authorization = None
    if user is not None:
        assert password_file is not None
        password = read_password(password_file)
        if not https and not is_loopback(parsed.hostname or ""):
            print(
                f"epwatch status: warning: sending the password for {user!r} over plain "
                "http to another machine; use https://",
                file=sys.stderr,
            )
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    return Access(context, authorization, cert is not None)


def _ssl_reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLError):
        return err.reason or str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


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


def fetch(url: str, timeout: float, how: Access | None = None) -> dict[str, Any]:
    """The diagnosis document, or a :class:`StatusError` saying what went wrong."""
    how = how or Access()
    req = urllib.request.Request(url)
    if how.authorization is not None:
        # not forwarded if the collector redirects elsewhere
        req.add_unredirected_header("Authorization", how.authorization)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=how.context) as resp:
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
        if err.code == 401:
            raise StatusError(
                f"{url}: 401, the user or password was refused (--user, --password-file)"
                if how.authorization is not None
                else f"{url}: 401, the collector requires basic auth (its --web-config has "
                "basic_auth_users): pass --user and --password-file"
            ) from None
        raise StatusError(f"{url}: HTTP {err.code} {detail}".rstrip()) from None
    except urllib.error.URLError as err:
        raise StatusError(_unreachable(url, err.reason, how)) from None
    except (OSError, http.client.HTTPException) as err:  # raised while reading the answer
        raise StatusError(_unreachable(url, err, how)) from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise StatusError(f"{url}: answer larger than {MAX_RESPONSE_BYTES >> 20} MiB; refused")
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(f"{url}: the answer is not JSON (not an epwatch collector?)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise StatusError(f"{url}: the answer is not an epwatch diagnosis")
    return doc


def _unreachable(url: str, reason: Any, how: Access) -> str:
    """Why the collector could not be read, with the flag that would help."""
    https = url.startswith("https:")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"cannot verify the collector's certificate at {url}: "
            f"{reason.verify_message or reason.reason} (pass the CA that signed it with "
            "--ca-file)"
        )
    if https and isinstance(reason, ssl.SSLError | ConnectionResetError | EOFError):
        hint = (
            "the collector refused the client certificate (--cert-file, --key-file)"
            if how.client_cert
            else "if the collector's --web-config requires client certificates, pass "
            "--cert-file and --key-file"
        )
        return f"TLS with the collector at {url} failed: {_ssl_reason(reason)} ({hint})"
    if not https and isinstance(reason, ConnectionResetError | EOFError):
        return (
            f"the collector at {url} hung up: {str(reason) or type(reason).__name__} (if "
            "its --web-config serves TLS, use an https:// --collector-url)"
        )
    if isinstance(reason, http.client.HTTPException):
        return (
            f"the collector at {url} did not answer in HTTP: {type(reason).__name__} (if its "
            "--web-config serves TLS, use an https:// --collector-url)"
        )
    return (
        f"cannot reach the collector at {url}: {reason} (is `epwatch collector` running, "
        "and is this its --metrics-listen address?)"
    )


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


def show_once(args: argparse.Namespace, url: str, out: TextIO, how: Access | None = None) -> None:
    doc = fetch(url, args.timeout, how)
    if args.json:
        print(json.dumps(doc), file=out)
        return
    reports = reports_of(doc)
    if not reports:
        print("the collector has no EP group yet (no hook records received)", file=out)
    print("\n\n".join(format_report(r) for r in reports), file=out)


def watch(args: argparse.Namespace, url: str, out: TextIO, how: Access | None = None) -> None:
    """Redraw until Ctrl-C; an unreachable collector is shown, not fatal."""
    while True:
        now = time.strftime("%H:%M:%S")
        try:
            view = watch_view(url, reports_of(fetch(url, args.timeout, how)), now)
        except StatusError as err:
            view = f"epwatch status  {url}  {now}\n\n{err}\n(retrying every {args.watch:g} s)"
        out.write(CLEAR + view + "\n")
        out.flush()
        time.sleep(args.watch)


def run(args: argparse.Namespace) -> int:
    try:
        url = diagnosis_url(args.collector_url, args.ep_group)
        how = access(args, url)
        if args.watch:
            watch(args, url, sys.stdout, how)
        show_once(args, url, sys.stdout, how)
    except StatusError as err:
        print(f"epwatch status: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
