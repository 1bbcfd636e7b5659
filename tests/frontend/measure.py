"""What a reader sees of each gradmagic report on a page, measured in the browser.

`measure_reports(page)` runs one script that returns, for every `div.gradmagic`
in document order: its visible text with computed colours and backgrounds,
the boxes of the gradient table's key cells against what is visible without
scrolling sideways, the graph and chart images, and the report's visible
text. The `*_problems` functions below turn those numbers into readable
failures; they return a list of lines, empty when all is well.

Colours are compared with WCAG 2's contrast ratio, text composited over its
effective background (the first opaque background up the ancestors, with
translucent ones blended on the way).
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

MIN_CONTRAST = 4.5  # WCAG AA for normal text
MIN_GRAPH_PX = 100
KEY_CELLS = ("gm-name", "gm-status", "gm-added", "gm-runs")
# What graphviz puts in ids and titles, never meant to be read: seeing it means
# an SVG was stripped and its <title> text left behind.
GRAPHVIZ_IDS = re.compile(r"cluster_legend|\blegend\d+|\bn\d+\s+n\d+\b")
TOLERANCE_PX = 1.0

Colour = tuple[float, float, float, float]

MEASURE_JS = r"""
async () => {
  // Any CSS colour as [r, g, b, a] (0-255, alpha 0-1); canvas reads what the parser can't.
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 1;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  function rgba(css) {
    const m = /^rgba?\(([^)]+)\)$/.exec(css.trim());
    if (m) {
      const p = m[1].split(/[\s,\/]+/).filter(Boolean).map(parseFloat);
      return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
    }
    ctx.clearRect(0, 0, 1, 1);
    ctx.fillStyle = '#000';
    ctx.fillStyle = css;
    ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return [d[0], d[1], d[2], d[3] / 255];
  }
  function backgrounds(el) {
    // Up to and including the first opaque background; translucent ones on the way.
    const out = [];
    for (let a = el; a; a = a.parentElement) {
      const c = rgba(getComputedStyle(a).backgroundColor);
      if (c[3] > 0) { out.push(c); if (c[3] >= 1) break; }
    }
    return out;
  }
  function box(el) {
    const r = el.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, width: r.width, height: r.height};
  }
  function describe(el) {
    const cls = typeof el.className === 'string' ? el.className.trim().split(/\s+/)[0] : '';
    return el.tagName.toLowerCase() + (cls ? '.' + cls : '');
  }
  const viewport = document.documentElement.clientWidth;
  // The horizontal range of `el`'s box that shows without scrolling anything sideways:
  // the viewport cut by every ancestor that clips its overflow.
  function visibleRange(el) {
    let left = 0, right = viewport, clipper = 'viewport';
    for (let a = el.parentElement; a && a !== document.documentElement; a = a.parentElement) {
      const s = getComputedStyle(a);
      if (s.overflowX === 'visible') continue;
      const r = a.getBoundingClientRect();
      const l = r.left + a.clientLeft, rr = l + a.clientWidth;
      if (l > left) { left = l; clipper = describe(a); }
      if (rr < right) { right = rr; clipper = describe(a); }
    }
    return {left, right, clipper};
  }
  function scroller(el) {
    for (let a = el.parentElement; a; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o === 'auto' || o === 'scroll') return {what: describe(a), ...box(a)};
    }
    return null;
  }
  function visibleText(node) {
    const range = document.createRange();
    range.selectNodeContents(node);
    return [...range.getClientRects()].some(r => r.width > 0 && r.height > 0);
  }
  const reports = [...document.querySelectorAll('div.gradmagic')];
  // Images decoded first, so their sizes are final.
  await Promise.all(reports.flatMap(r => [...r.querySelectorAll('img')])
    .map(img => img.decode().catch(() => null)));
  const cells = [...document.querySelectorAll('.jp-Cell')];
  return reports.map((report, index) => {
    const column = report.closest('.jp-OutputArea-output') || document.body;
    // Text, grouped by (colour, backgrounds) with a few samples of each.
    const groups = new Map();
    let svgText = 0;
    const walker = document.createTreeWalker(report, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      const text = n.textContent.replace(/\s+/g, ' ').trim();
      const el = n.parentElement;
      if (!text || !el) continue;
      // SVG text is painted with `fill` over shapes, not `color` over a CSS background.
      if (el.closest('svg')) { svgText++; continue; }
      const s = getComputedStyle(el);
      if (s.visibility !== 'visible' || !visibleText(n)) continue;
      const color = rgba(s.color), bgs = backgrounds(el);
      const key = JSON.stringify([color, bgs]);
      if (!groups.has(key)) groups.set(key, {color, backgrounds: bgs, count: 0, samples: [],
                                             where: describe(el), fontSize: s.fontSize});
      const g = groups.get(key);
      g.count++;
      if (g.samples.length < 3) g.samples.push(text.slice(0, 60));
    }
    const table = report.querySelector('table.gradmagic-table');
    const rows = table ? [...table.querySelectorAll('tbody tr')].map((tr, i) => {
      const out = {index: i, text: tr.innerText.replace(/\s+/g, ' ').trim().slice(0, 80),
                   cells: {}};
      for (const cls of %(key_cells)s) {
        const cell = tr.querySelector('.' + cls);
        out.cells[cls] = cell ? {...box(cell), visible: visibleRange(cell)} : null;
      }
      return out;
    }) : [];
    const images = sel => [...report.querySelectorAll(sel)].map(el => ({
      tag: el.tagName.toLowerCase(), ...box(el),
      loaded: el.tagName === 'IMG' ? el.complete && el.naturalWidth > 0 : true,
      src: el.tagName === 'IMG' ? (el.getAttribute('src') || '') : null,
    }));
    return {
      index,
      cell: cells.indexOf(report.closest('.jp-Cell')),
      viewport,
      column: {what: describe(column), ...box(column)},
      report: box(report),
      text: report.innerText,
      textGroups: [...groups.values()],
      svgText,
      table: table ? {...box(table), scroller: scroller(table)} : null,
      rows,
      graphs: images('.gradmagic-graph'),
      flows: images('.gradmagic-flow'),
    };
  });
}
""".replace("%(key_cells)s", repr(list(KEY_CELLS)).replace("'", '"'))


def measure_reports(page: Any) -> list[dict[str, Any]]:
    """Every report on the page, measured (see the module's docstring)."""
    return page.evaluate(MEASURE_JS)


# -- contrast -------------------------------------------------------------------------------
def _linear(channel: float) -> float:
    c = channel / 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def luminance(rgb: tuple[float, float, float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0-255 channels)."""
    r, g, b = (_linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def composite(top: Colour, bottom: tuple[float, float, float]) -> tuple[float, float, float]:
    """`top` painted over the opaque `bottom`."""
    a = top[3]
    return tuple(top[i] * a + bottom[i] * (1 - a) for i in range(3))  # type: ignore[return-value]


def effective_background(backgrounds: list[Colour]) -> tuple[float, float, float]:
    """The opaque colour behind text: translucent layers over the first opaque one.

    With no opaque layer at all, the page's canvas shows: white.
    """
    base: tuple[float, float, float] = (255.0, 255.0, 255.0)
    for layer in reversed(backgrounds):
        base = composite(layer, base)
    return base


def contrast_ratio(fg: tuple[float, float, float], bg: tuple[float, float, float]) -> float:
    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_contrast(group: dict[str, Any]) -> float:
    bg = effective_background([tuple(c) for c in group["backgrounds"]])
    return contrast_ratio(composite(tuple(group["color"]), bg), bg)


def _css(colour: Any) -> str:
    r, g, b = (round(c) for c in colour[:3])
    a = colour[3] if len(colour) > 3 else 1
    return f"#{r:02x}{g:02x}{b:02x}" + ("" if a >= 1 else f"@{a:.2f}")


# -- the checks -----------------------------------------------------------------------------
def contrast_problems(
    reports: list[dict[str, Any]], minimum: float = MIN_CONTRAST, worst: int = 8
) -> list[str]:
    """Text below `minimum` contrast, worst first, with its colours and some of its words."""
    low = []
    for rep in reports:
        for g in rep["textGroups"]:
            ratio = text_contrast(g)
            if ratio < minimum:
                bg = effective_background([tuple(c) for c in g["backgrounds"]])
                low.append(
                    (
                        ratio,
                        f"{ratio:.2f}:1 {_css(g['color'])} on {_css(bg)} "
                        f"({g['count']}x in {g['where']}, {rep['where']}): "
                        + " | ".join(repr(s) for s in g["samples"]),
                    )
                )
    low.sort()
    lines = [line for _, line in low[:worst]]
    if len(low) > worst:
        lines.append(f"... and {len(low) - worst} more colour pairs below {minimum}:1")
    return lines


def worst_contrast(reports: list[dict[str, Any]]) -> float | None:
    ratios = [text_contrast(g) for rep in reports for g in rep["textGroups"]]
    return min(ratios, default=None)


def key_cell_problems(
    reports: list[dict[str, Any]], cells: tuple[str, ...] = KEY_CELLS
) -> list[str]:
    """Key cells of the gradient table that do not show without scrolling sideways.

    A cell must lie inside the viewport and inside every box that clips it (the
    table's own scrolling container at its initial position, the notebook
    column); that scrolling container must itself fit the column.
    """
    problems = []
    for rep in reports:
        table = rep["table"]
        if table is None:
            continue
        column = rep["column"]
        scroller = table["scroller"]
        if scroller is not None and scroller["right"] > column["right"] + TOLERANCE_PX:
            problems.append(
                f"{rep['where']}: the table's scrolling box {scroller['what']} ends at "
                f"{scroller['right']:.0f}px, past the column ({column['what']}, "
                f"right edge {column['right']:.0f}px)"
            )
        if not rep["rows"]:
            problems.append(f"{rep['where']}: the gradient table has no rows")
        for row in rep["rows"]:
            for cls in cells:
                cell = row["cells"].get(cls)
                if cell is None:
                    problems.append(f"{rep['where']} row {row['index']}: no .{cls} cell")
                    continue
                vis = cell["visible"]
                if cell["width"] <= 0 or cell["height"] <= 0:
                    problems.append(f"{rep['where']} row {row['index']}: .{cls} has no size")
                elif (
                    cell["left"] < vis["left"] - TOLERANCE_PX
                    or cell["right"] > vis["right"] + TOLERANCE_PX
                ):
                    problems.append(
                        f"{rep['where']} row {row['index']} ({row['text'][:40]!r}): .{cls} "
                        f"spans {cell['left']:.0f}-{cell['right']:.0f}px, visible range "
                        f"{vis['left']:.0f}-{vis['right']:.0f}px (clipped by {vis['clipper']}, "
                        f"viewport {rep['viewport']}px)"
                    )
    return problems


def _image_problems(rep: dict[str, Any], found: list[dict[str, Any]], what: str) -> list[str]:
    problems = []
    shown = [
        g
        for g in found
        if g["tag"] in ("img", "svg")
        and g["loaded"]
        and g["width"] >= MIN_GRAPH_PX
        and g["height"] >= MIN_GRAPH_PX
    ]
    if not shown:
        seen = ", ".join(
            f"<{g['tag']}> {g['width']:.0f}x{g['height']:.0f}px"
            + ("" if g["loaded"] else " (not loaded)")
            for g in found
        )
        problems.append(
            f"{rep['where']}: no .{what} <img>/<svg> of at least {MIN_GRAPH_PX}x{MIN_GRAPH_PX}px"
            f" (found: {seen or 'nothing'})"
        )
    return problems


def graph_problems(reports: list[dict[str, Any]], expected: list[Expected]) -> list[str]:
    """Reports whose graph (or gradient-flow chart) does not show as a picture of size."""
    problems = []
    for rep, exp in zip(reports, expected):
        if exp.graphs:
            problems += _image_problems(rep, rep["graphs"], "gradmagic-graph")
        if exp.flows:
            problems += _image_problems(rep, rep["flows"], "gradmagic-flow")
    return problems


def graph_sizes(reports: list[dict[str, Any]]) -> list[str]:
    return [
        f"<{g['tag']}> {g['width']:.0f}x{g['height']:.0f}" for rep in reports for g in rep["graphs"]
    ]


def graphviz_id_problems(reports: list[dict[str, Any]]) -> list[str]:
    """Reports whose visible text shows graphviz's internal ids."""
    problems = []
    for rep in reports:
        found = sorted({m.group(0) for m in GRAPHVIZ_IDS.finditer(rep["text"])})
        if found:
            problems.append(f"{rep['where']}: visible text holds graphviz ids {found[:6]}")
    return problems


def count_problems(
    reports: list[dict[str, Any]], expected: list[Expected], where: str
) -> list[str]:
    if len(reports) != len(expected):
        return [f"{where}: {len(reports)} reports on the page, {len(expected)} in the notebook"]
    return []


# -- what the notebook says should be there -------------------------------------------------
@dataclass
class Expected:
    """What one report's HTML holds, read from the notebook before any browser sees it."""

    graphs: int = 0
    flows: int = 0
    table: bool = False
    classes: set[str] = field(default_factory=set)


class _Classes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "class" and value:
                self.classes.extend(value.split())


def expected_from_html(html: str) -> Expected:
    parser = _Classes()
    parser.feed(html)
    classes = parser.classes
    return Expected(
        graphs=classes.count("gradmagic-graph"),
        flows=classes.count("gradmagic-flow"),
        table="gradmagic-table" in classes,
        classes=set(classes),
    )


# -- escaping -------------------------------------------------------------------------------
INERT_JS = r"""
() => ({
  title: document.title,
  pwned: window.pwned === undefined ? null : String(window.pwned),
  // Pictures the report may hold are data: URIs; anything else came from a name.
  foreignImages: [...document.querySelectorAll('div.gradmagic img')]
    .map(i => i.getAttribute('src') || '').filter(s => !s.startsWith('data:image/')),
  scripts: [...document.querySelectorAll('script')]
    .filter(s => s.textContent.includes('pwned')).length,
  handlers: [...document.querySelectorAll('div.gradmagic *')]
    .filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
  text: [...document.querySelectorAll('div.gradmagic')].map(r => r.innerText).join('\n'),
  svgText: [...document.querySelectorAll('div.gradmagic svg text')]
    .map(t => t.textContent).join(' '),
  graphSources: [...document.querySelectorAll('div.gradmagic img.gradmagic-graph')]
    .map(i => i.getAttribute('src') || ''),
})
"""


def svg_texts_of_data_uri(uri: str) -> str:
    """The <text> of an SVG carried by a `data:image/svg+xml` URI (base64 or not)."""
    head, _, payload = uri.partition(",")
    if "base64" in head:
        svg = base64.b64decode(payload).decode("utf-8")
    else:
        from urllib.parse import unquote

        svg = unquote(payload)
    root = ET.fromstring(svg)
    return " ".join("".join(t.itertext()) for t in root.iter() if t.tag.endswith("text"))


def inert_problems(
    state: dict[str, Any], title: str | None, shown: tuple[str, ...], in_graph: str | None
) -> list[str]:
    """What ran or went missing on a page whose reports name things with HTML."""
    problems = []
    if title is not None and state["title"] != title:
        problems.append(f"document.title is {state['title']!r}, not {title!r}")
    if "pwned" in state["title"]:
        problems.append(f"a name ran code: document.title is {state['title']!r}")
    if state["pwned"] is not None:
        problems.append(f"a name ran code: window.pwned = {state['pwned']}")
    if state["foreignImages"]:
        problems.append(f"images made from names: {state['foreignImages']}")
    if state["scripts"]:
        problems.append(f"{state['scripts']} <script> elements made from names")
    if state["handlers"]:
        problems.append(f"{state['handlers']} elements with on* attributes in the report")
    for payload in shown:
        if payload not in state["text"]:
            problems.append(f"{payload!r} is not shown as text")
    if in_graph is not None:
        labels = (
            state["svgText"]
            + " "
            + " ".join(
                svg_texts_of_data_uri(src)
                for src in state["graphSources"]
                if src.startswith("data:")
            )
        )
        if in_graph not in labels:
            problems.append(f"the graph does not label its leaf {in_graph!r}: {labels[:200]!r}")
    return problems
