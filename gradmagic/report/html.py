"""The report as one static HTML block: a card that reads the same everywhere.

No JavaScript, no `<style>` element, no inline `<svg>`: every colour is an inline
`style=` attribute (the card sets its background and every text colour, so a dark
theme's CSS changes nothing), and the graph and the chart are `<img>`s with
`data:` URIs, which sanitizing viewers and untrusted notebooks keep. Wide tables
scroll inside their own box, where they are; long values are shortened in their
cell, the full value in its `title` and in a `<details>` that opens without
JavaScript. Everything that came from the user is escaped.
"""

from __future__ import annotations

import base64
import html
import itertools
import re
from typing import Any

from ..capture.probes import DELTA_BUDGET_COPIES
from ..trajectory import Sparkline, sparkline
from .cells import (
    VALUE_WIDTH,
    added_text,
    clip,
    shape_text,
    step_problem,
    step_texts,
    then_text,
    value_text,
)
from .text import TREND_HEAD, TREND_WIDTH, trend_legend

FONT = "-apple-system, BlinkMacSystemFont, 'Segoe UI', Helvetica, Arial, sans-serif"
MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;"
INK, MUTED, LINE = "#1f2937", "#4b5563", "#e5e7eb"
CARD = (
    f"background: #ffffff; color: {INK}; border: 1px solid #d1d5db; border-radius: 6px; "
    f"padding: 8px 10px; margin: 2px 0; max-width: 100%; box-sizing: border-box; "
    f"font-family: {FONT}; font-size: 13px; line-height: 1.45; text-align: left;"
)
# Jupyter's page CSS makes tables fixed-layout, right-aligned, zebra-striped in the theme's
# colours: inline styles win over all of it. Cells inherit font and colour from the table
# and their row (which draws the line under it): each cell carries only what it must.
TABLE = (
    f"border-collapse: collapse; table-layout: auto; width: auto; margin: 0; "
    f"background: #ffffff; color: {INK}; border: none; {MONO}"
)
SCROLL = "overflow-x: auto; max-width: 100%; margin: 4px 0;"
TH = (
    "text-align:left;padding:3px 8px;white-space:nowrap;background:#f3f4f6;color:#111827;"
    "border:0;border-bottom:1px solid #d1d5db;font-weight:600"
)
TD = "text-align:left;padding:2px 5px;white-space:nowrap;vertical-align:top"
# Names and values wrap when the column is narrow (names after `.`, `_`, `[`...), so that
# an automatic-layout table fits the notebook column before it needs to scroll.
WRAP = "white-space:normal;overflow-wrap:break-word"
NOWRAP_WIDTH = 12  # characters: `[100., 100.]` and `‖g‖=0.02912` never wrap
NAME_MIN = "min-width:10ch"  # a squeezed name column still shows a word per line
_NAME_BREAK = re.compile(r"(?<=[._\[=/'\"-])(?=.)")
CODE = f"background: #f3f4f6; color: #111827; padding: 0 3px; border-radius: 3px; {MONO}"

# status -> (row background, badge background, badge text)
STATUS_STYLE = {
    "new": ("#ffffff", "#dcfce7", "#14532d"),
    "accumulated": ("#fff7ed", "#fed7aa", "#7c2d12"),
    "unchanged": ("#ffffff", "#e5e7eb", "#1f2937"),
    "none": ("#f3f4f6", "#d1d5db", "#1f2937"),
    "nan/inf": ("#fef2f2", "#fecaca", "#7f1d1d"),
}
# severity -> (background, border, label colour, icon)
SEVERITY_STYLE = {
    "error": ("#fef2f2", "#b91c1c", "#991b1b", "✖"),
    "warning": ("#fff7ed", "#c2410c", "#9a3412", "▲"),
    "info": ("#eff6ff", "#1d4ed8", "#1e40af", "ℹ"),
}
MAX_LINKS = 4  # row links under a finding; the rest are counted
MAX_STEP_ROWS = 100  # optimizer-step rows drawn; `rep.step_table` has them all
_ids = itertools.count(1)


def esc(text: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def code_spans(message: str) -> str:
    """Escape a finding's message, turning `backticks` into <code>."""
    parts = message.split("`")
    return "".join(
        f'<code style="{CODE}">{esc(p)}</code>' if i % 2 else esc(p) for i, p in enumerate(parts)
    )


def report_html(report: Any) -> str:
    uid = f"gm{next(_ids)}"
    parts = [
        f'<div class="gradmagic" style="{CARD}">',
        f'<div style="font-weight: 600; color: #111827; margin: 0 0 6px 0;">'
        f"{esc(report.headline())}</div>",
    ]
    if report.findings:
        parts.append(_findings(report, uid))
    if report.rows and report.show_table:
        parts.append(_table(report, uid))
    if report.steps:
        parts.append(_steps(report))
    if report.backward_steps or report.steps_notes:
        parts.append(_backward_steps(report))
    if report.show_graph:
        parts.extend(_graph(g) for g in report.graphs)
    if report.flow is not None:
        parts.append(_flow(report))
    for err in report.errors:
        parts.append(f'<div style="color: {MUTED};">gradmagic internal: {esc(err)}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def _findings(report: Any, uid: str) -> str:
    items = []
    row_ids = {r.name: f"{uid}-row{i}" for i, r in enumerate(report.shown_rows()[0])}
    for f in report.findings:
        bg, border, label, icon = SEVERITY_STYLE[f.severity]
        linked = [n for n in f.tensors if n in row_ids]
        links = ", ".join(
            f'<a href="#{row_ids[n]}" style="color: {label};">{esc(n)}</a>'
            for n in linked[:MAX_LINKS]
        )
        if len(linked) > MAX_LINKS:
            links += f" and {len(linked) - MAX_LINKS} more"
        items.append(
            f'<li style="background: {bg}; color: {INK}; border-left: 4px solid {border}; '
            f'padding: 4px 8px; margin: 2px 0; list-style: none;" data-kind="{esc(f.kind)}">'
            f'<span style="color: {label}; font-weight: 600;">{icon} {esc(f.severity)}</span> '
            f"{code_spans(f.message)}"
            + (f' <span style="font-size: 12px; color: {INK};">→ {links}</span>' if links else "")
            + "</li>"
        )
    return f'<ul class="gm-findings" style="padding: 0; margin: 0 0 6px 0;">{"".join(items)}</ul>'


def row_open(attrs: str, background: str) -> str:
    """A `<tr>` with its own background and the line under it (never the theme's)."""
    return f'<tr {attrs}style="background:{background};border:0;border-bottom:1px solid {LINE}">'


def name_html(name: str) -> str:
    """A name, escaped, with line-break opportunities after `.`, `_`, `[`, `=`, `/`, `-`
    and quotes."""
    return "<wbr>".join(esc(part) for part in _NAME_BREAK.split(name))


def value_cell(cls: str, text: str, style: str = "", width: int = VALUE_WIDTH) -> str:
    """A table cell: short text whole; long text shortened, the full one in `title` and in
    a `<details>` to open."""
    text = " ".join(text.split())
    short = clip(text, width)
    wrap = f";{WRAP}" if len(short) > NOWRAP_WIDTH else ""  # a short value stays on one line
    base = f'<td class="{cls}" style="{TD}{wrap}{";" + style if style else ""}"'
    if short == text:
        return f"{base}>{esc(text)}</td>"
    return (
        f'{base} title="{esc(text)}"><details style="margin:0">'
        f'<summary style="cursor:pointer">{esc(short)}</summary>'
        f'<div style="white-space:pre-wrap;word-break:break-all;max-width:60ch">'
        f"{esc(text)}</div></details></td>"
    )


def trend_cell(spark: Sparkline | None, trajectory: Any) -> str:
    """A sparkline in a monospace span: what it shows and its numbers in the tooltip."""
    if spark is None:
        return f'<td class="gm-trend" style="{TD}"></td>'
    numbers = f"{spark.count:,} backwards: first {trajectory.first:.4g}, last {trajectory.last:.4g}"
    title = f"{numbers}. {spark.legend()}"
    return (
        f'<td class="gm-trend" style="{TD}"><span title="{esc(title)}" '
        f'style="{MONO} letter-spacing: 0;">{esc(spark.text)}</span>'
        + (f' <span style="color: {MUTED};">log</span>' if spark.scale == "log" else "")
        + "</td>"
    )


def _table(report: Any, uid: str) -> str:
    shown, hidden = report.shown_rows()
    sparks = [sparkline(r.trajectory, TREND_WIDTH) for r in shown]
    trend = any(sparks)
    heads = ["name", "status", "runs", "added", "before", "after", "shape", "dtype / device"]
    head = "".join(f'<th style="{TH}">{h}</th>' for h in heads)
    if trend:
        legend = esc(trend_legend([s for s in sparks if s]))
        head = head.replace(
            f'<th style="{TH}">shape</th>',
            f'<th style="{TH}" title="{legend}">{esc(TREND_HEAD)}</th><th style="{TH}">shape</th>',
        )
    body = []
    for i, r in enumerate(shown):
        row_bg, badge_bg, badge_fg = STATUS_STYLE.get(r.status, ("#ffffff", "#e5e7eb", INK))
        title = f' title="{esc(", ".join(r.names))}"' if len(r.names) > 1 else ""
        strong = "font-weight:700" if r.status == "accumulated" else ""
        later = "".join(
            f'<div class="gm-then" style="color:{MUTED}" title="{esc(then_text(c))}">'
            f"then {esc(clip(then_text(c), VALUE_WIDTH + 12))}</div>"
            for c in r.then
        )
        after = value_cell("gm-after", value_text(r.after))
        if later:
            after = after.removesuffix("</td>") + later + "</td>"
        body.append(
            row_open(f'id="{uid}-row{i}" data-status="{esc(r.status)}" ', row_bg)
            + f'<td class="gm-name" style="{TD};{WRAP};{NAME_MIN};font-weight:600"{title}>'
            f"{name_html(r.name)}</td>"
            f'<td class="gm-status" style="{TD}"><span style="background:{badge_bg};'
            f"color:{badge_fg};border-radius:8px;padding:1px 5px;font-size:11px;"
            f'font-weight:600">'
            f"{esc(r.status)}</span></td>"
            f'<td class="gm-runs" style="{TD};text-align:right">{r.runs}</td>'
            + value_cell("gm-added", added_text(r), strong)
            + value_cell("gm-before", value_text(r.before))
            + after
            + (trend_cell(sparks[i], r.trajectory) if trend else "")
            + f'<td class="gm-shape" style="{TD}">{esc(shape_text(r.shape))}</td>'
            f'<td class="gm-dtype" style="{TD};{WRAP}">{esc(r.dtype)} / {esc(r.device)}</td></tr>'
        )
    more = (
        f'<div style="color: {MUTED};">{code_spans(_left_out(hidden, "rep.table"))}</div>'
        if hidden
        else ""
    )
    if trend:
        more = (
            f'<div class="gm-trend-legend" style="color: {MUTED};">{esc(TREND_HEAD)}: '
            f"{esc(trend_legend([s for s in sparks if s]))}</div>{more}"
        )
    return (
        f'<div class="gm-scroll" style="{SCROLL}"><table class="gradmagic-table" '
        f'style="{TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        f"</table></div>{more}"
    )


def _left_out(hidden: int, where: str) -> str:
    return f"{hidden:,} more rows not shown (problem rows come first); `{where}` holds them all."


STEP_HEADS = ("name", "shape", "grad at last step", "before first step", "at end", "change")


def _steps(report: Any) -> str:
    head = "".join(f'<th style="{TH}">{h}</th>' for h in STEP_HEADS)
    body, drawn, total = [], 0, 0
    for steps in report.steps:
        title = f"{steps.title} · {steps.steps} step{'s' if steps.steps != 1 else ''}"
        if steps.skipped:
            title += f" ({steps.skipped} skipped by the GradScaler)"
        body.append(
            row_open("", "#ffffff") + f'<td colspan="6" style="{TD};font-weight:600;'
            f'font-family:{FONT}">optimizer step: <code style="{CODE}">{esc(title)}</code></td></tr>'
        )
        params = sorted(steps.params, key=lambda p: not step_problem(p))
        total += len(params)
        for p in params[: max(0, MAX_STEP_ROWS - drawn)]:
            drawn += 1
            body.append(
                row_open("", "#ffffff")
                + f'<td style="{TD};{WRAP};font-weight:600">{name_html(p.name)}</td>'
                f'<td style="{TD}">{esc(shape_text(p.shape))}</td>'
                + "".join(
                    value_cell(f"gm-step-{column}", text)
                    for column, text in zip(("grad", "before", "after", "change"), step_texts(p))
                )
                + "</tr>"
            )
    notes = []
    if total > drawn:
        notes.append(code_spans(_left_out(total - drawn, "rep.step_table")))
    if any(p.change is None and p.steps for s in report.steps for p in s.params):
        budget = max(s.budget for s in report.steps)
        notes.append(
            f"‖Δ‖ is measured for large parameters up to {budget:,} elements in all (a copy "
            f'before the step; {DELTA_BUDGET_COPIES:,} with <code style="{CODE}">--copies'
            "</code>); the others are not measured."
        )
    note = "".join(f'<div style="color: {MUTED};">{n}</div>' for n in notes)
    return (
        f'<div class="gm-scroll" style="{SCROLL}"><table class="gradmagic-steps" '
        f'style="{TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        f"</table></div>{note}"
    )


STEPS_HEADS = ("#", "op", "received", "local derivative", "sent to each input")


def _sent_html(sent: Any) -> str:
    """`→ b: [-12., -8.] · local [12., 8.] (read)`."""
    value = esc(sent.value) if sent.value else code_spans(f"({sent.missing})")
    local = f" · local {esc(sent.local)}{' (read)' if sent.read else ''}" if sent.local else ""
    return f"→ {code_spans(sent.to)}: {value}{local}"


def _backward_steps(report: Any) -> str:
    """The backward step by step: one row per op in the engine's order, then the chain
    rule of each leaf."""
    parts = []
    head = "".join(f'<th style="{TH}">{h}</th>' for h in STEPS_HEADS)
    for k, walked in enumerate(report.backward_steps):
        title = "The backward, step by step"
        if len(report.backward_steps) > 1:
            title += f" (graph {k + 1})"
        if walked.repeat > 1:
            title += f" (it ran {walked.repeat}×: the numbers of its first run)"
        parts.append(
            f'<div style="font-weight:600;margin:8px 0 2px 0">{esc(title)}'
            f'<span style="font-weight:400;color:{MUTED}"> · in the order the engine ran '
            "the ops; a local derivative marked read is what the op sent ÷ what it received"
            "</span></div>"
        )
        body = []
        for step in walked.steps:
            sent = "<br>".join(_sent_html(x) for x in step.sent)
            op = esc(step.op) + (f" → {code_spans(f'`{step.leaf}`')}" if step.leaf else "")
            body.append(
                row_open("", "#ffffff")
                + f'<td style="{TD}">{step.number}</td><td style="{TD}">{op}</td>'
                f'<td style="{TD}">{esc(step.received)}</td>'
                f'<td style="{TD};{WRAP}">{code_spans(step.derivative)}</td>'
                f'<td style="{TD};{WRAP};min-width:24ch">{sent}</td></tr>'
            )
        parts.append(
            f'<div class="gm-scroll" style="{SCROLL}"><table class="gradmagic-backward-steps" '
            f'style="{TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>"
        )
        if walked.chains:
            items = "".join(
                f'<li><code style="{CODE}">{esc(c.text)}</code></li>' for c in walked.chains
            )
            parts.append(
                f'<div style="margin:2px 0">The chain rule, with the numbers:</div>'
                f'<ul class="gradmagic-chain" style="margin:0 0 4px 18px;padding:0">{items}</ul>'
            )
    parts += [f'<div style="color: {MUTED};">{esc(n)}</div>' for n in report.steps_notes]
    return "".join(parts)


_SIZE = re.compile(r'<svg[^>]*?\bwidth="([\d.]+)(pt|px)?"[^>]*?\bheight="([\d.]+)(pt|px)?"', re.S)


def svg_image(svg: str, cls: str, alt: str) -> str:
    """An `<img>` of an SVG at its own size (never scaled down: its text stays legible;
    the box around it scrolls), as a `data:` URI that sanitizers keep."""
    size = ""
    found = _SIZE.search(svg)
    if found:
        scale = 4 / 3  # points to CSS pixels
        w = float(found.group(1)) * (scale if found.group(2) in (None, "pt") else 1)
        h = float(found.group(3)) * (scale if found.group(4) in (None, "pt") else 1)
        size = f' width="{round(w)}" height="{round(h)}"'
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (
        f'<img class="{cls}" alt="{esc(alt)}"{size} style="max-width: none; display: block;" '
        f'src="data:image/svg+xml;base64,{data}">'
    )


def _flow(report: Any) -> str:
    try:
        svg = report.flow.svg()
    except Exception as exc:  # noqa: BLE001 - the report must still show
        return f'<div style="color: #991b1b;">The gradient-flow chart could not be drawn: {esc(exc)}</div>'
    image = svg_image(svg, "gradmagic-flow", report.flow.summary())
    return f'<div class="gm-scroll" style="{SCROLL} background: #ffffff;">{image}</div>'


def _graph(g: Any) -> str:
    try:
        result = g.rendered()
    except Exception as exc:  # noqa: BLE001 - the report must still show
        return f'<div style="color: #991b1b;">The graph could not be drawn: {esc(exc)}</div>'
    if result.svg:
        ops = getattr(g.snapshot, "n_ops", 0)
        image = svg_image(result.svg, "gradmagic-graph", f"the autograd graph: {ops} ops")
        return (
            f'<div class="gm-graph" style="{SCROLL} background: #ffffff; margin-top: 6px;">'
            f"{image}</div>"
        )
    return (
        f'<div style="color: #991b1b;">{esc(result.error)}</div>'
        f'<pre style="font-size: 11px; max-height: 20em; overflow: auto; background: #f9fafb; '
        f'color: {INK};">{esc(g.digraph.source)}</pre>'
    )
