"""What a person sees of the reports, in real JupyterLab and in the exported pages.

A JupyterLab server started here on 127.0.0.1 and Debian's headless Chromium
driven by Playwright (no browser downloaded) show every demo notebook and a
notebook of hard cases: trusted (run from the Run menu) and untrusted (run
beforehand by nbclient, opened from disk), in the light and the dark theme,
at 1280 and 800 px; then the nbconvert pages and VS Code's dark colours.
Every view is measured once (`tests/frontend`); each test asserts one thing
a reader needs, over every report of every view.

Set GRADMAGIC_SCREENSHOTS=DIR to keep the screenshots the run takes (the
README's pictures: `python -m tests.frontend.screenshots docs`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.frontend import browser as br
from tests.frontend import measure, notebooks, views

pytestmark = [
    pytest.mark.browser,
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(br.why_no_browser() is not None, reason=str(br.why_no_browser())),
]

VIEWS = views.view_names()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[views.Collector]:
    with views.collector(tmp_path_factory.mktemp("frontend")) as c:
        yield c
        keep = os.environ.get("GRADMAGIC_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for name, path in c.shots.items():
                shutil.copy(path, Path(keep) / name)


def _view(collector: views.Collector, name: str) -> views.View:
    view = collector.view(name)
    assert view.reports, f"{name}: no reports measured"
    return view


def _fail(lines: list[str]) -> None:
    if lines:
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.mark.parametrize("name", VIEWS)
def test_every_report_is_on_the_page(collector, name):
    view = _view(collector, name)
    _fail(view.missing)


@pytest.mark.parametrize("name", VIEWS)
def test_every_text_has_contrast(collector, name):
    view = _view(collector, name)
    _fail(measure.contrast_problems(view.reports))
    worst = measure.worst_contrast(view.reports)
    assert worst is not None and worst >= measure.MIN_CONTRAST


@pytest.mark.parametrize("name", VIEWS)
def test_name_status_added_and_runs_show_without_scrolling(collector, name):
    view = _view(collector, name)
    assert any(rep["rows"] for rep in view.reports), f"{name}: no table rows measured"
    _fail(measure.key_cell_problems(view.reports))


@pytest.mark.parametrize("name", VIEWS)
def test_graphs_show_as_pictures(collector, name):
    view = _view(collector, name)
    assert sum(e.graphs for e in view.expected) > 0, f"{name}: no report holds a graph"
    _fail(measure.graph_problems(view.reports, view.expected))


@pytest.mark.parametrize("name", VIEWS)
def test_no_graphviz_ids_as_text(collector, name):
    view = _view(collector, name)
    _fail(measure.graphviz_id_problems(view.reports))


@pytest.mark.parametrize("name", VIEWS)
def test_names_that_are_html_show_as_text_and_run_nothing(collector, name):
    view = _view(collector, name)
    assert view.inert is not None, f"{name}: the hard-cases page was not measured"
    _fail(
        measure.inert_problems(
            view.inert, title=None, shown=notebooks.SHOWN, in_graph="<img src=x onerror="
        )
    )


@pytest.mark.parametrize("name", VIEWS)
def test_no_script_errors(collector, name):
    view = _view(collector, name)
    _fail(view.errors)


def test_the_accumulated_row_is_marked_in_both_themes(collector):
    for name in ("lab-trusted-light-1280", "lab-trusted-dark-1280"):
        view = _view(collector, name)
        rows = [
            row["text"]
            for rep in view.reports
            if rep["where"].startswith(f"{name} {notebooks.CASES} ")
            for row in rep["rows"]
        ]
        assert any("accumulated" in text and "w" in text for text in rows), (name, rows)


def test_screenshots_were_taken(collector):
    for name in VIEWS:
        if name.startswith("lab-"):
            collector.view(name)
    assert sorted(collector.shots) == sorted(views.SHOTS)
    for path in collector.shots.values():
        assert path.stat().st_size > 5_000, path


# -- a saved report page --------------------------------------------------------------------
def _hostile_report() -> Any:
    import torch
    from torch import nn

    import gradmagic

    names = {notebooks.IMG: torch.ones(2, requires_grad=True)}
    names[notebooks.SCRIPT] = torch.ones(2, requires_grad=True)
    layers = nn.ModuleDict({notebooks.MODULE: nn.Linear(2, 1)})
    with gradmagic.watch({"weights": names, "layers": layers}) as rec:
        layers[notebooks.MODULE](names[notebooks.IMG] * names[notebooks.SCRIPT]).sum().backward()
    return rec.report()


def test_a_saved_report_page_is_inert_and_readable(collector, tmp_path):
    report = _hostile_report()
    page_path = Path(report.save(tmp_path / "hostile.html"))
    page = br.new_page(collector.browser, 800)
    try:
        page.goto(page_path.as_uri())
        state = page.evaluate(measure.INERT_JS)
        reports = measure.measure_reports(page)
        errors = list(page.errors.errors)
    finally:
        br.close_page(page)
    for rep in reports:
        rep["where"] = "saved page"
    _fail(
        measure.inert_problems(
            state,
            title=f"gradmagic report · run {report.run}",
            shown=notebooks.SHOWN,
            in_graph="<img src=x onerror=",
        )
    )
    _fail(measure.contrast_problems(reports))
    _fail(measure.key_cell_problems(reports))
    [expected] = [measure.expected_from_html(report._repr_html_())]
    _fail(measure.graph_problems(reports, [expected]))
    assert errors == []
