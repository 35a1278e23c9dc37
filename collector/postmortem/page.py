"""The report as one self-contained HTML page: the diagnosis, then each figure as an
embedded PNG (data URI) with a line on how to read it. No scripts, no fonts or styles
from elsewhere: the file opens offline and can be mailed or attached to a ticket."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

from epwatch.collector.estimators.text import format_report
from epwatch.collector.postmortem import plots
from epwatch.collector.postmortem.figures import FigureData

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.compute { border-left: 6px solid #d62728; } td.routing { border-left: 6px solid #ff7f0e; }
td.network { border-left: 6px solid #1f77b4; } td.hang { border-left: 6px solid #7f7f7f; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.skipped { border-left: 6px solid #d62728; padding-left: 0.6em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _figure(image: bytes | None, alt: str, note: str) -> str:
    if image is None:
        return f'<p class="note">{_e(note)}</p>'
    data = base64.b64encode(image).decode("ascii")
    img = f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
    return f'{img}\n<p class="note">{_e(note)}</p>'


def _slowdown(ep: dict[str, Any]) -> str:
    value = ep.get("slowdown")
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.3f}x"
    low, high = ep.get("slowdown_low"), ep.get("slowdown_high")
    if low is not None and high is not None:
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _when(step: int, time: str | None) -> str:
    return f"step {step}" + (f"<br><small>{_e(time)}</small>" if time else "")


def episodes_table(data: FigureData) -> str:
    if not data.episodes:
        return "<p>No straggler was flagged in this window.</p>"
    rows = []
    for ep in data.episodes:
        evidence = "<br>".join(_e(e) for e in ep.get("evidence", [])) or "—"
        state = "active at the end" if ep.get("active") else "cleared"
        rows.append(
            f'<tr><td class="{_e(ep["cause"])}">{_e(ep["rank"])}</td><td>{_e(ep["node"])}</td>'
            f"<td>{_e(ep['cause'])}</td><td>{_slowdown(ep)}</td>"
            f"<td>{_when(ep['first_step'], ep.get('first_time'))}</td>"
            f"<td>{_when(ep['last_step'], ep.get('last_time'))} ({state})</td>"
            f"<td>{evidence}</td></tr>"
        )
    return (
        "<table><tr><th>rank</th><th>node</th><th>cause</th><th>slowdown [interval]</th>"
        "<th>first</th><th>last</th><th>evidence</th></tr>\n" + "\n".join(rows) + "</table>"
    )


def _fits_table(data: FigureData) -> str:
    rows = []
    for name, fit in data.hockney.items():
        regime = _e(fit.get("regime", "unknown"))
        if fit.get("regime_reason"):
            regime += f" ({_e(fit['regime_reason'])})"
        lat, bw, cross = fit.get("latency_s"), fit.get("bandwidth_Bps"), fit.get("crossover_bytes")
        rows.append(
            f"<tr><td>{_e(name)}</td>"
            f"<td>{'n/a' if lat is None else f'{lat * 1e6:.1f} µs'}</td>"
            f"<td>{'n/a' if bw is None else f'{bw / 1e9:.2f} GB/s'}</td>"
            f"<td>{'n/a' if cross is None else f'{cross / 1e3:.0f} KB'}</td>"
            f"<td>{regime}</td></tr>"
        )
    return (
        "<table><tr><th>phase</th><th>L</th><th>BW_eff</th><th>crossover n½</th>"
        "<th>regime</th></tr>" + "".join(rows) + "</table>"
    )


def group_section(data: FigureData) -> str:
    """One EP group: summary, episodes, and the figures."""
    j = data.to_json()
    rec = data.run.recording
    head = (
        f"<h1>epwatch report: EP group {_e(rec.name)}</h1>"
        f"<p>{rec.world_size} ranks on {len(j['nodes'])} nodes; "
        f"{j['records']:,} records and {j['peer_rows']:,} per-peer rows; "
        f"{j['steps']} steps analysed (steps {j['first_step']}–{j['last_step']}), "
        f"received {_e(j['first_time'])} to {_e(j['last_time'])}.</p>"
    )
    parts = [
        head,
        "<h2>Diagnosis</h2>",
        episodes_table(data),
        _fits_table(data),
        "<details><summary>the diagnosis as <code>epwatch replay</code> prints it</summary>"
        f"<pre>{_e(format_report(data.run.report))}</pre></details>",
        "<h2>Straggler factor and routing skew over time</h2>",
        _figure(
            plots.gamma_skew(data),
            "gamma and skew per step",
            "Per step, the median and p99 over layers; shaded: the flagged episodes.",
        ),
        "<h2>Per rank over time</h2>",
        _figure(
            plots.rank_heatmaps(data),
            "per-rank heatmaps",
            "Each cell is a rank's median over a bin of steps. A slow GPU shows as a bright "
            "row on the left (per-token compute over the group median); a hot expert as a "
            "bright row on the right (routed load over the mean) with a normal compute row.",
        ),
        "<h2>Hockney fit per phase</h2>",
        _figure(
            plots.hockney(data),
            "Hockney scatter",
            "Every (layer, step) point the estimators fitted, with the robust line "
            "t = L + V / BW_eff. Per-peer messages below the crossover n½ = L · BW_eff are "
            "latency-bound.",
        ),
        "<h2>Wait matrix</h2>",
        _figure(
            plots.wait_matrix(data),
            "wait matrix",
            "Sampled per-peer rows: how long each destination waited for each source's "
            "data. A bright row is a source everyone waits for (late or slow sender), a "
            "bright column a destination that waits for everyone."
            if data.waits is not None
            else "No wait matrix: no per-peer rows were recorded in this window (they are "
            "sampled on some steps; older recordings have none), or the group is wider "
            "than a readable matrix.",
        ),
        "<h2>Routing skew per layer</h2>",
        _figure(
            plots.layer_skew(data),
            "per-layer skew",
            "Median skew per MoE layer; the title names the rank that receives the most.",
        ),
    ]
    return "\n".join(parts)


def skipped_note(skipped: Sequence[tuple[Any, str]]) -> str:
    """The files the report leaves out because they could not be read, or nothing."""
    if not skipped:
        return ""
    items = "".join(f"<li><code>{_e(path)}</code>: {_e(why)}</li>" for path, why in skipped)
    return (
        f'<p class="skipped"><strong>{len(skipped)} unreadable recording '
        f"file{'s' if len(skipped) != 1 else ''} left out of this report</strong> "
        f"(cut short by a crash, or not an epwatch recording):</p><ul>{items}</ul>"
    )


def render(sections: list[str], skipped: Sequence[tuple[Any, str]] = ()) -> str:
    body = skipped_note(skipped) + "\n<hr>\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<title>epwatch report</title><link rel="icon" href="data:,">'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
