"""`WhyView`: the answer to `report.why("w")` and `%grad why w`, as text and HTML."""

from __future__ import annotations

from dataclasses import dataclass

from .html import CARD, code_spans, esc


@dataclass
class WhyView:
    """Why a leaf's gradient is what it is: `sentences`, each a finding-style line."""

    name: str
    sentences: list[str]

    def __str__(self) -> str:
        return "\n".join(self.sentences)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        items = "".join(f'<li style="margin: 2px 0;">{code_spans(s)}</li>' for s in self.sentences)
        return (
            f'<div class="gradmagic" style="{CARD}"><div style="font-weight: 600;">'
            f"why {esc(self.name)}.grad</div>"
            f'<ul style="padding-left: 18px; margin: 4px 0 0 0;">{items}</ul></div>'
        )
