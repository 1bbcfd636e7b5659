"""`%grad history NAME`: how NAME.grad changed, run by run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import stats
from .html import CELL_STYLE, STATUS_STYLE, TABLE_STYLE, esc
from .text import clip


@dataclass
class HistoryView:
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
        lines += ["  " + "  ".join(clip(c, w).ljust(w) for c, w in zip(r, widths)) for r in rows]
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
