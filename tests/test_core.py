"""The core lesson: `.grad` before and after, accumulation across runs, exact math."""

from __future__ import annotations

import html
import math
import re

import pytest
import torch
from torch import nn

import gradmagic
from gradmagic import _engine


def _values(rep, name, column):
    return rep.table.loc[name, column]


def test_first_run_new_then_accumulated_then_new_again(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    cell = "%%grad -q -o rep\ny = 100 * x\nloss = y.sum()\nloss.backward()\n"
    ip.run(cell)
    rep = ip.ns["rep"]
    row = rep.table.loc["x"]
    assert row["before"] is None
    assert torch.equal(row["after"], torch.tensor([100.0, 100.0]))
    assert torch.equal(row["added"], torch.tensor([100.0, 100.0]))
    assert (row["status"], row["runs"]) == ("new", 1)
    assert "accumulated" not in [f.kind for f in rep.findings]

    ip.run(cell)
    rep = ip.ns["rep"]
    row = rep.table.loc["x"]
    assert torch.equal(row["before"], torch.tensor([100.0, 100.0]))
    assert torch.equal(row["after"], torch.tensor([200.0, 200.0]))
    assert torch.equal(row["added"], torch.tensor([100.0, 100.0]))
    assert (row["status"], row["runs"]) == ("accumulated", 2)
    [finding] = [f for f in rep.findings if f.kind == "accumulated"]
    assert finding.tensors == ("x",)
    assert "not zeroed" in finding.message and "2 runs" in finding.message
    html = rep._repr_html_()
    [row_html] = re.findall(r'<tr id="[\w-]+" data-status="accumulated" (.*?)</tr>', html)
    assert row_html.startswith('style="background:#fff7ed;')  # the highlighted row
    cells = dict(re.findall(r'<td class="gm-(\w+)"[^>]*>(.*?)</td>', row_html))
    assert cells["name"] == "x" and cells["runs"] == "2"
    assert (cells["before"], cells["after"]) == ("[100., 100.]", "[200., 200.]")
    assert cells["added"] == "[100., 100.]" and "accumulated</span>" in cells["status"]

    ip.run(cell)
    assert ip.ns["rep"].table.loc["x", "runs"] == 3

    ip.run("x.grad = None")
    ip.run(cell)
    row = ip.ns["rep"].table.loc["x"]
    assert (row["status"], row["runs"]) == ("new", 1)
    assert torch.equal(row["after"], torch.tensor([100.0, 100.0]))


def test_zero_grad_set_to_none_false_counts_as_fresh(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)\nopt = torch.optim.SGD([x], lr=0.1)")
    cell = "%%grad -q -o rep\nopt.zero_grad(set_to_none=False)\n(100 * x).sum().backward()\n"
    ip.run(cell)
    ip.run(cell)
    row = ip.ns["rep"].table.loc["x"]
    assert torch.equal(row["before"], torch.tensor([0.0, 0.0]))
    assert (row["status"], row["runs"]) == ("new", 1)


def test_forgotten_zero_grad_names_the_optimizer(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)\nopt = torch.optim.SGD([x], lr=0.1)")
    ip.run("%%grad -q -o rep\nfor _ in range(3):\n    (100 * x).sum().backward()\n    opt.step()\n")
    rep = ip.ns["rep"]
    assert rep.table.loc["x", "status"] == "accumulated"
    assert torch.equal(rep.table.loc["x", "after"], torch.tensor([300.0, 300.0]))
    [finding] = [f for f in rep.findings if f.kind == "accumulated"]
    assert "backward ran 3 times" in finding.message and "`opt.zero_grad()`" in finding.message


def test_gradient_argument_q_equals_3a3_minus_b2(ip):
    ip.run(
        "a = torch.tensor([2., 3.], requires_grad=True)\nb = torch.tensor([6., 4.], requires_grad=True)"
    )
    ip.run("%%grad -q -o rep\nQ = 3*a**3 - b**2\nQ.backward(gradient=torch.tensor([1., 1.]))\n")
    rep = ip.ns["rep"]
    a, b = ip.ns["a"], ip.ns["b"]
    assert torch.equal(rep.table.loc["a", "after"], 9 * a.detach() ** 2)
    assert torch.equal(rep.table.loc["a", "after"], torch.tensor([36.0, 81.0]))
    assert torch.equal(rep.table.loc["b", "after"], -2 * b.detach())
    assert torch.equal(rep.table.loc["b", "after"], torch.tensor([-12.0, -8.0]))
    [record] = rep.backwards
    assert record.kind == "backward" and record.roots == ["Q"]
    assert torch.equal(record.gradient[0], torch.tensor([1.0, 1.0]))
    assert [f.kind for f in rep.findings] == ["custom-gradient"]


def test_mean_absolute_error_gradient_matches_the_formula(ip):
    ip.run(
        "inputs = torch.rand(1000, 10)\ntargets = torch.rand(1000)\n"
        "params = torch.rand(10, requires_grad=True)\n"
        "def calc_preds(params, inputs):\n    return (inputs * params).sum(axis=1)\n"
        "def calc_loss(params, inputs, targets):\n"
        "    return torch.abs(calc_preds(params, inputs) - targets).mean()\n"
    )
    ip.run("%%grad -q -o rep\nloss = calc_loss(params, inputs, targets)\nloss.backward()\n")
    ns = ip.ns
    preds = (ns["inputs"] * ns["params"].detach()).sum(axis=1)
    expected = (torch.sign(preds - ns["targets"])[:, None] * ns["inputs"]).sum(0) / 1000
    after = ns["rep"].table.loc["params", "after"]
    assert torch.allclose(after, expected, atol=1e-6, rtol=0)
    assert ns["rep"].table.loc["params", "status"] == "new"


def test_weight_created_inside_a_helper_is_found_by_its_local_name(ip):
    ip.run(
        "def model(x):\n"
        "    w = torch.tensor(2.0, requires_grad=True)\n"
        "    b = torch.tensor(1.0)\n"
        "    return w * x + b\n"
        "x = torch.tensor(3.0)\ny_true = torch.tensor(7.0)\n"
    )
    ip.run(
        "%%grad -q -o rep\nloss = torch.nn.functional.mse_loss(model(x), y_true)\nloss.backward()\n"
    )
    rep = ip.ns["rep"]
    assert list(rep.table.index) == ["w"]
    assert torch.equal(rep.table.loc["w", "after"], torch.tensor(0.0))
    assert rep.table.loc["w", "shape"] == ()
    # The tutorial claims tensor(2.0); the math says 2*(w*x+b-y)*x = 2*(7-7)*3 = 0.
    ip.run("y_true = torch.tensor(5.0)")
    ip.run(
        "%%grad -q -o rep\nloss = torch.nn.functional.mse_loss(model(x), y_true)\n"
        "loss.backward(gradient=torch.tensor(3.0))\n"
    )
    # 3 * 2*(7-5)*3 = 36
    assert torch.equal(ip.ns["rep"].table.loc["w", "after"], torch.tensor(36.0))


def test_mlp_parameters_are_named_by_module_path(ip):
    ip.run(
        "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "x = torch.randn(5, 4)"
    )
    ip.run("%%grad -q -o rep\nmodel(x).pow(2).sum().backward()\n")
    table = ip.ns["rep"].table
    assert list(table.index) == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    assert list(table["shape"]) == [(8, 4), (8,), (2, 8), (2,)]
    assert set(table["status"]) == {"new"}
    model = ip.ns["model"]
    assert torch.equal(table.loc["model.2.bias", "after"], model[2].bias.grad)
    summary = table.loc["model.0.weight", "after"]
    assert isinstance(summary, gradmagic.stats.TensorSummary)
    assert abs(summary.norm - model[0].weight.grad.norm().item()) < 1e-5
    grad = model[0].weight.grad
    assert summary.numel == 32
    assert (summary.min, summary.max) == (grad.min().item(), grad.max().item())
    assert str(summary).startswith(f"n=32 ‖g‖={summary.norm:.4g} x∈[")


def test_autograd_grad_is_recorded_and_touches_no_grad(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad -q -o rep\n(dx,) = torch.autograd.grad((x ** 3).sum(), x)\n")
    rep = ip.ns["rep"]
    assert ip.ns["x"].grad is None
    assert torch.equal(ip.ns["dx"], torch.tensor([3.0, 12.0]))
    [record] = rep.backwards
    assert record.kind == "grad" and record.inputs == ["x"]
    assert torch.equal(record.results[0], torch.tensor([3.0, 12.0]))
    assert rep.table.loc["x", "status"] == "unchanged"
    assert rep.table.loc["x", "after"] is None
    [finding] = [f for f in rep.findings if f.kind == "autograd-grad"]
    assert "tensor([ 3., 12.])" in finding.message and "not stored in `.grad`" in finding.message


def _sgd_steps(watching: bool):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    grads = []
    for _ in range(4):
        opt.zero_grad()
        if watching:
            with gradmagic.watch({"model": model, "opt": opt}):
                nn.functional.cross_entropy(model(x), y).backward()
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def test_sgd_steps_are_bit_identical_with_and_without_watching():
    plain_grads, plain_params = _sgd_steps(False)
    watched_grads, watched_params = _sgd_steps(True)
    for a, b in zip(plain_grads, watched_grads):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert all(torch.equal(p, q) for p, q in zip(plain_params, watched_params))


def test_watch_works_without_ipython_and_restores_the_engine():
    original = _engine.original_engine()
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch() as rec:
        assert _engine.is_patched()
        (100 * x).sum().backward()
    assert torch.autograd.graph._engine_run_backward is original
    assert torch.autograd._engine_run_backward is original
    assert torch.equal(rec.report().table.loc["x", "after"], torch.tensor([100.0, 100.0]))
    assert "IPython" not in type(rec.report()).__module__


def test_the_report_graph_shows_the_chain_rule_on_its_edges(ip, images):
    ip.run(
        "a = torch.tensor([2., 3.], requires_grad=True)\nb = torch.tensor([6., 4.], requires_grad=True)"
    )
    ip.run("%%grad -q -o rep\nQ = 3*a**3 - b**2\nQ.backward(gradient=torch.tensor([1., 1.]))\n")
    rep = ip.ns["rep"]
    source = rep.graph.source
    assert "PowBackward0" in source and "SubBackward0" in source and "MulBackward0" in source
    assert 'label="Q\\nSubBackward0' in source  # the root, named after the variable
    # The gradient that flowed into each leaf: 9a^2 and -2b.
    assert "[36., 81.]" in source and "[-12., -8.]" in source
    page = rep._repr_html_()
    [svg] = images(page, "gradmagic-graph")
    assert "<svg" not in page  # an image, which sanitizers keep
    texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]
    assert "[36., 81.]" in texts and "[-12., -8.]" in texts


def test_a_training_loop_keeps_one_graph_per_structure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    w = torch.tensor([2.0], requires_grad=True)
    with gradmagic.watch({"model": model, "opt": opt, "w": w}) as rec:
        for _ in range(30):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        (w**3).sum().backward()  # another structure: d/dw of w^3 is 3w^2 = 12
    graphs = [r.graph for r in rec.records]
    first = graphs[0]
    assert len(graphs) == 31 and not first.folded and first.nodes
    assert all(g.folded and g.repeat_of is first and not g.nodes for g in graphs[1:30])
    assert all(g.n_ops == first.n_ops for g in graphs[1:30])
    assert not graphs[30].folded and graphs[30].repeat_of is None
    rep = rec.report()
    assert [(g.snapshot, g.repeat) for g in rep.graphs] == [(first, 30), (graphs[30], 1)]
    assert "ran 30× in this cell" in rep.graphs[0].digraph.source
    # The drawing of the first step keeps its module grouping and its flow.
    assert [c.name for c in first.modules] == ["model", "model.0", "model.1", "model.2"]
    assert first.edge_flow
    assert torch.equal(rep.table.loc["w", "after"], torch.tensor([12.0]))


def test_a_loop_keeps_the_step_whose_gradients_went_non_finite():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch({"x": x}) as rec:
        for shift in (1.0, 1.0, 0.0, 1.0):  # the third step takes log(0) at x - 1
            x.grad = None
            torch.log(x - 1 + shift).sum().backward()
    graphs = [r.graph for r in rec.records]
    assert [g.folded for g in graphs] == [False, True, False, True]
    assert graphs[2].repeat_of is graphs[0] and graphs[2].first_nonfinite_op == "LogBackward0"
    rep = rec.report()
    assert [g.repeat for g in rep.graphs] == [4]
    # The last step's gradient is finite again, and the table shows the last step.
    assert rep.table.loc["x", "status"] == "new"
    assert "nan-inf" not in [f.kind for f in rep.findings]


def test_retain_graph_repeats_fold_and_still_count_as_the_same_graph():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch({"x": x}) as rec:
        loss = (x**2).sum()
        for _ in range(3):
            loss.backward(retain_graph=True)
    first, *repeats = [r.graph for r in rec.records]
    assert all(g.folded and g == first for g in repeats)
    [finding] = [f for f in rec.report().findings if f.kind == "retain-graph"]
    assert "(it ran 3 times here)" in finding.message
    assert torch.equal(rec.report().table.loc["x", "after"], torch.tensor([6.0, 12.0]))


def test_small_norms_from_numbers_match_torch_and_its_nan_and_inf():
    from gradmagic import stats

    cases = [
        torch.tensor([3.0, 4.0]),
        torch.arange(64, dtype=torch.float32).reshape(8, 8) / 7,
        torch.tensor(2.5, dtype=torch.float64),
        torch.zeros(0, 3),
        torch.tensor([float("inf"), 1.0]),
        torch.tensor([float("nan"), float("inf")]),
        torch.arange(65, dtype=torch.float32),  # past the list path: the kernel
    ]
    for t in cases:
        expected = float(torch.linalg.vector_norm(t))
        (got,) = stats.norms([t])
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, rel=1e-6)
    assert stats.norms([torch.tensor([3.0, 4.0])]) == [5.0]
    assert stats.norms([None]) == [None]  # values that could not be read


def test_large_exact_copies_show_as_a_summary_read_once():
    from gradmagic import stats
    from gradmagic.report.cells import value_text

    w = torch.zeros(100, requires_grad=True)
    with gradmagic.watch({"w": w}, copies=True) as rec:
        (w * torch.arange(100.0)).sum().backward()
    [row] = rec.report().rows
    assert isinstance(row.after, torch.Tensor) and torch.equal(row.after, torch.arange(100.0))
    # ‖0..99‖ = √328350 = 573.02; printed as a summary, not 100 numbers.
    assert value_text(row.after) == "‖g‖=573 x∈[0, 99]"
    assert stats.summary_of(row.after) is stats.summary_of(row.after)  # read once
    assert stats.norm_of(row.after) == pytest.approx(328350**0.5, rel=1e-6)
    with_nan = row.after.clone()
    with_nan[3] = float("nan")
    assert value_text(with_nan) == "NaN! 1 ‖g‖=nan x∈[0, 99]"
    assert stats.nonfinite(with_nan) and not stats.nonfinite(row.after)
