"""The report as text: terminal IPython, logs, `print(rec.report())`.

Plain by default; `report_text(report, color=True)` adds ANSI colours (statuses,
severities), which terminal IPython asks for when its colours are on.
"""

from __future__ import annotations

from typing import Any

from ..trajectory import sparkline
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

TREND_WIDTH = 24  # characters of a sparkline
TREND_HEAD = "‖g‖ after each backward"
SYMBOLS = {"error": "✖", "warning": "▲", "info": "ℹ"}
HEADER = ["name", "status", "runs", "added", "before", "after", "shape", "dtype/device"]
STEP_HEADER = ["name", "shape", "grad at last step", "before first step", "at end", "change"]
MAX_STEP_ROWS = 100
_COLOURS = {
    "error": "31",
    "warning": "33",
    "info": "34",
    "accumulated": "33;1",
    "nan/inf": "31;1",
    "none": "2",
    "new": "32",
}


def _paint(text: str, key: str, color: bool) -> str:
    code = _COLOURS.get(key)
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


def _table(rows: list[list[str]], indent: str, widths: list[int]) -> list[str]:
    return [
        indent + "  ".join(clip(c, w).ljust(w) for c, w in zip(row, widths)).rstrip()
        for row in rows
    ]


def trend_text(spark: Any) -> str:
    """A sparkline in a text table: `log` after it where its scale is."""
    if spark is None:
        return ""
    return spark.text + (" log" if spark.scale == "log" else "")


def trend_legend(sparks: list[Any]) -> str:
    """What the sparklines of a table show: one sentence for all of them, each row's own
    scale where they differ."""
    scales = {s.scale for s in sparks}
    per = max(s.per_char for s in sparks)
    each = (
        "one character per backward"
        if per <= 1
        else "each character the largest norm of the backwards it covers"
    )
    scale = (
        "log scale (marked `log`) where a row's norms span more than a decade (▁ its "
        "smallest, █ its largest), else linear from 0 to its largest"
        if "log" in scales
        else "linear from 0 to each row's largest (█)"
    )
    return f"the norm read right after each backward that reached it; {each}; {scale}; · zero, ! NaN/Inf"


def report_text(report: Any, color: bool = False) -> str:
    lines = [report.headline()]
    for f in report.findings:
        lines.append("  " + _paint(f"{SYMBOLS[f.severity]} {f.message}", f.severity, color))
    if report.rows and report.show_table:
        shown, hidden = report.shown_rows()
        body = [
            [
                r.name,
                r.status.upper() if r.status in ("accumulated", "nan/inf") else r.status,
                str(r.runs),
                added_text(r),
                value_text(r.before),
                value_text(r.after),
                shape_text(r.shape),
                f"{r.dtype}/{r.device}",
            ]
            for r in shown
        ]
        header = HEADER
        sparks = [sparkline(r.trajectory, TREND_WIDTH) for r in shown]
        if any(sparks):
            header = [*HEADER, TREND_HEAD]
            for row, spark in zip(body, sparks):
                row.append(trend_text(spark))
        widths = [
            min(VALUE_WIDTH + 12, max(len(row[i]) for row in [header, *body]))
            for i in range(len(header))
        ]
        lines += _table([header], "  ", widths)
        for row, r in zip(body, shown):
            (line,) = _table([row], "  ", widths)
            lines.append(_paint(line, r.status, color) if r.status != "new" else line)
            for change in r.then:
                lines.append(f"      then {clip(then_text(change), 120)}")
        drawn = [spark for spark in sparks if spark]
        if drawn:
            lines.append(f"  {TREND_HEAD}: {trend_legend(drawn)}")
        if hidden:
            lines.append(
                f"  {hidden:,} more rows not shown (problem rows come first); "
                "`rep.table` holds them all."
            )
    for steps in report.steps:
        title = f"{steps.title} · {steps.steps} step{'s' if steps.steps != 1 else ''}"
        if steps.skipped:
            title += f" ({steps.skipped} skipped by the GradScaler)"
        lines.append(f"  optimizer step: {title}")
        params = sorted(steps.params, key=lambda p: not step_problem(p))
        body = [[p.name, shape_text(p.shape), *step_texts(p)] for p in params[:MAX_STEP_ROWS]]
        widths = [min(40, max(len(row[i]) for row in [STEP_HEADER, *body])) for i in range(6)]
        lines += _table([STEP_HEADER, *body], "    ", widths)
        if len(params) > MAX_STEP_ROWS:
            lines.append(f"    {len(params) - MAX_STEP_ROWS:,} more in `rep.step_table`")
    lines += steps_lines(report)
    if report.flow is not None:
        lines.append("  " + report.flow.summary())
    graphs = report.graphs if report.show_graph else []
    for g in graphs:
        lines.append(
            f"  graph: {getattr(g.snapshot, 'n_ops', '?')} ops"
            + (f" (ran {g.repeat}×)" if g.repeat > 1 else "")
        )
    if graphs:
        lines.append(
            '  to see the graph: `report.save("grad.html")` and open the page '
            "(`%%grad -o report` keeps the report; in a script, `rec.report()`)"
        )
    for err in report.errors:
        lines.append(f"  (gradmagic internal: {err})")
    return "\n".join(lines)


def sent_text(sent: Any) -> str:
    """`→ PowBackward0: [36., 81.] (local [12., 27.], read)`."""
    value = sent.value or f"({sent.missing})"
    local = f"local {sent.local}{' = sent ÷ received' if sent.read else ''}" if sent.local else ""
    return f"→ {sent.to}: {value}" + (f" ({local})" if local else "")


def steps_lines(report: Any) -> list[str]:
    """The backward step by step (`steps=True`), for the terminal."""
    lines = []
    for k, walked in enumerate(report.backward_steps):
        title = "the backward, step by step"
        if len(report.backward_steps) > 1:
            title += f" (graph {k + 1})"
        if walked.repeat > 1:
            title += f" (it ran {walked.repeat}×: the numbers of its first run)"
        lines.append(f"  {title}: the order the engine ran the ops")
        for step in walked.steps:
            derivative = f"  local derivative: {step.derivative}" if step.derivative else ""
            lines.append(f"    {step.number}. {step.op}  received {step.received}{derivative}")
            for sent in step.sent:
                lines.append(f"         {sent_text(sent)}")
        if walked.chains:
            lines.append("    chain rule, with the numbers:")
            lines += [f"      {c.text}" for c in walked.chains]
    lines += [f"  {note}" for note in report.steps_notes]
    return lines
