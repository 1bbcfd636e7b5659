"""The gradient-flow chart: RMS and max |grad| per leaf, in model order, log scale.

Drawn from the values the block recorded (never from live tensors) as SVG text
written directly: no plotting library is imported, so the user's figures and
settings are untouched, and the cost stays at a few milliseconds for thousands of
leaves. Leaves without a gradient and leaves with NaN/Inf are marked instead of
drawn.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import stats
from ..findings._base import used_value
from ..records import BlockRecord, rows

# Reports with at least this many leaves get the chart unless told otherwise.
AUTO_PLOT_LEAVES = 8
MAX_BARS = 240  # more leaves share bars, so the chart stays a readable width
MAX_LABEL_CHARS = 40
COLOURS = {"max": "#93c5fd", "rms": "#1d4ed8", "none": "#4b5563", "nan/inf": "#dc2626"}
INK = "#1f2937"
FONT = "Helvetica, Arial, sans-serif"
CHAR_PX = 6.2  # width of a character at 10-11 px, for sizing the margins
# (mark, where on the axis, legend), from mildest to worst.
MARKS = (
    ("zero", "low", "all zero"),
    ("none", "low", "no gradient"),
    ("nan/inf", "high", "NaN/Inf"),
)


@dataclass(frozen=True)
class FlowPoint:
    """One leaf on the chart; `rms`/`max_abs` are None where there is nothing to draw."""

    name: str
    rms: float | None  # ‖g‖ / √n
    max_abs: float | None
    mark: str = ""  # "none", "nan/inf", "zero" or ""


@dataclass
class GradientFlow:
    """The chart's data (floats only) and its SVG, drawn once on demand."""

    points: list[FlowPoint]
    vanish: float
    explode: float
    _svg: str | None = field(default=None, repr=False)
    # ", of this rank's shards" when some values are one rank's part of a DTensor
    scope: str = ""

    def svg(self) -> str:
        if self._svg is None:
            self._svg = flow_svg(
                self.points, vanish=self.vanish, explode=self.explode, scope=self.scope
            )
        return self._svg

    def summary(self) -> str:
        """The chart in one line of text, for terminals."""
        drawn = [p for p in self.points if p.rms]
        parts = []
        if drawn:
            low = min(drawn, key=lambda p: p.rms or 0.0)
            high = max(drawn, key=lambda p: p.rms or 0.0)
            parts.append(
                f"RMS |grad| from {low.rms:.2g} ({low.name}) to {high.rms:.2g} ({high.name})"
            )
        for mark in ("none", "nan/inf", "zero"):
            count = sum(p.mark == mark for p in self.points)
            if count:
                parts.append(f"{count} {mark}")
        return f"gradient flow{self.scope}: " + "; ".join(parts)


def gradient_flow(block: BlockRecord) -> GradientFlow | None:
    """The chart's data, from each row's gradient as put to use, or None when the chart is off."""
    shown = rows(block)
    wanted = block.options.plot
    if wanted is False or (wanted is None and len(shown) < AUTO_PLOT_LEAVES) or not shown:
        return None
    points, parts = [], False
    for r in shown:
        value = used_value(r) if r.backwards else None
        parts = parts or (isinstance(value, stats.TensorSummary) and value.part)
        if value is None:
            points.append(FlowPoint(r.name, None, None, "none"))
        elif stats.nonfinite(value):
            points.append(FlowPoint(r.name, None, None, "nan/inf"))
        else:
            rms, top = _magnitudes(value)
            mark = "zero" if rms == 0 else ("" if rms is not None else "none")
            points.append(FlowPoint(r.name, rms or None, top or None, mark))
    options = block.options
    scope = f", of {stats.PART} shards" if parts else ""
    return GradientFlow(points, options.vanish, options.explode, scope=scope)


def _magnitudes(value: Any) -> tuple[float | None, float | None]:
    """(‖g‖/√n, max |g|) of a recorded value; max is None where only the norm was kept."""
    if isinstance(value, stats.TensorSummary):
        if value.norm is None or not value.numel:
            return None, None
        top = None
        if value.min is not None and value.max is not None:
            top = max(abs(value.min), abs(value.max))
        return value.norm / math.sqrt(value.numel), top
    if isinstance(value, torch.Tensor) and stats.numel_of(value) > stats.PRINT_LIMIT:
        return _magnitudes(stats.summary_of(value))
    if isinstance(value, torch.Tensor):
        v, _ = stats.computable(value)
        if v is None or v.numel() == 0:
            return None, None
        (norm,) = stats.norms([v])
        top = float(v.abs().max()) if v.layout == torch.strided else None
        return (norm / math.sqrt(v.numel()) if norm is not None else None), top
    return None, None


def flow_svg(points: list[FlowPoint], *, vanish: float, explode: float, scope: str = "") -> str:
    """The chart as SVG text, written directly: bars of max |grad| and RMS on a log axis,
    marks for the leaves with nothing to draw, the names under the bars.

    Written, not plotted: the cost is a few string joins at any size, every text is at
    least 10 px, and the output is the same bytes for the same values.
    """
    leaves = len(points)
    points, per_bar = _binned(points, MAX_BARS)
    n = len(points)
    slot = max(6.0, min(24.0, 900.0 / max(n, 1)))  # px per leaf
    label_every = max(1, math.ceil(12.0 / slot))  # a 10 px name needs 12 px of room
    labels = {i: _label(p.name) for i, p in enumerate(points) if i % label_every == 0}
    names_h = 12 + CHAR_PX * max((len(t) for t in labels.values()), default=0)
    left, right, top, plot_h = 56.0, 12.0, 56.0, 200.0
    width = left + slot * n + right
    height = top + plot_h + names_h
    drawn = [(i, p) for i, p in enumerate(points) if p.rms and math.isfinite(p.rms)]
    values = [v for _, p in drawn for v in (p.rms, p.max_abs) if v and math.isfinite(v)]
    lo = math.floor(math.log10(min(values, default=1e-8))) - 1
    hi = math.ceil(math.log10(max(values, default=1.0))) + 1
    bottom = top + plot_h

    def y(value: float) -> float:
        return bottom - (math.log10(value) - lo) / (hi - lo) * plot_h

    def x(i: int) -> float:
        return left + slot * (i + 0.5)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}" font-size="11">',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
    ]
    grouped = f" ({leaves} leaves, {per_bar} per bar)" if per_bar > 1 else ""
    out.append(
        f'<text x="4" y="16" font-size="12" font-weight="600" fill="{INK}">'
        f"gradient flow: RMS and max |grad| per leaf{_x(scope + grouped)}</text>"
    )
    # Legend: only what the chart shows.
    legend, lx = [], 4.0
    kinds = [("max", "max |grad|", bool(drawn)), ("rms", "RMS ‖g‖/√n", bool(drawn))]
    kinds += [(m, label, any(p.mark == m for p in points)) for m, _, label in MARKS]
    for kind, label, shown in kinds:
        if not shown:
            continue
        legend.append(_symbol(kind, lx + 5, 32))
        legend.append(f'<text x="{lx + 14:.1f}" y="36" fill="{INK}">{_x(label)}</text>')
        lx += 24 + CHAR_PX * len(label)
    out.extend(legend)
    # Decades: grid lines and labels.
    for d in range(lo, hi + 1):
        yy = y(10.0**d)
        out.append(
            f'<line x1="{left}" y1="{yy:.1f}" x2="{width - right:.1f}" y2="{yy:.1f}" '
            f'stroke="#e5e7eb" stroke-width="1"/>'
            f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" fill="{INK}">1e{d}</text>'
        )
    for threshold in (vanish, explode):
        if threshold > 0 and 10.0**lo < threshold < 10.0**hi:
            yy = y(threshold)
            out.append(
                f'<line x1="{left}" y1="{yy:.1f}" x2="{width - right:.1f}" y2="{yy:.1f}" '
                f'stroke="#6b7280" stroke-width="1" stroke-dasharray="4 3"/>'
            )
    for kind, frac in (("max_abs", 0.8), ("rms", 0.5)):
        colour = COLOURS["max" if kind == "max_abs" else "rms"]
        path = []
        for i, p in drawn:
            v = getattr(p, kind)
            if v and math.isfinite(v):
                w = slot * frac
                path.append(f"M{x(i) - w / 2:.1f} {bottom:.1f}V{y(v):.1f}h{w:.1f}V{bottom:.1f}z")
        if path:
            out.append(f'<path fill="{colour}" d="{"".join(path)}"/>')
    for mark, where, _label_text in MARKS:
        yy = bottom - 6 if where == "low" else top + 6
        out.extend(_symbol(mark, x(i), yy) for i, p in enumerate(points) if p.mark == mark)
    out.append(
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="{INK}"/>'
        f'<line x1="{left}" y1="{bottom}" x2="{width - right:.1f}" y2="{bottom}" stroke="{INK}"/>'
    )
    out.append(
        f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle" fill="{INK}">|grad|</text>'
    )
    for i, text in labels.items():
        out.append(
            f'<text transform="translate({x(i) + 3.5:.1f} {bottom + 6:.1f}) rotate(90)" '
            f'font-size="10" fill="{INK}">{_x(text)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _symbol(kind: str, cx: float, cy: float) -> str:
    """A legend swatch or a mark: bars are squares; zero a circle, none a cross, NaN/Inf a
    triangle."""
    if kind in ("max", "rms"):
        return f'<rect x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" fill="{COLOURS[kind]}"/>'
    if kind == "zero":
        return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="none" stroke="{COLOURS["none"]}" stroke-width="1.5"/>'
    if kind == "none":
        return (
            f'<path d="M{cx - 3.5:.1f} {cy - 3.5:.1f}l7 7m0 -7l-7 7" stroke="{COLOURS["none"]}" '
            f'stroke-width="1.5"/>'
        )
    return f'<path d="M{cx:.1f} {cy - 4.5:.1f}l4.5 8h-9z" fill="{COLOURS["nan/inf"]}"/>'


def _x(text: str) -> str:
    """Text made literal in SVG."""
    return html.escape(text, quote=True)


def _binned(points: list[FlowPoint], most: int) -> tuple[list[FlowPoint], int]:
    """Neighbouring leaves merged into at most `most` bars, and how many leaves per bar.

    A bar shows the largest max and the mean of the RMS values; its mark is the
    worst of its leaves' (NaN/Inf, then none, then zero).
    """
    size = math.ceil(len(points) / most)
    if size <= 1:
        return points, 1
    merged = []
    for start in range(0, len(points), size):
        group = points[start : start + size]
        tops = [p.max_abs for p in group if p.max_abs is not None and math.isfinite(p.max_abs)]
        means = [p.rms for p in group if p.rms is not None]
        marks = {p.mark for p in group}
        mark = next((m for m, *_ in MARKS[::-1] if m in marks), "")
        merged.append(
            FlowPoint(
                f"{group[0].name} …",
                sum(means) / len(means) if means else None,
                max(tops) if tops else None,
                mark,
            )
        )
    return merged, size


def _label(name: str) -> str:
    """A tick label: one line, clipped in the middle (the end says weight or bias)."""
    name = " ".join(name.split())
    if len(name) > MAX_LABEL_CHARS:
        name = name[:15] + "…" + name[-(MAX_LABEL_CHARS - 16) :]
    return name
