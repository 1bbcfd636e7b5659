"""The report as text: terminal IPython, logs, `print(rec.report())`."""

from __future__ import annotations

from typing import Any

from .. import stats
from ..records import Change

SYMBOLS = {"error": "✖", "warning": "▲", "info": "ℹ"}
HEADER = ["name", "shape", "dtype/device", "before", "after", "added", "status", "runs"]
STEP_HEADER = ["name", "shape", "grad at last step", "before first step", "at end", "change"]


def shape_text(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def added_text(row: Any) -> str:
    """What this run added: nothing for rows no backward reached."""
    if row.status in ("unchanged", "none"):
        return "—"
    if not row.added_known:
        return "unknown (changed between backwards)"
    if row.added is row.after and row.after is not None and stats.is_empty(row.before):
        return "= after"  # the whole gradient is new: no need to print it twice
    return stats.format_value(row.added)


def then_text(change: Change) -> str:
    """A change after the last backward: `scaled ×0.0079 by `clip_grad_norm_(...)`: ...`."""
    factor = f" ×{change.factor:.4g}" if change.what == "scaled" and change.factor else ""
    by = f" by {change.by}" if change.by else ""
    if change.what == "set to None":
        return f"set to None{by}"
    return f"{change.what}{factor}{by}: {stats.format_value(change.after)}"


def change_text(change: Any) -> str:
    """An optimizer step's change: the exact difference, or the norm of a large one."""
    if isinstance(change, float):
        return f"‖Δ‖={change:.4g}"
    return "—" if change is None else stats.format_value(change)


def step_cells(report: Any) -> list[tuple[str, list[list[str]]]]:
    """Per optimizer: its title, and the text of each parameter's row."""
    out = []
    for s in report.steps:
        title = f"{s.title} · {s.steps} step{'s' if s.steps != 1 else ''}"
        if s.skipped:
            title += f" ({s.skipped} skipped by the GradScaler)"
        rows = [
            [
                p.name,
                shape_text(p.shape),
                stats.format_value(p.grad),
                stats.format_value(p.before),
                stats.format_value(p.after),
                change_text(p.change),
            ]
            for p in s.params
        ]
        out.append((title, rows))
    return out


def left_out(hidden: int) -> str:
    return (
        f"{hidden:,} more rows not shown (problem rows are always shown); "
        "`%%grad -o rep` and `rep.table` hold them all."
    )


def report_text(report: Any) -> str:
    lines = [report.headline()]
    for f in report.findings:
        lines.append(f"  {SYMBOLS[f.severity]} {f.message}")
    if report.rows and report.show_table:
        shown, hidden = report.shown_rows()
        body = []
        for r in shown:
            body.append(
                [
                    r.name,
                    shape_text(r.shape),
                    f"{r.dtype}/{r.device}",
                    stats.format_value(r.before),
                    stats.format_value(r.after),
                    added_text(r),
                    r.status.upper() if r.status in ("accumulated", "nan/inf") else r.status,
                    str(r.runs),
                ]
            )
        widths = [min(48, max(len(row[i]) for row in [HEADER, *body])) for i in range(8)]
        for row, r in zip([HEADER, *body], [None, *shown]):
            cells = [clip(c, w).ljust(w) for c, w in zip(row, widths)]
            lines.append("  " + "  ".join(cells).rstrip())
            for change in r.then if r is not None else ():
                lines.append(f"      then {clip(then_text(change), 120)}")
        if hidden:
            lines.append("  " + left_out(hidden))
    for title, body in step_cells(report):
        lines.append(f"  optimizer step: {title}")
        widths = [min(40, max(len(row[i]) for row in [STEP_HEADER, *body])) for i in range(6)]
        for row in [STEP_HEADER, *body]:
            lines.append(
                "    " + "  ".join(clip(c, w).ljust(w) for c, w in zip(row, widths)).rstrip()
            )
    if report.flow is not None:
        lines.append("  " + report.flow.summary())
    for g in report.graphs if report.show_graph else ():
        lines.append(
            f"  graph: {getattr(g.snapshot, 'n_ops', '?')} ops"
            + (f" (ran {g.repeat}×)" if g.repeat > 1 else "")
        )
    for err in report.errors:
        lines.append(f"  (gradmagic internal: {err})")
    return "\n".join(lines)
