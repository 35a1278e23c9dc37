"""The HTTP side of the agent and the collector: /metrics from a prometheus-client
registry, plus JSON routes (the collector's live diagnosis), on one threaded server.

prometheus-client's WSGI app renders /metrics (content negotiation, gzip, OpenMetrics);
this module only routes and serves. One server per process, so transport settings
(``--web-config``: TLS, client certificates, basic auth; epwatch.webconfig) apply to
every route alike, and a route added later is covered without doing anything.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from epwatch.webconfig import WebSecurity, certificate_names

__all__ = ["JsonRoute", "WebSecurity", "WebServer", "is_loopback", "warn_if_exposed"]

# A JSON route: the query parameters (each name -> its last value) -> (HTTP status,
# JSON-ready body).
JsonRoute = Callable[[Mapping[str, str]], tuple[int, Any]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed",
}
MAX_CONNECTIONS = 64
CONNECTION_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most ``MAX_CONNECTIONS`` at once; with TLS the
    handshake runs in that thread (with a timeout), so a client that connects and
    says nothing holds one slot for a while, never the accept loop."""

    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None
    allowed_sans: frozenset[str] = frozenset()
    _slots = threading.BoundedSemaphore(1)  # replaced per server in WebServer

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: refuse rather than queue without bound
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT_S)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a failed handshake (no or a wrong client certificate): hang up
        try:
            if self.allowed_sans and not certificate_names(tls.getpeercert()) & self.allowed_sans:
                return
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S  # a slow or silent client does not hold a thread long

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every second would flood stderr; the access log is not ours to keep."""


class WebServer:
    """/metrics of ``registry`` and the given JSON routes on ``host:port`` (0: any)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        routes: Mapping[str, JsonRoute] | None = None,
        security: WebSecurity | None = None,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._routes = dict(routes or {})
        self.security = security or WebSecurity()
        base = _ThreadingServer6 if ":" in host else _ThreadingServer
        server_class = type("WebServerImpl", (base,), {
            "ssl_context": self.security.ssl_context,
            "allowed_sans": self.security.allowed_sans,
            "_slots": threading.BoundedSemaphore(MAX_CONNECTIONS),
        })
        self._server = make_server(
            host, port, self._app, server_class=server_class, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_port)
        warn_if_exposed("HTTP (/metrics)", host, self.security.tls or bool(self.security.auth),
                        "--web-config with tls_server_config or basic_auth_users")
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http", daemon=True
        )

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        auth = self.security.auth
        if auth is not None and not auth.check(environ.get("HTTP_AUTHORIZATION")):
            return _json(start_response, 401, {"error": "authentication required"},
                         [("WWW-Authenticate", 'Basic realm="epwatch"')])
        if self.security.headers:
            start_response = _with_headers(start_response, self.security.headers)
        path = environ.get("PATH_INFO") or "/"
        if path in ("/metrics", "/"):
            return self._metrics(environ, start_response)
        route = self._routes.get(path.rstrip("/"))
        if route is None:
            return _json(start_response, 404, {"error": f"no route {path}"})
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _json(start_response, 405, {"error": "only GET"})
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        status, body = route(query)
        return _json(start_response, status, body)


def _json(
    start_response: StartResponse,
    status: int,
    body: Any,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{status} {_REASONS.get(status, '')}".rstrip(),
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
         *(extra or [])],
    )
    return [data]


def _with_headers(start_response: StartResponse, headers: Mapping[str, str]) -> StartResponse:
    def start(status: str, response_headers: list[tuple[str, str]], *args: Any) -> Any:
        return start_response(status, [*response_headers, *headers.items()], *args)

    return start


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(what: str, host: str, protected: bool, remedy: str) -> None:
    """Say so, and what to do, when a port other machines can reach has no protection."""
    if not protected and not is_loopback(host):
        log.warning(
            "%s listens on %s without TLS or authentication: anyone who can reach it "
            "may use it; use %s (see docs/security.md)",
            what,
            host or "every address",
            remedy,
        )
