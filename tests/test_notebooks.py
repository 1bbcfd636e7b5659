"""The demo notebooks, run top to bottom in a real Jupyter kernel through nbclient.

Each test reads what a learner would see under a cell (the `%%grad` report's
HTML, printed text) and checks it against the numbers the math predicts.
Notebooks run once per session, on first use (`executed()`); the browser
tests reuse them.
"""

from __future__ import annotations

import base64
import html
import re
import subprocess
import sys
import tempfile
from functools import cache
from html.parser import HTMLParser
from typing import Any

import nbformat
import pytest

from gradmagic import demo

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NOTEBOOKS = [
    "01_backward_basics",
    "02_mae_gradient",
    "03_gradient_argument",
    "04_debugging_a_training_loop",
    "05_real_model",
    "06_where_gradients_come_from",
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- running and reading notebooks ------------------------------------------------
_WORKDIR = tempfile.TemporaryDirectory(prefix="gradmagic-notebooks-")


@cache
def executed(name: str) -> Any:
    """The notebook `name`, executed in a fresh kernel (once per test session)."""
    [path] = demo.find_notebooks([name])
    return demo.execute(path, cwd=_WORKDIR.name)


def cell(nb: Any, cell_id: str) -> Any:
    for c in nb.cells:
        if c.get("id") == cell_id:
            return c
    raise AssertionError(f"no cell with id {cell_id!r}")


def report_html(nb: Any, cell_id: str) -> str:
    """The HTML of the one `%%grad` report under a cell."""
    reports = [
        out["data"]["text/html"]
        for out in cell(nb, cell_id).get("outputs", [])
        if "text/html" in out.get("data", {}) and 'class="gradmagic"' in out["data"]["text/html"]
    ]
    assert len(reports) == 1, f"cell {cell_id!r} shows {len(reports)} gradmagic reports"
    return reports[0]


def printed(nb: Any, cell_id: str) -> str:
    """What a cell printed, and the plain text of its result (not of displayed reports)."""
    parts = []
    for out in cell(nb, cell_id).get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif out.get("output_type") == "execute_result" and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


class Report(HTMLParser):
    """The parts of a report's HTML the tests read: table rows (a shortened value read
    whole from its `title`), findings, and the graph and chart images."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, dict[str, str]] = {}
        self.findings: list[tuple[str, str]] = []  # (kind, text)
        self.images = 0  # graphs and charts, as `<img>`s
        self.graphs: list[str] = []  # the graphs' SVG documents
        self.inline_svgs = 0
        self._full: str | None = None
        self._headers: list[str] = []
        self._in_table = 0
        self._row: list[str] | None = None
        self._status = ""
        self._text: list[str] | None = None
        self._finding: list[Any] | None = None
        self._depth = 0
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.inline_svgs += 1
        if tag == "img" and (a.get("class") or "") in ("gradmagic-graph", "gradmagic-flow"):
            prefix, data = (a.get("src") or "").split(",", 1)
            assert prefix == "data:image/svg+xml;base64"
            self.images += 1
            if a["class"] == "gradmagic-graph":
                self.graphs.append(base64.b64decode(data).decode("utf-8"))
        if tag == "table" and "gradmagic-table" in (a.get("class") or ""):
            self._in_table, self._headers = 1, []
        elif tag == "table" and self._in_table:
            self._in_table += 1
        if self._in_table == 1:
            if tag == "tr":
                self._row, self._status = [], a.get("data-status") or ""
            elif tag in ("td", "th"):
                self._text = []
                cls = a.get("class") or ""
                self._full = (
                    a.get("title") if cls in ("gm-added", "gm-before", "gm-after") else None
                )
        if tag == "li" and a.get("data-kind"):
            self._finding, self._depth = [a["data-kind"], []], 0
        if self._finding is not None:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._in_table == 1 and tag in ("td", "th") and self._text is not None:
            text = self._full or " ".join("".join(self._text).split())
            if tag == "th":
                self._headers.append(text)
            elif self._row is not None:
                self._row.append(text)
            self._text = None
        elif self._in_table == 1 and tag == "tr" and self._row:
            values = dict(zip(self._headers, self._row))
            values["status"] = self._status or values.get("status", "")
            self.rows[self._row[0]] = values
            self._row = None
        elif tag == "table" and self._in_table:
            self._in_table -= 1
        if self._finding is not None:
            self._depth -= 1
            if tag == "li" and self._depth <= 0:
                kind, text = self._finding
                self.findings.append((kind, " ".join("".join(text).split())))
                self._finding = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)
        if self._finding is not None:
            self._finding[1].append(data)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.findings]

    def finding(self, kind: str) -> str:
        texts = [text for k, text in self.findings if k == kind]
        assert texts, f"no {kind!r} finding; findings: {self.findings}"
        return texts[0]


def report(nb: Any, cell_id: str) -> Report:
    return Report(report_html(nb, cell_id))


# -- 01: backward basics --------------------------------------------------------
def test_01_first_backward_goes_from_none_to_100():
    nb = executed("01_backward_basics")
    assert "x.grad before any backward: None" in printed(nb, "leaf")
    rep = report(nb, "first-backward")
    x = rep.rows["x"]
    assert (x["before"], x["after"]) == ("None", "[100., 100.]")
    assert x["added"] == "= after"  # all of it is new
    assert (x["status"], x["runs"]) == ("new", "1")
    assert rep.findings == []
    [graph] = rep.graphs
    for op in ("MulBackward0", "SumBackward0"):
        assert f">{op}</text>" in graph


def test_01_rerunning_the_cell_accumulates_and_says_so():
    nb = executed("01_backward_basics")
    assert cell(nb, "rerun").source == cell(nb, "first-backward").source
    rep = report(nb, "rerun")
    x = rep.rows["x"]
    assert (x["before"], x["after"], x["added"]) == (
        "[100., 100.]",
        "[200., 200.]",
        "[100., 100.]",
    )
    assert (x["status"], x["runs"]) == ("accumulated", "2")
    assert rep.kinds() == ["accumulated"]
    assert "`x`" not in rep.finding("accumulated")  # backticks became <code>
    assert "not zeroed" in rep.finding("accumulated")
    # The highlight: an orange row, whatever CSS the page brings.
    assert re.search(
        r'<tr[^>]*data-status="accumulated" style="background:#fff7ed;', report_html(nb, "rerun")
    )


def test_01_zero_grad_starts_afresh_and_sgd_reads_grad():
    nb = executed("01_backward_basics")
    x = report(nb, "zeroed").rows["x"]
    assert (x["before"], x["after"], x["status"], x["runs"]) == (
        "None",
        "[100., 100.]",
        "new",
        "1",
    )
    assert "after the step:  tensor([0.9000, 1.9000], requires_grad=True)" in printed(nb, "step")


def test_01_detach_leaves_the_parameters_without_a_gradient():
    nb = executed("01_backward_basics")
    intact = report(nb, "intact")
    assert {n: r["status"] for n, r in intact.rows.items()} == {
        "model.weight": "new",
        "model.bias": "new",
    }
    assert "does not require grad" in printed(nb, "detached")
    rep = report(nb, "detached")
    assert {n: (r["after"], r["status"]) for n, r in rep.rows.items()} == {
        "model.weight": ("None", "none"),
        "model.bias": ("None", "none"),
    }
    assert "no-grad" in rep.kinds()
    assert "detach()" in rep.finding("no-grad")


# -- 02: the MAE gradient --------------------------------------------------------
def test_02_the_formula_matches_the_reported_gradient():
    nb = executed("02_mae_gradient")
    params = report(nb, "mae-report").rows["params"]
    assert (params["shape"], params["before"], params["status"]) == ("(10,)", "None", "new")
    # The notebook's own check compared all ten values with torch.testing.assert_close.
    out = printed(nb, "by-hand")
    assert "the formula and autograd agree" in out
    by_hand, from_report = re.findall(r"tensor\(\[[^\]]*\]\)", out)
    assert by_hand == from_report
    assert " ".join(from_report.split()) == f"tensor({params['after']})"
    assert "rows predicted above their target: 1000 of 1000" in printed(nb, "all-above")


def test_02_mean_does_not_grow_with_the_data_and_sum_does():
    nb = executed("02_mae_gradient")
    assert (
        report(nb, "mean-2n").rows["params"]["after"]
        == (report(nb, "mae-report").rows["params"]["after"])
    )
    for quiet in ("sum-n", "sum-2n"):
        assert not any("text/html" in o.get("data", {}) for o in cell(nb, quiet).outputs)
    table = printed(nb, "compare")
    norms = [float(v) for v in re.findall(r"^\d\s+\w+\s+\d+\s+([\d.]+)", table, re.M)]
    assert len(norms) == 4
    mean_n, mean_2n, sum_n, sum_2n = norms
    assert mean_2n == pytest.approx(mean_n)
    assert sum_n == pytest.approx(1000 * mean_n, rel=1e-5)
    assert sum_2n == pytest.approx(2 * sum_n, rel=1e-5)


# -- 03: the gradient argument ---------------------------------------------------
def test_03_external_gradient_gives_9a2_and_minus_2b():
    nb = executed("03_gradient_argument")
    assert "grad can be implicitly created only for scalar outputs" in printed(nb, "no-gradient")
    rep = report(nb, "ones")
    assert rep.rows["a"]["after"] == "[36., 81.]"
    assert rep.rows["b"]["after"] == "[-12., -8.]"
    assert "vector-Jacobian product" in rep.finding("custom-gradient")
    assert printed(nb, "check").count("tensor([True, True])") == 2
    summed = report(nb, "sum")
    assert summed.rows["a"]["after"] == "[36., 81.]"
    assert summed.rows["b"]["after"] == "[-12., -8.]"
    assert "custom-gradient" not in summed.kinds()


def test_03_gradient_is_a_weighting():
    nb = executed("03_gradient_argument")
    rep = report(nb, "weighted")
    assert rep.rows["a"]["after"] == "[ 18., 162.]"
    assert rep.rows["b"]["after"] == "[ -6., -16.]"
    assert {r["status"] for r in rep.rows.values()} == {"new"}
    out = printed(nb, "vjp-check")
    assert "d/da (v·Q) = tensor([ 18., 162.])   a.grad = tensor([ 18., 162.])" in out
    assert "d/db (v·Q) = tensor([ -6., -16.])   b.grad = tensor([ -6., -16.])" in out


def test_03_autograd_grad_returns_and_leaves_grad_alone():
    nb = executed("03_gradient_argument")
    assert "f'(3) = 27.0, f''(3) = 18.0, t.grad = None" in printed(nb, "second-derivative")
    rep = report(nb, "second-derivative")
    assert rep.kinds() == ["autograd-grad", "autograd-grad"]
    assert "not stored in .grad" in rep.finding("autograd-grad")
    assert rep.rows["t"]["after"] == "None"
    assert rep.images == 2  # the first derivative's graph, and the second's


def test_03_the_tutorial_weight_gets_zero_not_two():
    nb = executed("03_gradient_argument")
    rep = report(nb, "tutorial")
    w = rep.rows["w"]  # created inside linear_model(), found anyway
    assert (w["after"], w["status"]) == ("0.", "new")
    assert report(nb, "tutorial-8").rows["w"]["after"] == "-6."
    assert report(nb, "tutorial-8-scaled").rows["w"]["after"] == "-18."
    out = printed(nb, "tutorial-summary")
    assert "target 7: w.grad = 0.0" in out
    assert "target 8, gradient=3: w.grad = -18.0" in out


# -- 04: debugging a training loop -----------------------------------------------
def _statuses(rep: Report) -> dict[str, str]:
    return {name: row["status"] for name, row in rep.rows.items()}


def test_04_each_run_shows_the_next_bug():
    nb = executed("04_debugging_a_training_loop")
    encoder = ("model.encoder.weight", "model.encoder.bias")
    head = ("model.head.weight", "model.head.bias")

    run1 = report(nb, "run-1")
    assert run1.kinds()[:2] == ["nan-inf", "no-grad"]  # the error first
    assert "NaN" in run1.finding("nan-inf")
    assert "log" in run1.finding("nan-inf").lower()
    assert all(n in run1.finding("no-grad") for n in encoder)
    assert _statuses(run1) == dict.fromkeys(encoder, "none") | dict.fromkeys(head, "nan/inf")
    assert "losses: [nan, nan, nan, nan, nan]" in printed(nb, "run-1")

    run2 = report(nb, "run-2")
    assert "nan-inf" not in run2.kinds()
    assert run2.kinds()[:2] == ["accumulated", "no-grad"]
    assert "backward ran 5 times" in run2.finding("accumulated")
    assert "opt.zero_grad()" in run2.finding("accumulated")
    assert _statuses(run2) == dict.fromkeys(encoder, "none") | dict.fromkeys(head, "accumulated")

    run3 = report(nb, "run-3")
    assert [k for k in run3.kinds() if k != "optimizer-step"] == ["no-grad"]
    assert _statuses(run3) == dict.fromkeys(encoder, "none") | dict.fromkeys(head, "new")

    run4 = report(nb, "run-4")
    assert [k for k in run4.kinds() if k != "optimizer-step"] == []
    assert set(_statuses(run4).values()) == {"new"}
    losses = [float(v) for v in re.findall(r"[\d.]+", printed(nb, "run-4").split(":", 1)[1])]
    assert len(losses) == 5 and losses == sorted(losses, reverse=True)


def test_04_deep_sigmoid_gradients_vanish_and_relu_fixes_them():
    nb = executed("04_debugging_a_training_loop")
    deep = report(nb, "vanishing")
    assert len(deep.rows) == 21 and all(n.endswith("weight") for n in deep.rows)
    assert "vanishing" in deep.kinds()
    assert "sigmoid" in deep.finding("vanishing")
    ratio = float(re.search(r"last hidden layer: ([\d.e+-]+)", printed(nb, "vanishing-ratio"))[1])
    assert ratio < 1e-12
    fixed = report(nb, "fixed")
    assert "vanishing" not in fixed.kinds()
    ratio = float(re.search(r"last hidden layer: ([\d.e+-]+)", printed(nb, "fixed-ratio"))[1])
    assert 0.05 < ratio < 20


# -- 05: a real model --------------------------------------------------------------
def test_05_transformer_step_report():
    nb = executed("05_real_model")
    markup = report_html(nb, "train-step")
    rep = Report(markup)
    assert len(rep.rows) == 30  # every parameter tensor of the model
    assert set(_statuses(rep).values()) == {"new"}
    assert "model.blocks.layers.0.self_attn.in_proj_weight" in rep.rows
    assert "‖g‖=" in rep.rows["model.head.weight"]["after"]  # summarised, not printed
    assert [k for k in rep.kinds() if k != "optimizer-step"] == []
    assert 'class="gradmagic-flow"' in markup  # --plot
    assert rep.images == 2 and rep.inline_svgs == 0  # the chart and the graph, as images
    zoom = report(nb, "zoom")
    assert len(zoom.rows) == 4
    assert all(".layers.0.self_attn." in name for name in zoom.rows)


def test_notebooks_are_committed_without_outputs():
    for path in demo.find_notebooks():
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{path.name}: {c.id}"


# -- a cell that raises inside %%grad ------------------------------------------------
def test_a_cell_raising_inside_grad_stops_the_notebook_with_the_report_shown(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%load_ext gradmagic"),
            nbformat.v4.new_code_cell(
                "import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)"
            ),
            nbformat.v4.new_code_cell(
                "%%grad\ny = 100 * x\ny.sum().backward()\nraise ValueError('boom from line 4')"
            ),
            nbformat.v4.new_code_cell("print('not reached')"),
        ]
    )
    failed: list[int] = []
    with pytest.raises(CellExecutionError) as info:
        demo.execute_node(nb, cwd=tmp_path, failed=failed)
    assert info.value.ename == "ValueError"
    assert info.value.evalue == "boom from line 4"
    assert failed == [2]

    outputs = nb.cells[2].outputs
    kinds = [o.output_type for o in outputs]
    assert kinds.index("display_data") < kinds.index("error")  # the report, then the error
    x = Report(outputs[kinds.index("display_data")]["data"]["text/html"]).rows["x"]
    assert (x["after"], x["status"]) == ("[100., 100.]", "new")
    [error] = [o for o in outputs if o.output_type == "error"]
    traceback = ANSI.sub("", "\n".join(error["traceback"]))
    assert "line 4" in traceback
    assert "raise ValueError('boom from line 4')" in traceback
    assert "magic.py" not in traceback and "run_cell_magic" not in traceback
    assert traceback.count("boom from line 4") == 2  # the source line, and the message once
    assert nb.cells[3].outputs == [] and nb.cells[3].execution_count is None


# -- python -m gradmagic demo ----------------------------------------------------------
def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradmagic", "demo", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_command_reports_a_failing_notebook_in_one_line(tmp_path):
    broken = tmp_path / "broken.ipynb"
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_code_cell("1 / 0"),
            nbformat.v4.new_code_cell("print('not reached')"),
        ]
    )
    nbformat.write(nb, broken)
    result = _demo("--out", str(tmp_path / "out"), str(broken))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "gradmagic demo: broken.ipynb failed at cell 2: ZeroDivisionError: division by zero"
    )
    assert re.search(r"\[1/1\] broken\.ipynb\s+FAILED\s+[\d.]+ s", result.stdout)
    # The partly executed notebook and its page are kept, to look at.
    assert (tmp_path / "out" / "broken.ipynb").is_file()
    assert (tmp_path / "out" / "broken.html").is_file()


def test_demo_command_unknown_notebook():
    result = _demo("99_nothing")
    assert result.returncode == 2
    assert result.stderr.startswith("gradmagic demo: '99_nothing' matches no demo notebook")
    assert "01_backward_basics" in result.stderr


def test_find_notebooks_by_prefix_stem_and_name():
    assert [p.stem for p in demo.find_notebooks()] == NOTEBOOKS
    assert demo.find_notebooks(["03"]) == demo.find_notebooks(["03_gradient_argument"])
    assert demo.find_notebooks(["05_real_model.ipynb"])[0].name == "05_real_model.ipynb"
    with pytest.raises(demo.DemoError, match="matches several"):
        demo.find_notebooks(["0"])


def test_exported_page_fetches_nothing_from_the_web():
    page = demo.export_html(executed("01_backward_basics"))
    assert "<script src" not in page.replace("'", '"')
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "cdnjs" not in page
    # The report is in the page as HTML, not escaped as text.
    assert 'data-status="accumulated"' in page
    assert html.escape('data-status="accumulated"') not in page


def test_notebooks_dir_is_next_to_the_package():
    assert demo.NOTEBOOK_DIR.is_dir()
    assert (demo.NOTEBOOK_DIR.parent / "gradmagic" / "demo.py").samefile(demo.__file__)


def test_03_steps_show_the_chain_rule_with_the_numbers():
    nb = executed("03_gradient_argument")
    page = html.unescape(re.sub(r"<[^>]+>", "", report_html(nb, "steps")))
    # 9a² = 1 · 1 · 3 · 3a², −2b = 1 · −1 · 2b
    assert "a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]" in page
    assert "b.grad = [-12., -8.] = [1., 1.] · -1 · [12., 8.]" in page
    assert "PowBackward0[3., 3.]3·a²" in page.replace("\n", "")


def test_06_a_nan_is_traced_to_its_line():
    rep = report(executed("06_where_gradients_come_from"), "nan")
    text = rep.finding("nan-inf")
    assert (
        "the forward value was already -inf at line 2: q = torch.log(p) with p = [0., 1.]" in text
    )
    assert "the first non-finite gradient came out of MulBackward0 at line 3" in text


def test_06_why_names_the_cut_and_its_line():
    nb = executed("06_where_gradients_come_from")
    assert printed(nb, "why-v").strip() == (
        "`v` required grad but received none: the path from the loss to it is cut at line 3: "
        "`h.detach()` (`h` is computed from `v`): `.detach()` returns a tensor without a graph."
    )
    assert "cut by a `torch.no_grad()` block at lines 4-5" in printed(nb, "why-b")
    assert printed(nb, "why-x").strip() == (
        "`x.grad` came from `loss` → `AddBackward0` (line 6) → `SumBackward0` (line 6) → "
        "`MulBackward0` (line 6) → `x`."
    )


def test_06_steps_write_the_chain_rule_of_q():
    nb = executed("06_where_gradients_come_from")
    page = html.unescape(re.sub(r"<[^>]+>", "", report_html(nb, "steps")))
    assert "a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]" in page  # 9a²
    assert "b.grad = [-12., -8.] = [1., 1.] · -1 · [12., 8.]" in page  # −2b


def test_06_check_catches_the_forgotten_factor_and_passes_the_fix():
    nb = executed("06_where_gradients_come_from")
    bad = " ".join(text for _, text in report(nb, "check-bad").findings)
    # (code spans in the HTML read as their text)
    assert "Square's backward disagrees with finite differences for input 0 (s)" in bad
    good = " ".join(text for _, text in report(nb, "check-good").findings)
    assert "GoodSquare's backward agrees with finite differences" in good
    assert "disagrees" not in good
