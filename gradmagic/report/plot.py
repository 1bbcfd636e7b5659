"""The gradient-flow chart: RMS and max |grad| per leaf, in model order, log scale.

Drawn from the values the block recorded (never from live tensors), with
`matplotlib.figure.Figure` and the SVG canvas directly, never pyplot, so the
user's figures and backend are untouched; the SVG is inlined in the static HTML
report. Leaves without a gradient and leaves with NaN/Inf are marked instead of
drawn.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import stats
from ..findings._base import used_value
from ..records import BlockRecord, rows

# Reports with at least this many leaves get the chart unless told otherwise.
AUTO_PLOT_LEAVES = 8
MAX_LABELS = 60
MAX_BARS = 240  # more leaves share bars: thousands of bars take matplotlib a minute
MAX_LABEL_CHARS = 40
COLOURS = {"max": "#93c5fd", "rms": "#1d4ed8", "none": "#6b7280", "nan/inf": "#dc2626"}
# (mark, where on the log axis, marker, legend), from mildest to worst.
MARKS = (
    ("zero", "low", "o", "all zero"),
    ("none", "low", "x", "no gradient"),
    ("nan/inf", "high", "^", "NaN/Inf"),
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

    def svg(self) -> str:
        if self._svg is None:
            self._svg = flow_svg(self.points, vanish=self.vanish, explode=self.explode)
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
        return "gradient flow: " + "; ".join(parts)


def gradient_flow(block: BlockRecord) -> GradientFlow | None:
    """The chart's data, from each row's gradient as put to use, or None when the chart is off."""
    shown = rows(block)
    wanted = block.options.plot
    if wanted is False or (wanted is None and len(shown) < AUTO_PLOT_LEAVES) or not shown:
        return None
    points = []
    for r in shown:
        value = used_value(r) if r.backwards else None
        if value is None:
            points.append(FlowPoint(r.name, None, None, "none"))
        elif stats.nonfinite(value):
            points.append(FlowPoint(r.name, None, None, "nan/inf"))
        else:
            rms, top = _magnitudes(value)
            mark = "zero" if rms == 0 else ("" if rms is not None else "none")
            points.append(FlowPoint(r.name, rms or None, top or None, mark))
    options = block.options
    return GradientFlow(points, options.vanish, options.explode)


def _magnitudes(value: Any) -> tuple[float | None, float | None]:
    """(‖g‖/√n, max |g|) of a recorded value; max is None where only the norm was kept."""
    if isinstance(value, stats.TensorSummary):
        if value.norm is None or not value.numel:
            return None, None
        top = None
        if value.min is not None and value.max is not None:
            top = max(abs(value.min), abs(value.max))
        return value.norm / math.sqrt(value.numel), top
    if isinstance(value, torch.Tensor):
        v, _ = stats.computable(value)
        if v is None or v.numel() == 0:
            return None, None
        (norm,) = stats.norms([v])
        top = float(v.abs().max()) if v.layout == torch.strided else None
        return (norm / math.sqrt(v.numel()) if norm is not None else None), top
    return None, None


def flow_svg(points: list[FlowPoint], *, vanish: float, explode: float) -> str:
    """An inline `<svg>` of the chart: bars of max |grad| and RMS, marks for the rest."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    leaves = len(points)
    points, per_bar = _binned(points, MAX_BARS)
    n = len(points)
    step = max(1, math.ceil(n / MAX_LABELS))
    labels = [_label(p.name) for p in points][::step]
    # Fixed margins sized for the rotated names: tight_layout costs more than the drawing.
    names_height = 0.3 + 0.055 * max(len(label) for label in labels)
    width, height = min(16.0, max(5.0, 1.5 + 0.2 * n)), 2.6 + names_height
    fig = Figure(figsize=(width, height))
    FigureCanvasSVG(fig)
    fig.subplots_adjust(
        left=0.9 / width, right=1 - 0.2 / width, top=1 - 0.6 / height, bottom=names_height / height
    )
    ax = fig.add_subplot()
    drawn = [(i, p) for i, p in enumerate(points) if p.rms and math.isfinite(p.rms)]
    values = [v for _, p in drawn for v in (p.rms, p.max_abs) if v]
    low, high = min(values, default=1e-8) / 10, max(values, default=1.0) * 10
    for kind, width, label in (("max_abs", 0.8, "max |grad|"), ("rms", 0.5, "RMS ‖g‖/√n")):
        bars = [(i, getattr(p, kind)) for i, p in drawn if getattr(p, kind)]
        if bars:
            xs, heights = zip(*bars)
            colour = COLOURS["max" if kind == "max_abs" else "rms"]
            ax.bar(xs, heights, width=width, color=colour, label=label)
    for mark, where, symbol, label in MARKS:
        xs = [i for i, p in enumerate(points) if p.mark == mark]
        if xs:
            y = low if where == "low" else high
            colour = COLOURS["nan/inf" if mark == "nan/inf" else "none"]
            ax.scatter(xs, [y] * len(xs), marker=symbol, color=colour, zorder=3, label=label)
    ax.set_yscale("log")
    # Plain `1e-03` labels: the default `$10^{-3}$` goes through mathtext, slowly.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(low / 2, high * 2)
    for threshold in (vanish, explode):
        if low < threshold < high:
            ax.axhline(threshold, color="#9ca3af", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(0, n, step), labels, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("|grad|")
    grouped = f" ({leaves} leaves, {per_bar} per bar)" if per_bar > 1 else ""
    fig.suptitle(
        f"gradient flow: RMS and max |grad| per leaf{grouped}", x=0.01, ha="left", fontsize=9
    )
    # Above the bars, never over them (and "best" would search every bar: slow). A chart
    # with nothing drawn has no legend: matplotlib would warn into the user's cell.
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncols=5, frameon=False)
    buffer = io.StringIO()
    # Fixed ids keep the SVG reproducible; the context restores the user's rcParams.
    with matplotlib.rc_context({"svg.hashsalt": "gradmagic", "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


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
    return name.replace("$", r"\$")  # `$` would start matplotlib's mathtext
