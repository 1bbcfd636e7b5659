"""`%grad history NAME`: how NAME.grad changed, run by run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cells import clip, value_text
from .html import CARD, SCROLL, STATUS_STYLE, TABLE, TD, TH, esc, row_open, value_cell


@dataclass
class HistoryView:
    name: str
    entries: list[Any]

    def _rows(self) -> list[list[str]]:
        return [
            [
                str(e.run),
                value_text(e.before),
                value_text(e.after),
                value_text(e.added),
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
            return f'<div class="gradmagic" style="{CARD}">{esc(repr(self))}</div>'
        head = "".join(
            f'<th style="{TH}">{h}</th>'
            for h in ("cell run", "before", "after", "added", "status", "runs")
        )
        body = []
        for entry, row in zip(self.entries, self._rows()):
            bg = STATUS_STYLE.get(entry.status, ("#ffffff",))[0]
            run, before, after, added, status, runs = row
            body.append(
                row_open("", bg)
                + f'<td style="{TD}">{esc(run)}</td>'
                + value_cell("gm-before", before)
                + value_cell("gm-after", after)
                + value_cell("gm-added", added)
                + f'<td style="{TD}">{esc(status)}</td><td style="{TD}">{esc(runs)}</td></tr>'
            )
        return (
            f'<div class="gradmagic" style="{CARD}">'
            f'<div style="font-weight: 600;">history of <code>{esc(self.name)}.grad</code></div>'
            f'<div class="gm-scroll" style="{SCROLL}"><table style="{TABLE}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></div>"
        )
