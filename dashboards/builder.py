"""A small builder for provisioning-ready Grafana dashboards backed by Prometheus.

Why not hand-written JSON: ids, grid positions, datasource references and the
variables every query needs are easy to get wrong by hand and tedious to review;
built here they are right by construction and the JSON diff stays readable.
Why not grafana-foundation-sdk: see dashboards/README.md.

Every panel and target points at the `${datasource}` variable, so one JSON file
works against any Prometheus-compatible datasource (Prometheus, Thanos, Mimir).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
SCHEMA_VERSION = 39

Json = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel."""

    expr: str
    legend: str = ""
    table: bool = False  # an instant query rendered as table rows (one per series)
    hidden: bool = False

    def to_json(self, ref_id: str) -> Json:
        out: Json = {
            "datasource": dict(DATASOURCE),
            "editorMode": "code",
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "refId": ref_id,
        }
        if self.table:
            out.update({"format": "table", "instant": True, "range": False})
        else:
            out.update({"range": True, "instant": False})
        if self.hidden:
            out["hide"] = True
        return out


def thresholds(*steps: tuple[float | None, str]) -> Json:
    """Absolute thresholds; the first step's value is None (the base colour)."""
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def value_mappings(mapping: Mapping[str, tuple[str, str]]) -> list[Json]:
    """Map raw values to (text, colour), e.g. {"1": ("latency-bound", "orange")}."""
    options = {
        raw: {"text": text, "color": color, "index": i}
        for i, (raw, (text, color)) in enumerate(mapping.items())
    }
    return [{"type": "value", "options": options}]


@dataclass
class Panel:
    """A visualisation: its type, queries, size and the type-specific JSON parts."""

    kind: str
    title: str
    targets: Sequence[Target]
    description: str = ""
    width: int = 12
    height: int = 8
    unit: str = "short"
    decimals: int | None = None
    min: float | None = None
    max: float | None = None
    steps: Json | None = None
    mappings: list[Json] = field(default_factory=list)
    options: Json = field(default_factory=dict)
    custom: Json = field(default_factory=dict)
    overrides: list[Json] = field(default_factory=list)
    transformations: list[Json] = field(default_factory=list)
    color: Json | None = None

    def to_json(self, panel_id: int, grid: Json) -> Json:
        defaults: Json = {"unit": self.unit, "mappings": self.mappings}
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        defaults["thresholds"] = self.steps or thresholds((None, "green"))
        if self.color is not None:
            defaults["color"] = self.color
        if self.custom:
            defaults["custom"] = self.custom
        out: Json = {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": dict(DATASOURCE),
            "gridPos": grid,
            "targets": [target.to_json(chr(ord("A") + i)) for i, target in enumerate(self.targets)],
            "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
            "options": self.options,
        }
        if self.transformations:
            out["transformations"] = self.transformations
        return out


# ------------------------------------------------------------------ panel factories


def timeseries(
    title: str,
    *targets: Target,
    unit: str = "short",
    description: str = "",
    width: int = 12,
    height: int = 8,
    min: float | None = None,
    max: float | None = None,
    decimals: int | None = None,
    threshold: float | None = None,
    legend_table: bool = False,
    overrides: list[Json] | None = None,
) -> Panel:
    """Lines over time; `threshold` draws a dashed red line (usually an alert's)."""
    custom: Json = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": False,
        "thresholdsStyle": {"mode": "dashed" if threshold is not None else "off"},
    }
    legend: Json = {
        "showLegend": True,
        "displayMode": "table" if legend_table else "list",
        "placement": "right" if legend_table else "bottom",
        "calcs": ["lastNotNull", "max"] if legend_table else [],
    }
    return Panel(
        "timeseries",
        title,
        targets,
        description=description,
        width=width,
        height=height,
        unit=unit,
        decimals=decimals,
        min=min,
        max=max,
        steps=thresholds((None, "green"), (threshold, "red")) if threshold is not None else None,
        custom=custom,
        options={"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}},
        overrides=overrides or [],
    )


def stat(
    title: str,
    target: Target,
    unit: str = "short",
    description: str = "",
    width: int = 3,
    height: int = 4,
    decimals: int | None = None,
    steps: Json | None = None,
    mappings: list[Json] | None = None,
) -> Panel:
    """One number, its colour from `steps`, with a sparkline."""
    return Panel(
        "stat",
        title,
        [target],
        description=description,
        width=width,
        height=height,
        unit=unit,
        decimals=decimals,
        steps=steps,
        mappings=mappings or [],
        color={"mode": "thresholds"},
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    )


def table(
    title: str,
    *targets: Target,
    description: str = "",
    width: int = 12,
    height: int = 8,
    columns: Mapping[str, str] | None = None,
    hide: Sequence[str] = ("Time", "__name__", "job", "instance"),
    overrides: list[Json] | None = None,
    unit: str = "short",
) -> Panel:
    """Rows from instant queries merged on their labels; `columns` renames fields
    ("Value #A" is target A's value), in that order, before the remaining labels."""
    columns = dict(columns or {})
    organize: Json = {
        "excludeByName": dict.fromkeys(hide, True),
        "renameByName": columns,
        "indexByName": {name: i for i, name in enumerate(columns)},
    }
    return Panel(
        "table",
        title,
        [Target(t.expr, t.legend, table=True, hidden=t.hidden) for t in targets],
        description=description,
        width=width,
        height=height,
        unit=unit,
        custom={"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True},
        options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        overrides=overrides or [],
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": organize},
        ],
    )


def heatmap(
    title: str,
    target: Target,
    unit: str = "short",
    description: str = "",
    width: int = 24,
    height: int = 9,
    scheme: str = "Oranges",
    min: float | None = None,
) -> Panel:
    """One row per series (e.g. per rank) over time, coloured by value."""
    color: Json = {
        "mode": "scheme",
        "scheme": scheme,
        "steps": 64,
        "exponent": 0.5,
        "fill": "dark-orange",
        "reverse": False,
        "scale": "exponential",
    }
    if min is not None:
        color["min"] = min
    return Panel(
        "heatmap",
        title,
        [target],
        description=description,
        width=width,
        height=height,
        unit=unit,
        custom={"scaleDistribution": {"type": "linear"}},
        options={
            "calculate": False,
            "cellGap": 1,
            "color": color,
            "rowsFrame": {"layout": "auto"},
            "yAxis": {"axisPlacement": "left", "reverse": False},
            "cellValues": {"unit": unit},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "showValue": "never",
        },
    )


def state_timeline(
    title: str,
    target: Target,
    mapping: Mapping[str, tuple[str, str]],
    description: str = "",
    width: int = 12,
    height: int = 8,
) -> Panel:
    """Discrete states (link up/down, regime) as coloured bands per series."""
    return Panel(
        "state-timeline",
        title,
        [target],
        description=description,
        width=width,
        height=height,
        mappings=value_mappings(mapping),
        color={"mode": "thresholds"},
        options={
            "showValue": "never",
            "mergeValues": True,
            "alignValue": "left",
            "rowHeight": 0.9,
            "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "single", "sort": "none"},
        },
    )


def right_axis(ref_id: str, unit: str) -> Json:
    """Override: target `ref_id` on a right-hand axis with its own unit."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref_id},
        "properties": [
            {"id": "custom.axisPlacement", "value": "right"},
            {"id": "unit", "value": unit},
        ],
    }


def dashed(ref_id: str) -> Json:
    """Override: draw target `ref_id` dashed (baselines, crossovers)."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref_id},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.fillOpacity", "value": 0},
        ],
    }


def link_column(column: str, title: str, url: str) -> Json:
    """Override: make a table column a link (e.g. node -> node dashboard)."""
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [{"id": "links", "value": [{"title": title, "url": url}]}],
    }


# ---------------------------------------------------------------------- variables


def datasource_variable() -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def query_variable(
    name: str, label: str, definition: str, multi: bool = False, include_all: bool = False
) -> Json:
    """A variable filled by label_values(...); `All` matches any non-empty value."""
    out: Json = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": dict(DATASOURCE),
        "definition": definition,
        "query": {"query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {},
        "hide": 0,
        "includeAll": include_all,
        "multi": multi,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }
    if include_all:
        out["allValue"] = ".+"
    return out


# ---------------------------------------------------------------------- dashboards


@dataclass
class Dashboard:
    """Panels in reading order; rows start a new line, panels wrap at 24 columns."""

    uid: str
    title: str
    description: str
    variables: list[Json]
    tags: Sequence[str] = ("epwatch",)
    refresh: str = "10s"
    time_from: str = "now-1h"
    annotations: list[Json] = field(default_factory=list)
    _items: list[Panel | str] = field(default_factory=list)

    def row(self, title: str) -> Dashboard:
        self._items.append(title)
        return self

    def add(self, *panels: Panel) -> Dashboard:
        self._items.extend(panels)
        return self

    def to_json(self) -> Json:
        panels: list[Json] = []
        x = y = line_height = 0
        for panel_id, item in enumerate(self._items, start=1):
            if isinstance(item, str):
                y += line_height
                x, line_height = 0, 0
                panels.append(
                    {
                        "id": panel_id,
                        "type": "row",
                        "title": item,
                        "collapsed": False,
                        "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                        "panels": [],
                    }
                )
                y += 1
                continue
            if x + item.width > GRID_WIDTH:
                y += line_height
                x, line_height = 0, 0
            grid = {"h": item.height, "w": item.width, "x": x, "y": y}
            panels.append(item.to_json(panel_id, grid))
            x += item.width
            line_height = max(line_height, item.height)
        builtin = {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": self.refresh,
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "links": [
                {
                    "title": "epwatch",
                    "type": "dashboards",
                    "tags": ["epwatch"],
                    "asDropdown": True,
                    "includeVars": True,
                    "keepTime": True,
                    "icon": "external link",
                    "targetBlank": False,
                    "tooltip": "",
                    "url": "",
                }
            ],
            "annotations": {"list": [builtin, *self.annotations]},
            "templating": {"list": self.variables},
            "panels": panels,
        }


def alerts_annotation(selector: str) -> Json:
    """Mark firing epwatch alerts matching `selector` (PromQL labels) on every graph."""
    return {
        "name": "Firing alerts",
        "datasource": dict(DATASOURCE),
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "expr": f'ALERTS{{alertstate="firing", {selector}}}',
        "step": "30s",
        "titleFormat": "{{alertname}}",
        "textFormat": "{{severity}} {{ep_group}} {{node}} {{rank}}",
        "tagKeys": "alertname,severity",
        "useValueForTime": False,
    }
