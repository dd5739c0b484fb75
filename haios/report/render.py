# SPDX-License-Identifier: Apache-2.0
"""Render a `Report`: a self-contained HTML page, JSON, and a terminal summary.

The HTML comes from Jinja2 templates shipped as package data, with
autoescaping on for every value: everything from os_root is untrusted text
and reaches the page only escaped (no `|safe` on report data). The page
loads nothing: its one stylesheet and one script are inline, allowed by
their SHA-256 in a Content-Security-Policy meta tag whose default is
`'none'` (no network, no fonts, no images, no other script), and its
pictures (DAG, timeline, budget bars) are inline SVG built from numbers
computed here and escaped strings. The terminal summary uses rich `Text`
objects, never markup, so report text cannot style or inject output.
Pure: returns strings and renderables.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from rich.table import Table
from rich.text import Text

from haios.models.common import parse_rfc3339
from haios.report.model import KillEvent, Report, StepFinding
from haios.report.steps import OUTPUT_SHOWN_BYTES

#: steps drawn in the DAG and timeline pictures (the tables list them all)
MAX_DRAWN_STEPS: Final = 400
#: audit records listed in the page (the JSON carries them all)
MAX_AUDIT_ROWS: Final = 20_000
_STATUSES: Final = frozenset({"pending", "running", "succeeded", "failed", "timed_out",
                              "killed", "skipped"})
_NODE_W: Final = 150
_NODE_H: Final = 24
_COL_GAP: Final = 50
_ROW_GAP: Final = 10
_TIMELINE_W: Final = 900
_LABEL_W: Final = 170
_ROW_H: Final = 18


def status_class(status: str | None) -> str:
    """A CSS class for a status; unknown values share one class (never raw text)."""
    return f"st-{status}" if status in _STATUSES else "st-other"


@dataclasses.dataclass(frozen=True)
class _Node:
    """A DAG node: step id, top-left corner, status class."""

    id: str
    x: int
    y: int
    status: str


@dataclasses.dataclass(frozen=True)
class _Edge:
    """A DAG edge from a need (right side) to its step (left side)."""

    x1: int
    y1: int
    x2: int
    y2: int


def dag_view(steps: Sequence[StepFinding]) -> dict[str, Any]:
    """Node and edge geometry of the plan's DAG: one column per level."""
    drawn = list(steps[:MAX_DRAWN_STEPS])
    rows: dict[int, int] = {}
    nodes: dict[str, _Node] = {}
    for step in drawn:
        row = rows.get(step.level, 0)
        rows[step.level] = row + 1
        nodes[step.id] = _Node(step.id, 10 + step.level * (_NODE_W + _COL_GAP),
                               10 + row * (_NODE_H + _ROW_GAP), status_class(step.status))
    edges = [
        _Edge(nodes[need].x + _NODE_W, nodes[need].y + _NODE_H // 2,
              nodes[step.id].x, nodes[step.id].y + _NODE_H // 2)
        for step in drawn for need in step.needs if need in nodes
    ]
    width = 20 + (max(rows, default=0) + 1) * (_NODE_W + _COL_GAP)
    height = 20 + max(rows.values(), default=1) * (_NODE_H + _ROW_GAP)
    return {"nodes": list(nodes.values()), "edges": edges, "width": width, "height": height,
            "node_w": _NODE_W, "node_h": _NODE_H, "omitted": len(steps) - len(drawn)}


def _seconds(value: str | None) -> float | None:
    """An RFC 3339 time as POSIX seconds, or None when absent or malformed."""
    if value is None:
        return None
    try:
        return parse_rfc3339(value).timestamp()
    except ValueError:
        return None


def timeline_view(steps: Sequence[StepFinding], kills: Sequence[KillEvent]) -> dict[str, Any]:
    """Bars of every attempt on a shared time axis, and kill markers."""
    drawn = list(steps[:MAX_DRAWN_STEPS])
    spans = [(s, a, _seconds(a.started), _seconds(a.finished)) for s in drawn for a in s.history]
    times = [t for _, _, start, end in spans for t in (start, end) if t is not None]
    times += [t for t in (_seconds(k.time) for k in kills) if t is not None]
    if not times:
        return {"rows": [], "kills": [], "width": 0, "height": 0, "omitted": 0, "ticks": []}
    first, last = min(times), max(times)
    scale = _TIMELINE_W / max(last - first, 1e-3)
    index = {step.id: i for i, step in enumerate(drawn)}
    bars = []
    for step, attempt, start, end in spans:
        begin = start if start is not None else end
        if begin is None:
            continue
        stop = end if end is not None else last
        bars.append({
            "x": round(_LABEL_W + (begin - first) * scale, 1),
            "y": 20 + index[step.id] * _ROW_H,
            "w": round(max((stop - begin) * scale, 2.0), 1),
            "cls": status_class(attempt.status or "running"),
            "title": f"{step.id} attempt {attempt.attempt}: {attempt.status or 'no end recorded'}"
                     f" ({max(stop - begin, 0.0):.3f} s)",
        })
    markers = []
    for kill in kills:
        at = _seconds(kill.time)
        if at is None:
            continue
        row = index.get(kill.step_id or "")
        markers.append({
            "x": round(_LABEL_W + (at - first) * scale, 1),
            "y1": 14 if row is None else 18 + row * _ROW_H,
            "y2": 22 + len(drawn) * _ROW_H if row is None else 20 + (row + 1) * _ROW_H,
            "title": f"{kill.kind} {kill.scope or ''} {kill.flag or ''} {kill.step_id or ''}",
        })
    span = last - first
    ticks = [{"x": round(_LABEL_W + i * _TIMELINE_W / 4, 1), "label": f"+{span * i / 4:.2f} s"}
             for i in range(5)]
    return {"rows": [{"id": s.id, "y": 20 + i * _ROW_H} for i, s in enumerate(drawn)],
            "bars": bars, "kills": markers, "width": _LABEL_W + _TIMELINE_W + 60,
            "height": 40 + len(drawn) * _ROW_H, "omitted": len(steps) - len(drawn),
            "ticks": ticks, "label_w": _LABEL_W}


def _inline(name: str) -> tuple[Markup, str]:
    """A static asset shipped with the package, and its CSP source expression."""
    text = resources.files("haios.report").joinpath("templates", name).read_text("utf-8")
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
    # Markup: this is the package's own file, never os_root data.
    return Markup(text), f"'sha256-{digest}'"  # noqa: S704


def format_number(value: float) -> str:
    """A quantity for people: whole numbers grouped, others to four significant digits."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _environment() -> Environment:
    """The Jinja2 environment: package templates, autoescape, strict undefined."""
    env = Environment(loader=PackageLoader("haios.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["cls"] = status_class
    env.filters["num"] = format_number
    env.filters["compact_json"] = lambda value: json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return env


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document."""
    css, style_src = _inline("report.css")
    script, script_src = _inline("report.js")
    csp = (f"default-src 'none'; style-src {style_src}; script-src {script_src}; "
           "img-src 'none'; font-src 'none'; connect-src 'none'; base-uri 'none'; "
           "form-action 'none'")
    entries = report.audit.entries if report.audit is not None else []
    template = _environment().get_template("report.html.j2")
    return template.render(
        r=report, csp=csp, css=css, script=script,
        dag=dag_view(report.steps), timeline=timeline_view(report.steps, report.kills),
        audit_rows=entries[:MAX_AUDIT_ROWS], audit_omitted=max(len(entries) - MAX_AUDIT_ROWS, 0),
        audit_kinds=sorted({e.kind for e in entries}),
        checks=sorted(report.checks, key=lambda c: ("fail", "warn", "skipped", "ok").index(
            c.result)),
        output_bytes=OUTPUT_SHOWN_BYTES,
        step_counts={status: sum(1 for s in report.steps if s.status == status)
                     for status in sorted({s.status for s in report.steps})},
    )


def render_json(report: Report) -> str:
    """The report as one JSON object (`schemas/report.schema.json`)."""
    return json.dumps(report.model_dump(mode="json", by_alias=True), sort_keys=True,
                      ensure_ascii=False, allow_nan=False)


def summary_table(report: Report) -> list[Text | Table]:
    """A terminal summary: the verdict line, then a table of every check not `ok`."""
    plan = report.plan.plan_id if report.plan else "?"
    status = report.state.status if report.state else "no state"
    counts = report.summary
    lines: list[Text | Table] = [Text(
        f"{report.verdict.upper()}  plan {plan}: {status}  ({counts.ok} ok, {counts.fail} "
        f"failed, {counts.warn} warnings, {counts.skipped} skipped; {len(report.steps)} steps)")]
    notable = [check for check in report.checks if check.result != "ok"]
    if notable:
        table = Table(show_lines=False)
        for column in ("result", "check", "subject", "detail"):
            table.add_column(column, overflow="fold")
        for check in notable:
            table.add_row(Text(check.result), Text(check.id), Text(check.subject),
                          Text(check.detail))
        lines.append(table)
    return lines
