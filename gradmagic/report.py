"""`GradReport`: findings, the gradient table and the graphs, as HTML and text.

The HTML is one static block: no JavaScript, and every colour an inline
`style=` attribute, so it survives nbconvert, GitHub's viewer and notebooks
that strip `<style>` elements. Everything that came from the user is escaped.
"""

from __future__ import annotations

import html
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from . import stats
from .diagnostics import Finding
from .plot import gradient_flow
from .probes import DELTA_BUDGET_COPIES

# Jupyter's page CSS makes tables fixed-layout with right-aligned, wrapping cells;
# inline styles win over it (the report's container scrolls sideways instead).
TABLE_STYLE = "border-collapse: collapse; table-layout: auto; width: auto;"
CELL_STYLE = (
    "padding: 3px 6px; border-bottom: 1px solid #e5e7eb; vertical-align: top; "
    "text-align: left; white-space: nowrap;"
)

# Rows drawn in HTML and text; `rep.table` always has them all. Problem rows come first.
MAX_SHOWN_ROWS = 200
PROBLEM_STATUSES = ("nan/inf", "none", "accumulated")

COLUMNS = ("shape", "dtype", "device", "before", "after", "added", "status", "runs")

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


def _code_spans(message: str) -> str:
    """Escape a finding's message, turning `backticks` into <code>."""
    parts = message.split("`")
    out = []
    for i, part in enumerate(parts):
        out.append(f"<code>{esc(part)}</code>" if i % 2 else esc(part))
    return "".join(out)


@dataclass
class LeafRow:
    """One row of the gradient table, holding only what it shows."""

    name: str
    names: list[str]
    shape: tuple[int, ...]
    dtype: str
    device: str
    before: Any
    after: Any
    added: Any
    status: str
    runs: int
    key: int


@dataclass
class GradGraph:
    """One distinct autograd graph of the block, and how often it ran."""

    snapshot: Any
    repeat: int
    kind: str
    leaf_names: dict[int, str]
    leaf_status: dict[int, str]
    max_nodes: int
    depth: int | None
    _digraph: Any = None
    _render: Any = None

    @property
    def digraph(self) -> Any:
        if self._digraph is None:
            from .graph import to_digraph

            title = "torch.autograd.grad" if self.kind == "grad" else None
            self._digraph = to_digraph(
                self.snapshot,
                leaf_names=self.leaf_names,
                leaf_status=self.leaf_status,
                max_nodes=self.max_nodes,
                depth=self.depth,
                repeat=self.repeat,
                title=title,
            )
        return self._digraph

    def rendered(self) -> Any:
        if self._render is None:
            from .render import render_svg

            self._render = render_svg(self.digraph.source)
        return self._render


@dataclass
class GradReport:
    """What one `%%grad` cell (or `watch()` block) did to the gradients.

    `table` is a pandas DataFrame indexed by leaf name; `backwards` the engine
    calls; `findings` what gradmagic noticed; `graph` the `graphviz.Digraph`
    (a list when the block ran several distinct graphs); `steps` what each
    optimizer's `step()` did (`step_table`); `flow` the gradient-flow chart.
    """

    rows: list[LeafRow]
    backwards: list[Any]
    findings: list[Finding]
    graphs: list[GradGraph] = field(default_factory=list)
    run: int = 0
    show_table: bool = True
    show_graph: bool = True
    errors: list[str] = field(default_factory=list)
    steps: list[Any] = field(default_factory=list)  # probes.OptimizerSteps
    flow: Any = None  # plot.GradientFlow, when the chart is on

    @classmethod
    def from_recorder(cls, recorder: Any) -> GradReport:
        rows = [
            LeafRow(
                r.name,
                r.names,
                r.shape,
                r.dtype,
                r.device,
                r.before,
                r.after,
                r.added,
                r.status,
                r.runs,
                r.key,
            )
            for r in recorder.rows()
        ]
        names = {r.key: r.name for r in recorder.leaves}
        status = {r.key: r.status for r in recorder.leaves}
        graphs = [
            GradGraph(
                record.graph,
                repeat,
                record.kind,
                names,
                status,
                recorder.options.max_nodes,
                recorder.options.depth,
            )
            for record, repeat in recorder.distinct_graphs()
        ]
        return cls(
            rows=rows,
            backwards=list(recorder.records),
            findings=list(recorder.findings),
            graphs=graphs,
            run=recorder.run_number,
            errors=list(recorder.internal_errors),
            steps=list(recorder.optimizer_steps),
            flow=gradient_flow(recorder),
        )

    # -- data -----------------------------------------------------------------
    @property
    def table(self) -> Any:
        import pandas as pd

        data = [
            [r.shape, r.dtype, r.device, r.before, r.after, r.added, r.status, r.runs]
            for r in self.rows
        ]
        frame = pd.DataFrame(data, columns=list(COLUMNS), index=[r.name for r in self.rows])
        frame.index.name = "name"
        return frame

    @property
    def step_table(self) -> Any:
        """One row per parameter an optimizer stepped: values before and after, the change."""
        import pandas as pd

        data = [
            [s.name, s.kind, p.steps, p.grad, p.before, p.after, p.change]
            for s in self.steps
            for p in s.params
        ]
        columns = ["optimizer", "kind", "steps", "grad", "before", "after", "change"]
        frame = pd.DataFrame(
            data, columns=columns, index=[p.name for s in self.steps for p in s.params]
        )
        frame.index.name = "name"
        return frame

    def _step_cells(self) -> list[tuple[str, list[str]]]:
        """Per optimizer: its title, and the text of each parameter's row."""
        return [
            (
                f"{s.title} · {s.steps} step{'s' if s.steps != 1 else ''}",
                [
                    [
                        p.name,
                        _shape(p.shape),
                        stats.format_value(p.grad),
                        stats.format_value(p.before),
                        stats.format_value(p.after),
                        _change_text(p.change),
                    ]
                    for p in s.params
                ],
            )
            for s in self.steps
        ]

    @property
    def graph(self) -> Any:
        digraphs = [g.digraph for g in self.graphs]
        if not digraphs:
            return None
        return digraphs[0] if len(digraphs) == 1 else digraphs

    def __getitem__(self, name: str) -> LeafRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No row named {name!r}; rows are: {', '.join(r.name for r in self.rows)}")

    def shown_rows(self) -> tuple[list[LeafRow], int]:
        """The rows to draw (problems first, then table order) and how many were left out."""
        if len(self.rows) <= MAX_SHOWN_ROWS:
            return self.rows, 0
        problems = [r for r in self.rows if r.status in PROBLEM_STATUSES]
        rest = [r for r in self.rows if r.status not in PROBLEM_STATUSES]
        keep = {id(r) for r in (problems + rest)[:MAX_SHOWN_ROWS]}
        shown = [r for r in self.rows if id(r) in keep]
        return shown, len(self.rows) - len(shown)

    def _left_out(self, hidden: int) -> str:
        return (
            f"{hidden:,} more rows not shown (problem rows are always shown); "
            "`%%grad -o rep` and `rep.table` hold them all."
        )

    # -- text -----------------------------------------------------------------
    def _headline(self) -> str:
        n = len(self.backwards)
        kinds = sorted({b.kind for b in self.backwards})
        calls = f"{n} engine call{'s' if n != 1 else ''}" + (f" ({', '.join(kinds)})" if n else "")
        leaves = f"{len(self.rows)} lea{'f' if len(self.rows) == 1 else 'ves'}"
        return f"gradmagic · cell run {self.run} · {calls} · {leaves}"

    def __repr__(self) -> str:
        lines = [self._headline()]
        for f in self.findings:
            lines.append(f"  {SEVERITY_STYLE[f.severity][2]} {f.message}")
        if self.rows and self.show_table:
            shown, hidden = self.shown_rows()
            header = ["name", "shape", "dtype/device", "before", "after", "added", "status", "runs"]
            body = [
                [
                    r.name,
                    _shape(r.shape),
                    f"{r.dtype}/{r.device}",
                    stats.format_value(r.before),
                    stats.format_value(r.after),
                    _added_text(r),
                    r.status.upper() if r.status in ("accumulated", "nan/inf") else r.status,
                    str(r.runs),
                ]
                for r in shown
            ]
            widths = [min(48, max(len(row[i]) for row in [header, *body])) for i in range(8)]
            for row in [header, *body]:
                cells = [_clip(c, w).ljust(w) for c, w in zip(row, widths)]
                lines.append("  " + "  ".join(cells).rstrip())
            if hidden:
                lines.append("  " + self._left_out(hidden))
        for title, body in self._step_cells():
            lines.append(f"  optimizer step: {title}")
            widths = [min(40, max(len(row[i]) for row in [STEP_HEADER, *body])) for i in range(6)]
            for row in [STEP_HEADER, *body]:
                lines.append(
                    "    " + "  ".join(_clip(c, w).ljust(w) for c, w in zip(row, widths)).rstrip()
                )
        if self.flow is not None:
            lines.append("  " + self.flow.summary())
        for g in self.graphs if self.show_graph else ():
            snap = g.snapshot
            lines.append(
                f"  graph: {getattr(snap, 'n_ops', '?')} ops"
                + (f" (ran {g.repeat}×)" if g.repeat > 1 else "")
            )
        for err in self.errors:
            lines.append(f"  (gradmagic internal: {err})")
        return "\n".join(lines)

    # -- HTML -----------------------------------------------------------------
    def _repr_html_(self) -> str:
        uid = f"gm{next(_ids)}"
        parts = [
            '<div class="gradmagic" style="font-family: -apple-system, BlinkMacSystemFont, '
            "'Segoe UI', Helvetica, Arial, sans-serif; font-size: 13px; color: #111827; "
            'max-width: 100%; overflow-x: auto;">',
            f'<div style="font-weight: 600; margin: 4px 0 6px 0;">{esc(self._headline())}</div>',
        ]
        if self.findings:
            parts.append(self._findings_html(uid))
        if self.rows and self.show_table:
            parts.append(self._table_html(uid))
        if self.steps:
            parts.append(self._steps_html())
        if self.show_graph:
            parts.extend(self._graph_html(g) for g in self.graphs)
        if self.flow is not None:
            parts.append(self._flow_html())
        for err in self.errors:
            parts.append(f'<div style="color:#6b7280">gradmagic internal: {esc(err)}</div>')
        parts.append("</div>")
        return "\n".join(parts)

    def _findings_html(self, uid: str) -> str:
        items = []
        row_ids = {r.name: f"{uid}-row{i}" for i, r in enumerate(self.shown_rows()[0])}
        for f in self.findings:
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
                f"{_code_spans(f.message)}"
                + (f' <span style="font-size:11px">→ {links}</span>' if links else "")
                + "</li>"
            )
        return f'<ul style="padding:0; margin: 0 0 8px 0;">{"".join(items)}</ul>'

    def _table_html(self, uid: str) -> str:
        cell = CELL_STYLE
        mono = "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px;"
        head = "".join(
            f'<th style="{cell} text-align:left; background:#f9fafb">{h}</th>'
            for h in (
                "name",
                "shape",
                "dtype / device",
                "before",
                "after",
                "added",
                "status",
                "runs",
            )
        )
        body = []
        shown, hidden = self.shown_rows()
        for i, r in enumerate(shown):
            row_bg, badge_bg, badge_fg = STATUS_STYLE.get(r.status, ("", "#e5e7eb", "#111827"))
            style = f' style="background:{row_bg}"' if row_bg else ""
            added = _added_text(r)
            highlight = "font-weight:700; color:#9a3412;" if r.status == "accumulated" else ""
            title = f' title="{esc(", ".join(r.names))}"' if len(r.names) > 1 else ""
            values = "".join(
                f'<td style="{cell} {mono}">{esc(stats.format_value(v))}</td>'
                for v in (r.before, r.after)
            )
            body.append(
                f'<tr id="{uid}-row{i}" data-status="{esc(r.status)}"{style}>'
                f'<td style="{cell} {mono} font-weight:600"{title}>{esc(r.name)}</td>'
                f'<td style="{cell} {mono}">{esc(_shape(r.shape))}</td>'
                f'<td style="{cell} {mono}">{esc(r.dtype)} / {esc(r.device)}</td>'
                f"{values}"
                f'<td style="{cell} {mono} {highlight}">{esc(added)}</td>'
                f'<td style="{cell}"><span style="background:{badge_bg}; color:{badge_fg}; '
                f'border-radius: 8px; padding: 1px 8px; font-weight:600">{esc(r.status)}</span></td>'
                f'<td style="{cell} text-align:right">{r.runs}</td></tr>'
            )
        more = f'<div style="color:#6b7280">{_code_spans(self._left_out(hidden))}</div>'
        return (
            f'<table class="gradmagic-table" style="{TABLE_STYLE} margin: 4px 0;">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + (more if hidden else "")
        )

    def _steps_html(self) -> str:
        cell = CELL_STYLE
        mono = "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px;"
        head = "".join(
            f'<th style="{cell} text-align:left; background:#f9fafb">{h}</th>' for h in STEP_HEADER
        )
        body = []
        for title, rows in self._step_cells():
            body.append(
                f'<tr><td colspan="6" style="{cell} font-weight:600">optimizer step: <code>{esc(title)}</code></td></tr>'
            )
            for row in rows:
                body.append(
                    "<tr>"
                    + "".join(f'<td style="{cell} {mono}">{esc(c)}</td>' for c in row)
                    + "</tr>"
                )
        unmeasured = [
            steps.budget
            for steps in self.steps
            if any(
                p.change is None and isinstance(p.after, stats.TensorSummary) for p in steps.params
            )
        ]
        budget = max(unmeasured, default=0)
        note = (
            f'<div style="color:#6b7280">‖Δ‖ is measured for large parameters up to '
            f"{budget:,} elements in all (a copy before the step; {DELTA_BUDGET_COPIES:,} "
            "with <code>--copies</code>); the others show their norms after it.</div>"
        )
        return (
            f'<table class="gradmagic-steps" style="{TABLE_STYLE} margin: 8px 0 4px 0;">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + (note if unmeasured else "")
        )

    def _flow_html(self) -> str:
        try:
            svg = self.flow.svg()
        except Exception as exc:  # noqa: BLE001 - the report must still show
            return f'<div style="color:#b91c1c">The gradient-flow chart could not be drawn: {esc(exc)}</div>'
        return f'<div class="gradmagic-flow" style="max-width: 100%; overflow-x: auto;">{svg}</div>'

    def _graph_html(self, g: GradGraph) -> str:
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

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write a standalone HTML page with the findings, table and graphs."""
        page = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>gradmagic report · run {self.run}</title></head>"
            f'<body style="margin: 16px;">{self._repr_html_()}</body></html>\n'
        )
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
        return os.fspath(path)


def _added_text(row: LeafRow) -> str:
    """What this run added: nothing for rows no backward reached."""
    if row.status in ("unchanged", "none"):
        return "—"
    if row.before is None and row.added is row.after and row.after is not None:
        return "= after"  # the whole gradient is new: no need to print it twice
    return stats.format_value(row.added)


STEP_HEADER = ["name", "shape", "grad at step", "before", "after", "change"]


def _change_text(change: Any) -> str:
    """An optimizer step's change: the exact difference, or the norm of a large one."""
    if isinstance(change, float):
        return f"‖Δ‖={change:.4g}"
    return "—" if change is None else stats.format_value(change)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class HistoryView:
    """`%grad history NAME`: how NAME.grad changed, run by run."""

    name: str
    entries: list[Any]

    def _rows(self) -> list[list[str]]:
        return [
            [
                str(e.run),
                stats.format_value(e.before),
                stats.format_value(e.after),
                stats.format_value(e.added),
                e.status,
                str(e.runs),
            ]
            for e in self.entries
        ]

    def __repr__(self) -> str:
        if not self.entries:
            return f"gradmagic has seen no %%grad run change `{self.name}.grad`."
        header = ["run", "before", "after", "added", "status", "runs"]
        rows = [header, *self._rows()]
        widths = [min(48, max(len(r[i]) for r in rows)) for i in range(len(header))]
        lines = [f"history of {self.name}.grad"]
        lines += ["  " + "  ".join(_clip(c, w).ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        if not self.entries:
            return f"<div>{esc(repr(self))}</div>"
        cell = CELL_STYLE + " font-family: monospace;"
        head = "".join(
            f'<th style="{cell} text-align:left">{h}</th>'
            for h in ("cell run", "before", "after", "added", "status", "runs")
        )
        body = []
        for entry, row in zip(self.entries, self._rows()):
            bg = STATUS_STYLE.get(entry.status, ("",))[0]
            style = f' style="background:{bg}"' if bg else ""
            body.append(
                f"<tr{style}>" + "".join(f'<td style="{cell}">{esc(c)}</td>' for c in row) + "</tr>"
            )
        return (
            f'<div style="font-weight:600">history of <code>{esc(self.name)}.grad</code></div>'
            f'<table style="{TABLE_STYLE}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )
