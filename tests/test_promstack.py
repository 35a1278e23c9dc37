"""The real Prometheus + Alertmanager helper, proven against a tiny target of our own.

A prometheus-client server on 127.0.0.1 exposes a few contract metrics (one rank
flagged as a compute straggler); the real Prometheus scrapes it with the committed
rules (their `for:` shortened to 1s), EPStragglerRank must reach `firing` with the
straggler's labels, and Alertmanager must deliver it to the webhook. The dashboard
query check runs against the same Prometheus. Until the collector exists this is
the whole live check; the integration test will point the same helper at it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from epwatch.cli.promstack import format_duration, parse_duration
from tests.promstack import (
    INSTALL_HINT,
    PanelQuery,
    PromStack,
    dashboard_files,
    dashboard_queries,
    empty_dashboard_queries,
    missing_binaries,
    prepare_rule_files,
    rule_files,
    substitute_variables,
)

STRAGGLER = {"ep_group": "g0", "rank": "5", "node": "node-b", "cause": "compute"}


def _skip_without_binaries() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; {INSTALL_HINT}")


@pytest.fixture
def tiny_target() -> Iterator[str]:
    """A /metrics endpoint with a flagged straggler and a little group state."""
    registry = CollectorRegistry()
    straggler = Gauge(
        "epwatch_straggler",
        "present while the rank is flagged (value = slowdown)",
        ["ep_group", "rank", "node", "cause"],
        registry=registry,
    )
    evidence = Gauge(
        "epwatch_straggler_evidence",
        "1 per evidence line",
        ["ep_group", "rank", "node", "cause", "evidence"],
        registry=registry,
    )
    world = Gauge("epwatch_group_world_size", "P", ["ep_group"], registry=registry)
    slowdown = Gauge(
        "epwatch_rank_compute_slowdown_ratio",
        "per-token compute over the group median",
        ["ep_group", "rank", "node"],
        registry=registry,
    )
    steps = Counter("epwatch_group_steps", "steps finalised", ["ep_group"], registry=registry)
    straggler.labels(**STRAGGLER).set(1.8)
    evidence.labels(**STRAGGLER, evidence="per-token compute 1.80x group median").set(1)
    world.labels(ep_group="g0").set(8)
    for rank in range(8):
        node = "node-b" if rank >= 4 else "node-a"
        value = 1.8 if rank == 5 else 1.0
        slowdown.labels(ep_group="g0", rank=str(rank), node=node).set(value)
    steps.labels(ep_group="g0").inc(100)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_prepare_rule_files_shortens_for_and_intervals_only(tmp_path: Path) -> None:
    sources = rule_files()
    written = prepare_rule_files(sources, tmp_path, for_duration="1s", group_interval="1s")
    for source, copy in zip(sources, written, strict=True):
        before, after = source.read_text(), copy.read_text()
        assert "for: 1s" in after and "for: 30s" not in after
        assert "interval: 1m" not in after
        # nothing but `for:` and `interval:` lines changed
        changed = [
            (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
        ]
        assert all(b.strip().startswith(("for:", "interval:")) for _, b in changed)


def test_prepare_rule_files_never_lengthens_a_duration(tmp_path: Path) -> None:
    source = tmp_path / "x.rules.yml"
    source.write_text(
        "groups:\n  - name: g\n    interval: 5s\n    rules:\n"
        "      - alert: A\n        for: 0s\n      - alert: B\n        for: 1m30s\n"
    )
    (copy,) = prepare_rule_files([source], tmp_path / "out", for_duration="2s",
                                 group_interval="10s")  # fmt: skip
    text = copy.read_text()
    assert "for: 0s" in text and "for: 2s" in text and "interval: 5s" in text


def test_durations_round_trip() -> None:
    assert parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5
    assert format_duration(5) == "5s" and format_duration(0.25) == "250ms"
    with pytest.raises(ValueError):
        parse_duration("5 minutes")


def test_substitute_variables_handles_grafana_syntaxes() -> None:
    values = {"ep_group": "g0", "node": "node-b"}
    expr = 'rate(x{ep_group="$ep_group", node=~"${node:regex}"}[$__rate_interval]) [[node]]'
    assert substitute_variables(expr, values) == 'rate(x{ep_group="g0", node=~"node-b"}[1m]) node-b'
    with pytest.raises(KeyError, match="gpu"):
        substitute_variables('x{gpu="$gpu"}', values)


def test_dashboard_queries_include_variables_and_every_panel() -> None:
    queries = dashboard_queries(dashboard_files()[0], {"ep_group": "g0", "node": "n"})
    assert any(q.ref_id == "label_values" for q in queries)
    assert all("$" not in q.query for q in queries)


@pytest.mark.timeout(120)
def test_straggler_alert_fires_in_prometheus_and_reaches_the_webhook(
    tmp_path: Path, tiny_target: str
) -> None:
    _skip_without_binaries()
    started = time.monotonic()
    with PromStack(tmp_path, targets=[tiny_target]) as stack:
        assert stack.prometheus is not None and stack.alertmanager is not None
        stack.prometheus.wait_for_targets_up(timeout=20)
        assert stack.prometheus.query('epwatch_straggler{rank="5"}')[0]["value"][1] == "1.8"

        alert = stack.prometheus.wait_for_alert("EPStragglerRank", STRAGGLER, timeout=30)
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["job"] == "epwatch-collector"
        assert "rank 5 on node-b is a compute straggler (1.80x" in alert["annotations"]["summary"]
        # the description's query() reached the evidence series through the live TSDB
        assert "per-token compute 1.80x group median" in alert["annotations"]["description"]

        sent = stack.webhook.wait_for_alert("EPStragglerRank", STRAGGLER, timeout=30)
        assert sent["labels"]["severity"] == "warning"
        assert sent["annotations"]["summary"] == alert["annotations"]["summary"]
        held = [
            a for a in stack.alertmanager.alerts() if a["labels"]["alertname"] == "EPStragglerRank"
        ]
        assert held and held[0]["status"]["state"] == "active"

        # No other alert fires from this healthy-but-for-one-rank target.
        assert {a["labels"]["alertname"] for a in stack.prometheus.alerts()} == {"EPStragglerRank"}

        # The dashboard check: panels fed by the target answer, the rest come back empty,
        # and no query is broken (a PromQL error would carry its message as reason).
        variables = {"ep_group": "g0", "node": "node-b", "datasource": "prometheus"}
        problems = empty_dashboard_queries(stack.prometheus, dashboard_files(), variables)
        assert all(p.reason == "empty" for p in problems), [
            str(p) for p in problems if p.reason != "empty"
        ]
        empty = {(p.dashboard, p.panel, p.ref_id) for p in problems}
        assert ("epwatch / EP group", "Current stragglers", "A") not in empty
        assert ("epwatch / EP group", "Evidence", "A") not in empty
        assert ("epwatch / EP group", "Per-token compute slowdown by rank", "A") not in empty
        assert ("epwatch / Fleet overview", "Straggler ranks", "A") not in empty
        assert ("epwatch / EP group", "variable $node", "label_values") not in empty
        # the tiny target has no first_step series and no GPU metrics
        assert ("epwatch / EP group", "Current stragglers", "B") in empty
        assert ("epwatch / Node", "SM clock", "A") in empty
        total = sum(len(dashboard_queries(d)) for d in dashboard_files())
        assert 0 < len(problems) < total
        assert all(isinstance(p, PanelQuery) for p in problems)
    assert time.monotonic() - started < 60
