"""The agent's and collector's HTTP server: /metrics and JSON routes, on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from epwatch.webserver import WebServer


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("epwatch_test_things", "Things", registry=registry).inc(3)
    seen: list[dict[str, str]] = []

    def echo(query):
        seen.append(dict(query))
        if query.get("fail"):
            return 400, {"error": "asked to fail"}
        return 200, {"query": dict(query)}

    srv = WebServer(registry, "127.0.0.1", 0, routes={"/api/v1/echo": echo}).start()
    yield srv, seen
    srv.stop()


def test_metrics_and_a_json_route_share_the_port(server) -> None:
    srv, seen = server
    status, ctype, body = get(srv.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert b"epwatch_test_things_total 3.0" in body
    status, ctype, body = get(srv.port, "/api/v1/echo?ep_group=g1&x=1&x=2")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == {"query": {"ep_group": "g1", "x": "2"}}
    status, _, body = get(srv.port, "/api/v1/echo/?fail=1")
    assert status == 400 and json.loads(body) == {"error": "asked to fail"}
    assert len(seen) == 2


def test_unknown_paths_are_404_json(server) -> None:
    srv, _ = server
    status, ctype, body = get(srv.port, "/api/v1/nothing")
    assert (status, ctype) == (404, "application/json")
    assert "no route" in json.loads(body)["error"]
