"""Source lines of the graph's ops, where a NaN began, and `why` a leaf got its gradient."""

from __future__ import annotations

import sys
import textwrap

import nbformat
import pytest
import torch
from IPython.core.error import UsageError

import gradmagic
from gradmagic import demo
from gradmagic.capture import recorder as recorder_module
from gradmagic.magic import GradMagics
from tests import launch

# Under coverage or a debugger, gradmagic leaves their trace function alone and records no line.
pytestmark = pytest.mark.skipif(
    sys.gettrace() is not None, reason="another trace function is installed"
)


def _ops(rep, backward: int = 0) -> dict[str, str]:
    """op name -> its line, for the graph of one backward (ops named once)."""
    snap = rep.block.backwards[backward].graph
    return {n.op: n.line for n in snap.nodes if n.kind == "op"}


def _finding(rep, kind: str):
    [finding] = [f for f in rep.findings if f.kind == kind]
    return finding


# --- lines ----------------------------------------------------------------------------------


def test_each_op_knows_the_cell_line_that_made_it(ip):
    ip.run("p = torch.tensor([0.0, 1.0], requires_grad=True)")
    ip.run("w = torch.tensor([2.0, 3.0], requires_grad=True)")
    ip.run("%%grad -q -o rep\nq = torch.log(p)\nloss = (q * w).sum()\nloss.backward()\n")
    rep = ip.ns["rep"]
    # Line 1 is the `%%grad` line, as the user sees the cell.
    assert _ops(rep) == {
        "LogBackward0": "line 2",
        "MulBackward0": "line 3",
        "SumBackward0": "line 3",
    }
    dot = rep.graph.source
    assert 'tooltip="LogBackward0 from line 2: q = torch.log(p)"' in dot
    assert "LogBackward0\\nline 2" in dot  # a small graph says it on the label too
    assert sys.gettrace() is None


def test_a_nan_is_traced_to_the_forward_value_that_was_already_infinite(ip):
    ip.run("p = torch.tensor([0.0, 1.0], requires_grad=True)")
    ip.run("w = torch.tensor([2.0, 3.0], requires_grad=True)")
    ip.run("%%grad -q -o rep\nq = torch.log(p)\nloss = (q * w).sum()\nloss.backward()\n")
    rep = ip.ns["rep"]
    # d/dw = log(p) = [-inf, 0]; d/dp = w / p = [inf, 3].
    assert torch.equal(ip.ns["w"].grad, torch.tensor([float("-inf"), 0.0]))
    assert torch.equal(ip.ns["p"].grad, torch.tensor([float("inf"), 3.0]))
    assert _finding(rep, "nan-inf").message == (
        "`p.grad` has 1 Inf (of 2 elements); `w.grad` has 1 Inf (of 2 elements): the forward "
        "value was already -inf at line 2: `q = torch.log(p)` with `p` = [0., 1.] (`q` held "
        "-inf when backward ran); the first non-finite gradient came out of `MulBackward0` at "
        "line 3: `loss = (q * w).sum()`."
    )


def test_without_a_variable_holding_it_the_backward_op_and_its_line_are_named(ip):
    # log(0) is held by no variable: the first non-finite gradient is what can be known.
    ip.run("w = torch.zeros(1, requires_grad=True)")
    ip.run("%%grad -q -o rep\nloss = torch.log(w).sum()\nloss.backward()\n")
    assert _finding(ip.ns["rep"], "nan-inf").message == (
        "`w.grad` has 1 Inf (of 1 element): the first non-finite gradient came out of "
        "`LogBackward0` at line 2: `loss = torch.log(w).sum()`: likely `log` at 0 (its gradient "
        "is 1/x)."
    )


def test_a_finite_cell_has_no_nan_finding_and_its_forward_is_not_blamed(ip):
    ip.run("p = torch.tensor([0.5, 1.0], requires_grad=True)")
    ip.run("%%grad -q -o rep\nq = torch.log(p)\nloss = q.sum()\nloss.backward()\n")
    rep = ip.ns["rep"]
    assert not [f for f in rep.findings if f.kind == "nan-inf"]
    assert rep.block.backwards[0].graph.forward_nonfinite == {}
    assert torch.equal(ip.ns["p"].grad, torch.tensor([2.0, 1.0]))


def test_a_helper_from_another_cell_is_named_with_the_calling_line(ip):
    ip.run("def scaled(t):\n    h = t * 2\n    return h\n")
    ip.run("w = torch.tensor([1.0, 2.0], requires_grad=True)")
    ip.run("%%grad -q -o rep\nloss = scaled(w).sum()\nloss.backward()\n")
    assert _ops(ip.ns["rep"]) == {
        "MulBackward0": "line 2 of `scaled` (another cell), from line 2",
        "SumBackward0": "line 2",
    }


def test_ops_inside_a_module_get_the_line_that_called_the_model(ip):
    ip.run("model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())")
    ip.run("xb = torch.ones(3, 2)")
    ip.run("%%grad -q -o rep\nout = model(xb)\nloss = out.sum()\nloss.backward()\n")
    assert _ops(ip.ns["rep"]) == {
        "AddmmBackward0": "line 2",
        "TBackward0": "line 2",
        "ReluBackward0": "line 2",
        "SumBackward0": "line 3",
    }


def test_no_lines_records_none_and_installs_no_trace(ip):
    ip.run("w = torch.tensor([1.0, 2.0], requires_grad=True)")
    seen = []
    ip.ns["seen"] = seen
    ip.run(
        "%%grad -q -o rep --no-lines\nimport sys\nseen.append(sys.gettrace())\n"
        "loss = (w * w).sum()\nloss.backward()\n"
    )
    rep = ip.ns["rep"]
    assert seen == [None]
    assert set(_ops(rep).values()) == {""}
    assert "line 5" not in rep.graph.source
    assert torch.equal(ip.ns["w"].grad, torch.tensor([2.0, 4.0]))


def test_the_default_budget_stops_the_trace_and_lines_lifts_it(ip, monkeypatch):
    monkeypatch.setattr(recorder_module, "DEFAULT_BUDGET", 3)
    ip.run("w = torch.tensor([1.0], requires_grad=True)")
    cell = "y = w * 1\nfor _ in range(6):\n    y = y * 2\nloss = y.sum()\nloss.backward()\n"
    ip.run("%%grad -q -o rep\n" + cell)
    snap = ip.ns["rep"].block.backwards[0].graph
    lines = [n.line for n in sorted(snap.nodes, key=lambda n: n.seq or 0) if n.kind == "op"]
    # 8 ops: the first 4 made while the block had created at most 3 nodes before them.
    assert lines == ["line 2", "line 4", "line 4", "line 4", "", "", "", ""]
    ip.run("w.grad = None")
    ip.run("%%grad -q -o rep --lines\n" + cell)
    snap = ip.ns["rep"].block.backwards[0].graph
    lines = [n.line for n in sorted(snap.nodes, key=lambda n: n.seq or 0) if n.kind == "op"]
    assert lines == ["line 2", *["line 4"] * 6, "line 5"]
    assert ip.ns["w"].grad.item() == 64.0


def test_a_cell_that_raises_leaves_no_trace_behind(ip):
    ip.run("w = torch.tensor([1.0], requires_grad=True)")
    result = ip.run_raw("%%grad -q\nloss = (w * 3).sum()\nloss.backward()\nraise KeyError('x')\n")
    assert isinstance(result.error_in_exec, KeyError)
    assert sys.gettrace() is None
    assert ip.ns["w"].grad.item() == 3.0


def test_a_trace_function_of_the_users_is_left_alone():
    events: list[str] = []

    def tracer(frame, event, arg):
        events.append(event)
        return None

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    sys.settrace(tracer)
    try:
        with gradmagic.watch({"w": w}) as rec:
            (w * w).sum().backward()
        inside = sys.gettrace()
    finally:
        sys.settrace(None)
    assert inside is tracer
    assert not rec.lines.enabled
    assert {n.line for n in rec.report().block.backwards[0].graph.nodes} == {""}
    assert "call" in events
    assert torch.equal(w.grad, torch.tensor([2.0, 4.0]))


def _tripled(t):
    return t * 3


def test_code_running_untraced_gets_no_line_rather_than_a_wrong_one():
    # Entered through a library's frame (as `gradmagic run` enters its blocks): the frame
    # running this test was not traced, so only the helper's own line is known.
    import contextlib

    p = torch.tensor([1.0, 2.0], requires_grad=True)
    stack = contextlib.ExitStack()
    rec = stack.enter_context(gradmagic.watch({"p": p}))
    q = torch.exp(p)
    loss = _tripled(q).sum()
    extra = loss * 2
    extra.backward()
    stack.close()
    line = _tripled.__code__.co_firstlineno + 1
    snap = rec.report().block.backwards[0].graph
    made = [(n.op, n.line) for n in sorted(snap.nodes, key=lambda n: n.seq or 0) if n.op]
    assert made == [
        ("ExpBackward0", ""),
        ("MulBackward0", f"test_lines.py:{line} in `_tripled`"),
        ("SumBackward0", ""),
        ("MulBackward0", ""),
    ]
    assert sys.gettrace() is None


def test_lines_takes_true_false_or_none():
    with pytest.raises(ValueError) as info, gradmagic.watch({}, lines="yes"):
        pass
    assert str(info.value) == (
        "lines must be True (always), False (never) or None (up to a budget of ops), not 'yes'."
    )
    assert sys.gettrace() is None


def test_code_in_tooltips_and_findings_is_escaped(ip):
    ip.run("p = torch.tensor([0.0, 1.0], requires_grad=True)")
    ip.run('%%grad -q -o rep\nq = torch.log(p)  # <script>"\\\nloss = q.sum()\nloss.backward()\n')
    rep = ip.ns["rep"]
    dot = rep.graph.source
    assert 'tooltip="LogBackward0 from line 2: q = torch.log(p)  # <script>\\"\\\\"' in dot
    html = rep._repr_html_()
    assert "<script" not in html
    assert "q = torch.log(p)  # &lt;script&gt;&quot;\\</code>" in html
    assert "data:image/svg+xml;base64," in html  # the graph still draws


SCRIPT = """\
import torch
import gradmagic
from helper import scaled

p = torch.tensor([0.0, 2.0], requires_grad=True)
with gradmagic.watch() as rec:
    q = torch.log(p)
    loss = scaled(q).sum()
    loss.backward()
rep = rec.report()
for n in sorted(rep.block.backwards[0].graph.nodes, key=lambda n: n.seq or 0):
    if n.kind == "op":
        print(n.op, "|", n.line, "|", n.code)
print([f.message for f in rep.findings if f.kind == "nan-inf"][0])
print(rep.why("p"))
"""


def test_watch_in_a_script_gives_file_and_line(tmp_path):
    (tmp_path / "helper.py").write_text("def scaled(t):\n    return t * 3\n")
    (tmp_path / "train.py").write_text(SCRIPT)
    code, out, err = launch.bounded([sys.executable, "train.py"], cwd=tmp_path, timeout=180)
    assert code == 0, err
    assert out.splitlines() == [
        "LogBackward0 | train.py:7 | q = torch.log(p)",
        "MulBackward0 | helper.py:2 in `scaled` | return t * 3",
        "SumBackward0 | train.py:8 | loss = scaled(q).sum()",
        "`p.grad` has 1 Inf (of 2 elements): the forward value was already -inf at train.py:7: "
        "`q = torch.log(p)` with `p` = [0., 2.] (`q` held -inf when backward ran); the first "
        "non-finite gradient came out of `LogBackward0` there: likely `log` at 0 (its gradient "
        "is 1/x).",
        "`p.grad` came from `loss` → `SumBackward0` (train.py:8) → `MulBackward0` "
        "(helper.py:2 in `scaled`) → `LogBackward0` (train.py:7) → `p`.",
        "It holds NaN or Inf: the forward value was already -inf at train.py:7: "
        "`q = torch.log(p)` with `p` = [0., 2.] (`q` held -inf when backward ran).",
    ]


# --- why ----------------------------------------------------------------------------------


CUT_CELL = """\
%%grad -q -o rep
h = x @ w1
z = h.detach()
with torch.no_grad():
    b2 = w2 * 2
idx = (w5 * 10).long()
loss = (z * x).sum() + (b2 * x).sum() + (w4.data * x).sum() + x[idx].sum()
loss.backward()
"""


@pytest.fixture
def cut(ip):
    ip.run(
        "x = torch.tensor([1., 2.], requires_grad=True)\n"
        "w1 = torch.eye(2, requires_grad=True)\n"
        "w2 = torch.tensor([3., 4.], requires_grad=True)\n"
        "w4 = torch.tensor([5., 6.], requires_grad=True)\n"
        "w5 = torch.tensor([0.1, 0.05], requires_grad=True)"
    )
    ip.run(CUT_CELL)
    return ip


def test_why_names_each_cut_and_its_line(cut):
    rep = cut.ns["rep"]
    why = {name: str(rep.why(name)) for name in ("w1", "w2", "w4", "w5")}
    assert why == {
        "w1": "`w1` required grad but received none: the path from the loss to it is cut at "
        "line 3: `h.detach()` (`h` is computed from `w1`): `.detach()` returns a tensor without "
        "a graph.",
        "w2": "`w2` required grad but received none: the path from the loss to it is cut by a "
        "`torch.no_grad()` block at lines 4-5: what it computes there from `w2` has no graph.",
        "w4": "`w4` required grad but received none: the cell uses `w4.data`, which cuts it "
        "from the graph.",
        "w5": "`w5` required grad but received none: the path from the loss to it is cut at "
        "line 6: `(w5 * 10).long()`: an integer tensor carries no gradient.",
    }
    # idx = [1, 0], so d loss/dx = z + b2 + w4.data + [1, 1] = [1,2] + [6,8] + [5,6] + [1,1].
    assert torch.equal(cut.ns["x"].grad, torch.tensor([13.0, 17.0]))
    assert str(rep.why("x")) == (
        "`x.grad` came from `loss` → `AddBackward0` (line 7) → `SumBackward0` (line 7) → "
        "`IndexBackward0` (line 7) → `x`."
    )


def test_the_findings_name_the_same_cuts(cut):
    messages = sorted(f.message for f in cut.ns["rep"].findings if f.kind == "no-grad")
    assert messages == sorted(
        [
            "`w1` required grad but received none: the path from the loss to it is cut at "
            "line 3: `h.detach()` (`h` is computed from `w1`): `.detach()` returns a tensor "
            "without a graph.",
            "`w2` required grad but received none: the path from the loss to it is cut by a "
            "`torch.no_grad()` block at lines 4-5: what it computes there from `w2` has no graph.",
            "`w4` required grad but received none: the cell uses `w4.data`, which cuts it from "
            "the graph.",
            "`w5` required grad but received none: the path from the loss to it is cut at "
            "line 6: `(w5 * 10).long()`: an integer tensor carries no gradient.",
        ]
    )


def test_grad_why_magic_displays_the_answer(cut, capsys):
    result = cut.run("%grad why w1")
    assert str(result).startswith("`w1` required grad but received none")
    html = result._repr_html_()
    assert "<code" in html and "h.detach()" in html and "<script" not in html


def test_why_a_zero_gradient_names_the_op_that_made_it_zero(ip):
    # The tutorial model of demo notebook 03: the prediction 2·3 + 1 equals the target 7.
    ip.run(
        "def linear_model(x):\n"
        "    w = torch.tensor(2.0, requires_grad=True)\n"
        "    b = torch.tensor(1.0)\n"
        "    return w * x + b\n"
    )
    ip.run("x_in = torch.tensor(3.0)\ny_true = torch.tensor(7.0)")
    ip.run(
        "%%grad -q -o rep\nloss = torch.nn.functional.mse_loss(linear_model(x_in), y_true)\n"
        "loss.backward()\n"
    )
    rep = ip.ns["rep"]
    assert rep.table.loc["w", "after"].item() == 0.0
    assert str(rep.why("w")).splitlines() == [
        "`w.grad` came from `loss` → `MseLossBackward0` (line 2) → `AddBackward0` (line 4 of "
        "`linear_model` (another cell), from line 2) → `MulBackward0` (line 4 of `linear_model` "
        "(another cell), from line 2) → `w`.",
        "It is all zero: `MseLossBackward0` at line 2: `loss = torch.nn.functional.mse_loss("
        "linear_model(x_in), y_true)` received 1. and passed on zeros: the prediction equals "
        "its target wherever a gradient arrived: the squared error is at its minimum, where "
        "its slope is 0.",
    ]


def test_why_a_dead_relu(ip):
    ip.run("x = torch.tensor([1., -2.], requires_grad=True)")
    ip.run("w = torch.tensor([3., 4.], requires_grad=True)")
    ip.run("%%grad -q -o rep\ny = torch.relu(-x.abs() * w)\nloss = y.sum()\nloss.backward()\n")
    rep = ip.ns["rep"]
    assert torch.equal(ip.ns["w"].grad, torch.zeros(2))
    assert str(rep.why("w")).splitlines()[1] == (
        "It is all zero: `ReluBackward0` at line 2: `y = torch.relu(-x.abs() * w)` received "
        "[1., 1.] and passed on zeros: a ReLU passes a gradient only where its input was "
        "positive, and it was positive at none of the elements that received one (a dead ReLU)."
    )


def test_why_a_zero_on_a_graph_too_large_for_flow_says_it_is_not_known(ip):
    ip.run("w = torch.tensor([1., 2.], requires_grad=True)")
    ip.run(
        "%%grad -q -o rep\ny = w\nfor _ in range(200):\n    y = y * 1\n"
        "loss = torch.relu(-y.abs()).sum()\nloss.backward()\n"
    )
    rep = ip.ns["rep"]
    assert torch.equal(ip.ns["w"].grad, torch.zeros(2))
    assert str(rep.why("w")).splitlines()[1] == (
        "It is all zero: the gradients along this graph's edges were not recorded (they are on "
        "graphs of up to 150 ops; this one has 204), so which op made it zero is not known."
    )


def test_why_a_nonzero_gradient_says_no_zero_and_no_cut(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad -q -o rep\nloss = (torch.relu(x) * 3).sum()\nloss.backward()\n")
    why = str(ip.ns["rep"].why("x"))
    assert why == (
        "`x.grad` came from `loss` → `SumBackward0` (line 2) → `MulBackward0` (line 2) → "
        "`ReluBackward0` (line 2) → `x`."
    )


def test_why_a_parameter_the_optimizer_does_not_hold(ip):
    ip.run(
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))\n"
        "opt = torch.optim.SGD(model[0].parameters(), lr=0.1)\nxb = torch.ones(3, 2)"
    )
    ip.run("%%grad -q -o rep\nopt.zero_grad()\nloss = model(xb).sum()\nloss.backward()\nopt.step()")
    rep = ip.ns["rep"]
    assert str(rep.why("model.1.bias")).splitlines() == [
        "`model.1.bias.grad` came from `loss` → `SumBackward0` (line 3) → `AddmmBackward0` "
        "(line 3) → `model.1.bias`.",
        "It got a gradient, but no optimizer holds it: the steps of `opt` did not update it "
        "(add it to the optimizer's parameters).",
    ]
    assert len(str(rep.why("model.0.bias")).splitlines()) == 1  # opt holds it


def test_why_bad_input_is_a_sentence(ip):
    magics = GradMagics(ip.shell)
    with pytest.raises(UsageError, match=r"^%grad why w: no %%grad cell has run yet"):
        magics.grad("why w")
    ip.run("w = torch.tensor([1., 2.], requires_grad=True)\nc = torch.ones(2)\nn = 3")
    ip.run("%%grad -q -o rep\nh = w * 2\nloss = h.sum()\nloss.backward()\n")
    cases = {
        "why h": "%grad why h: `h` is not a leaf: it was computed (made by `MulBackward0`), and "
        "backward keeps `.grad` only on leaves (call `h.retain_grad()` before backward to keep "
        "it). Leaves of the last report: `w`.",
        "why c": "%grad why c: `c` does not require grad, so autograd gives it no gradient (make "
        "it with `requires_grad=True`). Leaves of the last report: `w`.",
        "why n": "%grad why n: `n` is a int, not a tensor. Leaves of the last report: `w`.",
        "why nope": "%grad why nope: the last %%grad report has no leaf named `nope`; its "
        "leaves: `w`.",
        "why": "%grad why takes one name, the leaf to explain: `%grad why w`.",
        "why w h": "%grad why takes one name, the leaf to explain: `%grad why w`.",
    }
    for line, message in cases.items():
        result = ip.run_raw(f"%grad {line}")
        assert isinstance(result.error_in_exec, UsageError), line
        assert str(result.error_in_exec) == message
    rep = ip.ns["rep"]
    with pytest.raises(ValueError) as info:
        rep.why("nope")
    assert str(info.value) == (
        "`nope` is not a leaf of the last report (its leaves: `w`); `why` explains the gradient "
        "of a leaf the report has a row for."
    )
    with pytest.raises(TypeError, match="takes the name of a leaf as a string"):
        rep.why(3)


def test_why_a_leaf_the_cell_turned_off(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("w = torch.tensor([3., 4.], requires_grad=True)")
    ip.run("%%grad -q -o rep\nw.requires_grad_(False)\nloss = (w * x).sum()\nloss.backward()\n")
    assert torch.equal(ip.ns["x"].grad, torch.tensor([3.0, 4.0]))
    result = ip.run_raw("%grad why w")
    assert str(result.error_in_exec) == (
        "%grad why w: `w` does not require grad, so autograd gives it no gradient (the last "
        "%%grad cell turned it off at line 2: `w.requires_grad_(False)`). Leaves of the last "
        "report: `x`."
    )


def test_why_escapes_names_in_html(ip):
    ip.run("d = {'<b>': torch.tensor([1.0], requires_grad=True)}")
    ip.run("%%grad -q -o rep\nloss = (d['<b>'] * 2).sum()\nloss.backward()\n")
    html = ip.ns["rep"].why("d['<b>']")._repr_html_()
    assert "<b>" not in html and "&lt;b&gt;" in html


# --- in a real kernel -------------------------------------------------------------------------


@pytest.mark.kernel
def test_lines_and_why_in_a_real_kernel(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%load_ext gradmagic"),
            nbformat.v4.new_code_cell(
                "import torch\np = torch.tensor([0.0, 1.0], requires_grad=True)\n"
                "w = torch.tensor([2.0, 3.0], requires_grad=True)"
            ),
            nbformat.v4.new_code_cell(
                "%%grad -o rep\nq = torch.log(p)\nh = (q * w).detach()\n"
                "loss = (q * w).sum()\nloss.backward()"
            ),
            nbformat.v4.new_code_cell("%grad why p"),
            nbformat.v4.new_code_cell("print(rep.graph.source)"),
        ]
    )
    demo.execute_node(nb, cwd=tmp_path)
    [report] = [o for o in nb.cells[2].outputs if "text/html" in o.get("data", {})]
    assert "the forward value was already -inf at line 2: <code" in report["data"]["text/html"]
    [why] = [o for o in nb.cells[3].outputs if o.get("output_type") == "execute_result"]
    assert why["data"]["text/plain"].splitlines() == [
        "`p.grad` came from `loss` → `SumBackward0` (line 4) → `MulBackward0` (line 4) → "
        "`LogBackward0` (line 2) → `p`.",
        "It holds NaN or Inf: the forward value was already -inf at line 2: "
        "`q = torch.log(p)` with `p` = [0., 1.] (`q` held -inf when backward ran).",
    ]
    dot = "".join(o.get("text", "") for o in nb.cells[4].outputs)
    assert 'tooltip="LogBackward0 from line 2: q = torch.log(p)"' in dot


def test_lines_leave_the_numbers_alone(ip):
    # The same cell with and without lines: identical gradients, bit for bit.
    cell = (
        "torch.manual_seed(1)\nm = torch.nn.Linear(3, 2)\nxb = torch.randn(4, 3)\n"
        "loss = torch.nn.functional.gelu(m(xb)).pow(2).mean()\nloss.backward()\n"
    )
    grads = []
    for flag in ("--lines", "--no-lines"):
        ip.run(f"%%grad -q {flag}\n" + cell)
        grads.append([p.grad.clone() for p in ip.ns["m"].parameters()])
    plain = {}
    exec(textwrap.dedent(cell), {"torch": torch}, plain)
    expected = [p.grad for p in plain["m"].parameters()]
    for got in grads:
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
