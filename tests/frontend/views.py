"""Every place a report is looked at, measured once: a `View` per (where, theme, width).

- `lab-trusted-*`: the notebook opened in JupyterLab and run there (Run > Run All
  Cells): outputs from a live kernel are trusted, rendered as they are.
- `lab-untrusted-*`: the notebook executed beforehand by nbclient, unsigned,
  opened from disk: its HTML goes through JupyterLab's sanitizer.
- `nbconvert-*`: the static pages `python -m gradmagic demo` writes.
- `vscode-*`: the reports' HTML on VS Code's dark editor colours.

One page per notebook serves all four lab views of it: measured at 1280 and
800 px in the light theme, then in the dark theme chosen from the Settings
menu, so that trusted outputs need not be run twice.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from . import browser as br
from . import lab as jl
from . import measure, notebooks

WIDTHS = (1280, 800)
# The pictures in docs/ (and the README), taken while the views are measured:
# file name -> (mode, notebook, theme, width, report index, "table" or "all").
SHOTS = {
    "wide-table.png": ("trusted", notebooks.CASES, "light", 1280, 3, "table"),
    "dark-theme.png": ("trusted", notebooks.CASES, "dark", 1280, 1, "all"),
    "untrusted.png": ("untrusted", "01_backward_basics", "light", 1280, 0, "all"),
}
SHOT_HEIGHT = 2400
THEMES = {"light": jl.LIGHT, "dark": jl.DARK}
LAB_MODES = ("trusted", "untrusted")


def view_names() -> list[str]:
    names = [
        f"lab-{mode}-{theme}-{width}" for mode in LAB_MODES for theme in THEMES for width in WIDTHS
    ]
    names += [f"nbconvert-light-{width}" for width in WIDTHS]
    names += [f"vscode-dark-{width}" for width in WIDTHS]
    return names


@dataclass
class View:
    """The reports of every notebook as one view shows them."""

    name: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    expected: list[measure.Expected] = field(default_factory=list)
    # Pages whose number of reports differs from the notebook's.
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # The escaping state of the page that shows the reports with HTML names.
    inert: dict[str, Any] | None = None
    seconds: float = 0.0

    def add(
        self, label: str, reports: list[dict[str, Any]], expected: list[measure.Expected]
    ) -> None:
        for rep in reports:
            rep["where"] = f"{self.name} {label} report {rep['index'] + 1} (cell {rep['cell'] + 1})"
        self.missing += measure.count_problems(reports, expected, f"{self.name} {label}")
        if len(reports) == len(expected):
            self.expected += expected
            self.reports += reports
        else:  # without a one-to-one match, checks that need expectations skip these
            self.expected += [measure.Expected()] * len(reports)
            self.reports += reports


class Collector:
    """Measures the views on first request; keeps the server, browser and notebooks."""

    def __init__(self, workdir: Path, browser: Any, lab: jl.JupyterLab) -> None:
        self.workdir = workdir
        self.browser = browser
        self.lab = lab
        self.sources = notebooks.sources(workdir / "src")
        # nbclient runs in the background while the browser works in JupyterLab.
        self.demo = notebooks.DemoRun(self.sources, workdir / "demo")
        self.views: dict[str, View] = {}
        self.timings: dict[str, float] = {}
        self.shots: dict[str, Path] = {}
        self.shot_dir = workdir / "screenshots"

    def view(self, name: str) -> View:
        if name not in self.views:
            start = time.perf_counter()
            group = name.rsplit("-", 2)[0]
            if group.startswith("lab-"):
                self._lab(group.removeprefix("lab-"))
            elif group == "nbconvert":
                self._pages("nbconvert", "light", self._nbconvert_pages())
            elif group == "vscode":
                self._pages("vscode", "dark", [self._vscode_page()])
            self.timings[group] = time.perf_counter() - start
        return self.views[name]

    def close(self) -> None:
        self.demo.stop()

    # -- JupyterLab ---------------------------------------------------------------------------
    def _lab(self, mode: str) -> None:
        views = {(t, w): View(f"lab-{mode}-{t}-{w}") for t in THEMES for w in WIDTHS}
        for name, source in self.sources.items():
            if mode == "trusted":
                path = notebooks.copy_cleared(source, self.lab.root / "trusted" / f"{name}.ipynb")
            else:
                path = self.lab.root / "untrusted" / f"{name}.ipynb"
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.demo.wait().executed(name), path)
            cells = len(nbformat.read(str(path), as_version=4).cells)
            page = br.new_page(self.browser, WIDTHS[0])
            try:
                self.lab.set_theme(jl.LIGHT)
                relative = path.relative_to(self.lab.root).as_posix()
                jl.open_notebook(page, self.lab, relative, cells)
                if mode == "trusted":
                    jl.run_all(page, self.lab, relative)
                # Only now wait for nbclient, which ran meanwhile: it says what to expect.
                expected = self._expected(name)
                jl.wait_for_reports(page, len(expected))
                for theme, width in (
                    ("light", 1280),
                    ("light", 800),
                    ("dark", 800),
                    ("dark", 1280),
                ):
                    jl.switch_theme(page, THEMES[theme])
                    br.set_width(page, width)
                    view = views[(theme, width)]
                    view.add(name, measure.measure_reports(page), expected)
                    if name == notebooks.CASES:
                        view.inert = page.evaluate(measure.INERT_JS)
                    self._shoot(page, (mode, name, theme, width))
                errors = [f"{name}: {e}" for e in page.errors.errors]
            finally:
                br.close_page(page)
                self.lab.shutdown_kernels()
            for view in views.values():
                view.errors += errors
        for view in views.values():
            self.views[view.name] = view

    def _shoot(self, page: Any, where: tuple[str, str, str, int]) -> None:
        for file, (mode, name, theme, width, index, part) in SHOTS.items():
            if (mode, name, theme, width) != where:
                continue
            self.shot_dir.mkdir(parents=True, exist_ok=True)
            # A tall window, so that the whole output fits in the notebook's scrolling panel.
            page.set_viewport_size({"width": width, "height": SHOT_HEIGHT})
            try:
                # The output area: the report as it sits in the notebook, prompt included.
                output = page.locator(".jp-OutputArea-child", has=page.locator("div.gradmagic"))
                target = output.nth(index)
                target.scroll_into_view_if_needed()
                page.evaluate(
                    "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
                )
                box = target.bounding_box()
                if part == "table":
                    # Down to the end of the gradient table, with a margin.
                    table = target.locator("div.gm-scroll").first.bounding_box()
                    box["height"] = table["y"] + table["height"] + 12 - box["y"]
                path = self.shot_dir / file
                page.screenshot(path=str(path), clip=box, animations="disabled")
                self.shots[file] = path
            finally:
                page.set_viewport_size({"width": width, "height": br.HEIGHT})

    def _expected(self, name: str) -> list[measure.Expected]:
        return notebooks.expected_reports(self.demo.wait().executed(name))

    # -- static pages ---------------------------------------------------------------------
    def _nbconvert_pages(self) -> list[tuple[str, Path, list[measure.Expected]]]:
        self.demo.wait()
        return [(name, self.demo.page(name), self._expected(name)) for name in self.sources]

    def _vscode_page(self) -> tuple[str, Path, list[measure.Expected]]:
        htmls = [
            h
            for name in self.sources
            for h in notebooks.report_htmls(self.demo.wait().executed(name))
        ]
        page = notebooks.vscode_page(htmls, self.workdir / "vscode.html")
        return ("all notebooks", page, [measure.expected_from_html(h) for h in htmls])

    def _pages(
        self, where: str, theme: str, pages: list[tuple[str, Path, list[measure.Expected]]]
    ) -> None:
        views = {w: View(f"{where}-{theme}-{w}") for w in WIDTHS}
        for label, path, expected in pages:
            page = br.new_page(self.browser, WIDTHS[0])
            try:
                page.goto(path.as_uri())
                for width in WIDTHS:
                    br.set_width(page, width)
                    views[width].add(label, measure.measure_reports(page), expected)
                    if label in (notebooks.CASES, "all notebooks"):
                        views[width].inert = page.evaluate(measure.INERT_JS)
                errors = [f"{label}: {e}" for e in page.errors.errors]
            finally:
                br.close_page(page)
            for view in views.values():
                view.errors += errors
        for view in views.values():
            self.views[view.name] = view


@contextmanager
def collector(workdir: Path | None = None) -> Iterator[Collector]:
    """A JupyterLab server, a browser and the notebooks, for as long as the block runs."""
    with (
        contextlib_tempdir(workdir) as tmp,
        br.chromium() as browser,
        jl.JupyterLab(tmp / "lab") as lab,
    ):
        c = Collector(tmp, browser, lab)
        try:
            yield c
        finally:
            c.close()


@contextmanager
def contextlib_tempdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gradmagic-frontend-") as tmp:
        yield Path(tmp)
