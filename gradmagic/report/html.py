"""The report as one static HTML block.

No JavaScript, and every colour an inline `style=` attribute, so it survives
nbconvert, GitHub's viewer and notebooks that strip `<style>` elements.
Everything that came from the user is escaped.
"""

from __future__ import annotations

import html
import itertools
from typing import Any

from .. import stats
from ..capture.probes import DELTA_BUDGET_COPIES
from .text import STEP_HEADER, added_text, left_out, shape_text, step_cells, then_text

# Jupyter's page CSS makes tables fixed-layout with right-aligned, wrapping cells;
# inline styles win over it (the report's container scrolls sideways instead).
TABLE_STYLE = "border-collapse: collapse; table-layout: auto; width: auto;"
CELL_STYLE = (
    "padding: 3px 6px; border-bottom: 1px solid #e5e7eb; vertical-align: top; "
    "text-align: left; white-space: nowrap;"
)
MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px;"

# status -> (row background, badge background, badge text colour)
STATUS_STYLE = {
    "new": ("", "#dcfce7", "#166534"),
    "accumulated": ("#fff3e0", "#fb923c", "#431407"),
    "unchanged": ("", "#e5e7eb", "#374151"),
    "none": ("#f3f4f6", "#9ca3af", "#111827"),
    "nan/inf": ("#fee2e2", "#dc2626", "#ffffff"),
}
SEVERITY_STYLE = {
    "error": ("#fee2e2", "#b91c1c", "✖"),
    "warning": ("#fff7ed", "#c2410c", "▲"),
    "info": ("#eff6ff", "#1d4ed8", "ℹ"),
}
_ids = itertools.count(1)


def esc(text: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def code_spans(message: str) -> str:
    """Escape a finding's message, turning `backticks` into <code>."""
    parts = message.split("`")
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def report_html(report: Any) -> str:
    uid = f"gm{next(_ids)}"
    parts = [
        '<div class="gradmagic" style="font-family: -apple-system, BlinkMacSystemFont, '
        "'Segoe UI', Helvetica, Arial, sans-serif; font-size: 13px; color: #111827; "
        'max-width: 100%; overflow-x: auto;">',
        f'<div style="font-weight: 600; margin: 4px 0 6px 0;">{esc(report.headline())}</div>',
    ]
    if report.findings:
        parts.append(_findings(report, uid))
    if report.rows and report.show_table:
        parts.append(_table(report, uid))
    if report.steps:
        parts.append(_steps(report))
    if report.show_graph:
        parts.extend(_graph(g) for g in report.graphs)
    if report.flow is not None:
        parts.append(_flow(report))
    for err in report.errors:
        parts.append(f'<div style="color:#6b7280">gradmagic internal: {esc(err)}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def _findings(report: Any, uid: str) -> str:
    items = []
    row_ids = {r.name: f"{uid}-row{i}" for i, r in enumerate(report.shown_rows()[0])}
    for f in report.findings:
        bg, fg, icon = SEVERITY_STYLE[f.severity]
        links = " ".join(
            f'<a href="#{row_ids[n]}" style="color:{fg}">{esc(n)}</a>'
            for n in f.tensors
            if n in row_ids
        )
        items.append(
            f'<li style="background:{bg}; border-left: 4px solid {fg}; padding: 4px 8px; '
            f'margin: 2px 0; list-style: none;" data-kind="{esc(f.kind)}">'
            f'<span style="color:{fg}; font-weight:600">{icon} {esc(f.severity)}</span> '
            f"{code_spans(f.message)}"
            + (f' <span style="font-size:11px">→ {links}</span>' if links else "")
            + "</li>"
        )
    return f'<ul style="padding:0; margin: 0 0 8px 0;">{"".join(items)}</ul>'


def _table(report: Any, uid: str) -> str:
    cell = CELL_STYLE
    heads = ("name", "shape", "dtype / device", "before", "after", "added", "status", "runs")
    head = "".join(
        f'<th style="{cell} text-align:left; background:#f9fafb">{h}</th>' for h in heads
    )
    body = []
    shown, hidden = report.shown_rows()
    for i, r in enumerate(shown):
        row_bg, badge_bg, badge_fg = STATUS_STYLE.get(r.status, ("", "#e5e7eb", "#111827"))
        style = f' style="background:{row_bg}"' if row_bg else ""
        highlight = "font-weight:700; color:#9a3412;" if r.status == "accumulated" else ""
        title = f' title="{esc(", ".join(r.names))}"' if len(r.names) > 1 else ""
        later = "".join(
            f'<div style="color:#6b7280">then {esc(then_text(c))}</div>' for c in r.then
        )
        body.append(
            f'<tr id="{uid}-row{i}" data-status="{esc(r.status)}"{style}>'
            f'<td style="{cell} {MONO} font-weight:600"{title}>{esc(r.name)}</td>'
            f'<td style="{cell} {MONO}">{esc(shape_text(r.shape))}</td>'
            f'<td style="{cell} {MONO}">{esc(r.dtype)} / {esc(r.device)}</td>'
            f'<td style="{cell} {MONO}">{esc(stats.format_value(r.before))}</td>'
            f'<td style="{cell} {MONO}">{esc(stats.format_value(r.after))}{later}</td>'
            f'<td style="{cell} {MONO} {highlight}">{esc(added_text(r))}</td>'
            f'<td style="{cell}"><span style="background:{badge_bg}; color:{badge_fg}; '
            f'border-radius: 8px; padding: 1px 8px; font-weight:600">{esc(r.status)}</span></td>'
            f'<td style="{cell} text-align:right">{r.runs}</td></tr>'
        )
    more = f'<div style="color:#6b7280">{code_spans(left_out(hidden))}</div>'
    return (
        f'<table class="gradmagic-table" style="{TABLE_STYLE} margin: 4px 0;">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + (more if hidden else "")
    )


def _steps(report: Any) -> str:
    cell = CELL_STYLE
    head = "".join(
        f'<th style="{cell} text-align:left; background:#f9fafb">{h}</th>' for h in STEP_HEADER
    )
    body = []
    for title, rows in step_cells(report):
        body.append(
            f'<tr><td colspan="6" style="{cell} font-weight:600">optimizer step: '
            f"<code>{esc(title)}</code></td></tr>"
        )
        for row in rows:
            body.append(
                "<tr>" + "".join(f'<td style="{cell} {MONO}">{esc(c)}</td>' for c in row) + "</tr>"
            )
    unmeasured = [
        steps.budget
        for steps in report.steps
        if any(p.change is None and isinstance(p.after, stats.TensorSummary) for p in steps.params)
    ]
    budget = max(unmeasured, default=0)
    note = (
        f'<div style="color:#6b7280">‖Δ‖ is measured for large parameters up to '
        f"{budget:,} elements in all (a copy before the step; {DELTA_BUDGET_COPIES:,} "
        "with <code>--copies</code>); the others show their norms at the end.</div>"
    )
    return (
        f'<table class="gradmagic-steps" style="{TABLE_STYLE} margin: 8px 0 4px 0;">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + (note if unmeasured else "")
    )


def _flow(report: Any) -> str:
    try:
        svg = report.flow.svg()
    except Exception as exc:  # noqa: BLE001 - the report must still show
        return f'<div style="color:#b91c1c">The gradient-flow chart could not be drawn: {esc(exc)}</div>'
    return f'<div class="gradmagic-flow" style="max-width: 100%; overflow-x: auto;">{svg}</div>'


def _graph(g: Any) -> str:
    try:
        result = g.rendered()
    except Exception as exc:  # noqa: BLE001 - the report must still show
        return f'<div style="color:#b91c1c">The graph could not be drawn: {esc(exc)}</div>'
    if result.svg:
        return (
            '<div class="gradmagic-graph" style="max-width: 100%; overflow-x: auto; '
            f'margin-top: 6px;">{result.svg}</div>'
        )
    return (
        f'<div style="color:#b91c1c">{esc(result.error)}</div>'
        f'<pre style="font-size:11px; max-height: 20em; overflow:auto">'
        f"{esc(g.digraph.source)}</pre>"
    )
