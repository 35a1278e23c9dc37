"""The Grafana dashboards: committed JSON is what the generator makes, and it is sane.

Grafana accepts a lot of broken JSON silently (a panel without a datasource shows
"No data", overlapping panels just overlap), so the checks here are the ones a
reviewer would otherwise do by eye. That every query returns data from a real
Prometheus is checked by tests/test_promstack.py and the integration test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from epwatch.dashboards.builder import DATASOURCE, GRID_WIDTH
from epwatch.dashboards.generate import DASHBOARDS, build_all, dashboards_json, main, stale_files
from tests.promstack import (
    GRAFANA_BUILTINS,
    GRAFANA_DIR,
    RULES_DIR,
    contract_metric_names,
    dashboard_files,
    dashboard_queries,
    iter_panels,
    metric_names_in,
)

BOARDS = dashboards_json()
REQUIRED_VARIABLES = {"datasource", "ep_group", "node"}


def _recorded_names() -> set[str]:
    return set(
        re.findall(
            r"(?m)^\s*- record:\s*(\S+)",
            "".join(path.read_text() for path in RULES_DIR.glob("*.rules.yml")),
        )
    )


def test_committed_json_is_current() -> None:
    stale = stale_files()
    assert not stale, f"stale dashboards {stale}: run `python -m epwatch.dashboards.generate`"
    assert sorted(p.name for p in dashboard_files()) == sorted(DASHBOARDS)


def test_generator_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", "--out", str(tmp_path)]) == 1  # nothing there yet
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "extra.json").write_text("{}")
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "extra.json" in capsys.readouterr().out


def test_generation_is_deterministic() -> None:
    assert build_all() == build_all()


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_is_provisioning_ready(name: str) -> None:
    board = BOARDS[name]
    assert board["uid"] and len(board["uid"]) <= 40
    assert "id" not in board, "provisioned dashboards must not carry a database id"
    assert board["title"].startswith("epwatch / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) >= REQUIRED_VARIABLES
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE
            assert var["definition"].startswith("label_values(")


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_has_datasource_targets_ids_and_grid(name: str) -> None:
    board = BOARDS[name]
    panels = list(iter_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    for panel in panels:
        where = f"{name}: {panel.get('title')!r}"
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), where
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "hwxy"), where
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH, where
        if panel["type"] == "row":
            continue
        assert panel["title"], where
        assert panel["datasource"] == DATASOURCE, where
        targets = panel["targets"]
        assert targets, f"{where}: no targets"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target.get("expr", "").strip(), f"{where}: target without expr"
            assert target["datasource"] == DATASOURCE, where
        assert "unit" in panel["fieldConfig"]["defaults"], where


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_do_not_overlap(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(BOARDS[name]["panels"]):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_queries_use_contract_metrics_recorded_rules_and_known_variables(name: str) -> None:
    contract = contract_metric_names()
    recorded = _recorded_names()
    board = BOARDS[name]
    defined = {v["name"] for v in board["templating"]["list"]} | set(GRAFANA_BUILTINS)
    for query in dashboard_queries(board):
        unknown = metric_names_in(query.expr) - contract
        assert not unknown, f"{query}: not in docs/contracts.md: {unknown}"
        for used in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", query.expr):
            assert used in recorded, f"{query}: no recording rule makes {used}"
        for var in re.findall(r"\$\{?(\w+)", query.expr):
            assert var in defined, f"{query}: undefined variable ${var}"


def test_ep_group_page_has_what_an_operator_needs() -> None:
    """γ, skew/balancedness, L and BW_eff per phase with the regime, the per-rank
    heatmap, the straggler table with evidence, and ingest health."""
    board = BOARDS["epwatch-ep-group.json"]
    exprs = " ".join(q.expr for q in dashboard_queries(board))
    for metric in (
        "epwatch_straggler_factor_ratio",
        "epwatch_routing_skew_ratio",
        "epwatch_routing_balancedness_ratio",
        "epwatch_collective_latency_seconds",
        "epwatch_collective_bandwidth_bytes_per_second",
        "epwatch_collective_latency_bound",
        "epwatch_straggler{",
        "epwatch_straggler_evidence",
        "epwatch_ingest_records",
    ):
        assert metric in exprs, metric
    kinds = {p["type"] for p in iter_panels(board["panels"])}
    assert {"heatmap", "table", "state-timeline", "stat", "timeseries"} <= kinds


def test_committed_files_parse_as_json() -> None:
    for path in GRAFANA_DIR.glob("*.json"):
        data: dict[str, Any] = json.loads(path.read_text())
        assert data["uid"] == BOARDS[path.name]["uid"]
