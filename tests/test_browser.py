"""The exported demo pages and a hostile report, rendered by a real headless Chromium.

What is checked is what a reader sees: the gradient table and the graph are
on the page, visible, and fit the notebook column (or scroll inside it);
user-supplied names render as text and run nothing. The browser is driven
through the DevTools protocol on a pipe by the small client in
`docs/make_screenshot.py`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_client() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gradmagic_docs_screenshot", ROOT / "docs" / "make_screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = _load_client()
CHROMIUM = client.find_chromium()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)"),
]

WIDTH = 1000  # a laptop browser window; the notebook column is narrower

# Every report on the page: its table, graphs and charts, with sizes and visibility.
MEASURE_JS = """
(function () {
  function box(el) {
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    return {width: r.width, height: r.height, left: r.left, right: r.right,
            visible: r.width > 0 && r.height > 0 && s.visibility !== 'hidden'
                     && s.display !== 'none' && parseFloat(s.opacity) > 0};
  }
  function scroller(el) {
    for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll') return {...box(p), overflowX: o};
    }
    return null;
  }
  return [...document.querySelectorAll('div.gradmagic')].map(report => {
    const column = report.closest('.jp-OutputArea-output') || document.body;
    const table = report.querySelector('table.gradmagic-table');
    return {
      column: box(column),
      report: box(report),
      table: table ? {...box(table), rows: table.querySelectorAll('tbody tr').length} : null,
      svgs: [...report.querySelectorAll('svg')]
        .filter(svg => !svg.parentElement.closest('svg'))
        .map(svg => ({...box(svg), holder: svg.parentElement.className.baseVal
                      ?? svg.parentElement.className, scroller: scroller(svg)})),
    };
  });
})()
"""


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Notebooks 1 and 5 run and exported by `python -m gradmagic demo`."""
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "gradmagic", "demo", "--out", str(out), "01", "05"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"Pages written to {out.resolve()}/" in result.stdout
    return {name: out / f"{name}.html" for name in ("01_backward_basics", "05_real_model")}


@pytest.fixture(scope="module")
def browser() -> Any:
    with client.Chromium(CHROMIUM, width=WIDTH, height=900) as chromium:
        yield chromium


def _open(browser: Any, page: Path) -> list[dict[str, Any]]:
    browser.events.clear()
    browser.open(page.as_uri())
    return browser.evaluate(MEASURE_JS)


def _assert_fits(report: dict[str, Any]) -> None:
    column = report["column"]
    assert column["visible"] and column["width"] < WIDTH
    assert report["report"]["visible"]
    assert report["report"]["right"] <= column["right"] + 1
    for svg in report["svgs"]:
        if svg["right"] > column["right"] + 1:
            # Wider than the column: it must scroll inside a box that fits it.
            scroller = svg["scroller"]
            assert scroller is not None, svg
            assert scroller["right"] <= column["right"] + 1, svg


def _no_script_errors(browser: Any) -> None:
    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    assert errors == []


def test_notebook_1_shows_tables_and_graphs_that_fit(browser, pages, tmp_path):
    reports = _open(browser, pages["01_backward_basics"])
    assert len(reports) == 5  # one per %%grad cell
    for report in reports:
        assert report["table"] is not None and report["table"]["visible"]
        assert report["table"]["rows"] >= 1
        assert report["table"]["right"] <= report["column"]["right"] + 1
        _assert_fits(report)
    # Every backward that ran drew its graph (the last cell's backward raised).
    for report in reports[:4]:
        [graph] = [s for s in report["svgs"] if "gradmagic-graph" in s["holder"]]
        assert graph["visible"] and graph["width"] > 100 and graph["height"] > 150, graph
    # The accumulated row is orange on the rendered page, whatever the page's CSS.
    colours = browser.evaluate(
        """[...document.querySelectorAll('tr[data-status]')]
           .map(tr => [tr.dataset.status, getComputedStyle(tr).backgroundColor])"""
    )
    assert ["accumulated", "rgb(255, 243, 224)"] in colours
    assert all(colour != "rgb(255, 243, 224)" for status, colour in colours if status == "new")
    text = browser.evaluate("document.body.innerText")
    assert "tensor([200., 200.])" in text and "accumulated" in text
    no_horizontal_page_scroll = browser.evaluate(
        "document.documentElement.scrollWidth <= window.innerWidth"
    )
    assert no_horizontal_page_scroll
    _no_script_errors(browser)
    shot = browser.screenshot(tmp_path / "01_backward_basics.png")
    assert shot.stat().st_size > 10_000


def test_notebook_5_large_model_report_fits_the_column(browser, pages, tmp_path):
    reports = _open(browser, pages["05_real_model"])
    assert len(reports) == 2  # the training step, and the zoom on one block
    step = reports[0]
    assert step["table"]["visible"] and step["table"]["rows"] == 30
    [chart] = [s for s in step["svgs"] if "gradmagic-flow" in s["holder"]]
    [graph] = [s for s in step["svgs"] if "gradmagic-graph" in s["holder"]]
    assert chart["visible"] and chart["width"] > 300 and chart["height"] > 150, chart
    assert graph["visible"] and graph["width"] > 300 and graph["height"] > 300, graph
    for report in reports:
        _assert_fits(report)
    assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    _no_script_errors(browser)
    height = browser.evaluate("document.documentElement.scrollHeight")
    shot = browser.screenshot(
        tmp_path / "05_real_model.png", clip={"x": 0, "y": 0, "width": WIDTH, "height": height}
    )
    assert shot.stat().st_size > 10_000


# -- names that are HTML -----------------------------------------------------------------
IMG = """<img src=x onerror="document.title='pwned-img'">"""
SCRIPT = "<script>document.title='pwned-script'</script>"
# Module names cannot contain dots: this one sets a global instead.
MODULE = "<img src=x onerror=window['pwned']=1>"
# What must show as text: dict keys appear in names through repr(), quotes escaped.
SHOWN = ("<img src=x onerror=", "<script>document.title=", MODULE)


def _hostile_report() -> Any:
    import torch
    from torch import nn

    import gradmagic

    weights = {IMG: torch.ones(2, requires_grad=True), SCRIPT: torch.ones(2, requires_grad=True)}
    layers = nn.ModuleDict({MODULE: nn.Linear(2, 1)})
    with gradmagic.watch({"weights": weights, "layers": layers}) as rec:
        layers[MODULE](weights[IMG] * weights[SCRIPT]).sum().backward()
    return rec.report()


def _assert_inert(browser: Any, title: str) -> None:
    state = browser.evaluate(
        """({title: document.title, pwned: window.pwned === undefined ? null : window.pwned,
             imgs: document.querySelectorAll('img').length,
             scripts: [...document.querySelectorAll('script')].filter(
               s => s.textContent.includes('pwned')).length,
             text: document.body.innerText,
             svgText: [...document.querySelectorAll('svg text')].map(t => t.textContent).join(' ')})"""
    )
    assert state["title"] == title
    assert state["pwned"] is None
    assert state["imgs"] == 0 and state["scripts"] == 0
    for payload in SHOWN:
        assert payload in state["text"]  # shown, as text
    assert "<img src=x onerror=" in state["svgText"]  # the graph labels its leaves by name
    _no_script_errors(browser)


def test_names_with_html_render_as_text_and_run_nothing(browser, tmp_path):
    report = _hostile_report()
    names = " ".join(row.name for row in report.rows)
    assert all(payload in names for payload in SHOWN)

    page = Path(report.save(tmp_path / "hostile.html"))
    browser.events.clear()
    browser.open(page.as_uri())
    _assert_inert(browser, f"gradmagic report · run {report.run}")
    browser.screenshot(tmp_path / "hostile.png")


def test_names_with_html_stay_inert_in_an_exported_notebook(browser, tmp_path):
    import nbformat

    from gradmagic import demo

    report = _hostile_report()
    output = nbformat.v4.new_output(
        "display_data", data={"text/html": report._repr_html_(), "text/plain": repr(report)}
    )
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("%%grad\n...", outputs=[output])]
    )
    page = tmp_path / "hostile_notebook.html"
    page.write_text(demo.export_html(nb), encoding="utf-8")
    browser.events.clear()
    browser.open(page.as_uri())
    _assert_inert(browser, "Notebook")
