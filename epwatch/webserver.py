"""The HTTP side of the agent and the collector: /metrics from a prometheus-client
registry, plus JSON routes (the collector's live diagnosis), on one threaded server.

prometheus-client's WSGI app renders /metrics (content negotiation, gzip, OpenMetrics);
this module only routes and serves. One server per process, so transport settings
(TLS, authentication) apply to every route alike.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# A JSON route: the query parameters (each name -> its last value) -> (HTTP status,
# JSON-ready body).
JsonRoute = Callable[[Mapping[str, str]], tuple[int, Any]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
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
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._routes = dict(routes or {})
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(
            host, port, self._app, server_class=server_class, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_port)
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


def _json(start_response: StartResponse, status: int, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{status} {_REASONS.get(status, '')}".rstrip(),
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]
