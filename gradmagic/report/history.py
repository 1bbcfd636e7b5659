"""`%grad history NAME`: how NAME.grad changed, run by run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..trajectory import sparkline
from .cells import clip, value_text
from .html import (
    CARD,
    SCROLL,
    STATUS_STYLE,
    TABLE,
    TD,
    TH,
    esc,
    row_open,
    trend_cell,
    value_cell,
)
from .text import TREND_HEAD, TREND_WIDTH, trend_legend, trend_text


@dataclass
class HistoryView:
    name: str
    entries: list[Any]

    def _sparks(self) -> list[Any]:
        return [
            sparkline(e.trajectory, TREND_WIDTH) if e.trajectory is not None else None
            for e in self.entries
        ]

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
        body = self._rows()
        sparks = self._sparks()
        if any(sparks):
            header.append(TREND_HEAD)
            for row, spark in zip(body, sparks):
                row.append(trend_text(spark))
        rows = [header, *body]
        widths = [min(48, max(len(r[i]) for r in rows)) for i in range(len(header))]
        lines = [f"history of {self.name}.grad"]
        lines += ["  " + "  ".join(clip(c, w).ljust(w) for c, w in zip(r, widths)) for r in rows]
        if any(sparks):
            lines.append(f"  {TREND_HEAD}: {trend_legend([s for s in sparks if s])}")
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        if not self.entries:
            return f'<div class="gradmagic" style="{CARD}">{esc(repr(self))}</div>'
        sparks = self._sparks()
        heads = ["cell run", "before", "after", "added", "status", "runs"]
        legend = ""
        if any(sparks):
            heads.append(TREND_HEAD)
            legend = trend_legend([s for s in sparks if s])
        tips = {TREND_HEAD: f' title="{esc(legend)}"'}
        head = "".join(f'<th style="{TH}"{tips.get(h, "")}>{esc(h)}</th>' for h in heads)
        body = []
        for entry, row, spark in zip(self.entries, self._rows(), sparks):
            bg = STATUS_STYLE.get(entry.status, ("#ffffff",))[0]
            run, before, after, added, status, runs = row
            body.append(
                row_open("", bg)
                + f'<td style="{TD}">{esc(run)}</td>'
                + value_cell("gm-before", before)
                + value_cell("gm-after", after)
                + value_cell("gm-added", added)
                + f'<td style="{TD}">{esc(status)}</td><td style="{TD}">{esc(runs)}</td>'
                + (trend_cell(spark, entry.trajectory) if legend else "")
                + "</tr>"
            )
        return (
            f'<div class="gradmagic" style="{CARD}">'
            f'<div style="font-weight: 600;">history of <code>{esc(self.name)}.grad</code></div>'
            f'<div class="gm-scroll" style="{SCROLL}"><table style="{TABLE}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            + (
                f'<div style="color: #4b5563;">{esc(TREND_HEAD)}: {esc(legend)}</div>'
                if legend
                else ""
            )
            + "</div>"
        )
