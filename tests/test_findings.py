"""Findings: one realistic cell per kind, asserting the names and numbers the user reads."""

from __future__ import annotations

import gc
import re
import warnings
import weakref

import pytest
import torch
from IPython.core.error import UsageError

import gradmagic

MLP = (
    "from torch import nn\n"
    "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
    "x = torch.randn(16, 4)\ny = torch.randn(16, 1)\n"
)


def _findings(rep, kind):
    return [f for f in rep.findings if f.kind == kind]


def _serious(rep):
    return [f for f in rep.findings if f.severity in ("error", "warning")]


def test_forgotten_zero_grad_in_a_three_step_loop(ip):
    ip.run(MLP + "opt = torch.optim.SGD(model.parameters(), lr=0.01)")
    ip.run(
        "%%grad -q -o rep\n"
        "for step in range(3):\n"
        "    loss = nn.functional.mse_loss(model(x), y)\n"
        "    loss.backward()\n"
        "    opt.step()\n"
    )
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "accumulated")
    assert finding.severity == "warning"
    assert finding.tensors == ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias")
    assert finding.message.startswith("backward ran 3 times in this cell")
    assert "each `opt.step()` used the sum of all gradients so far" in finding.message
    assert "call `opt.zero_grad()` before each `backward()`" in finding.message
    assert set(rep.table["status"]) == {"accumulated"}
    # The findings come first in the HTML, most serious first, linked to their rows.
    html = rep._repr_html_()
    assert html.index('data-kind="accumulated"') < html.index('data-kind="optimizer-step"')
    assert html.index('data-kind="optimizer-step"') < html.index("gradmagic-table")


def test_gradient_left_by_the_previous_run_says_how_many_runs(ip):
    ip.run("w = torch.tensor([1., -1.], requires_grad=True)")
    cell = "%%grad -q -o rep\n(3 * w).sum().backward()\n"
    for _ in range(3):
        ip.run(cell)
    [finding] = _findings(ip.ns["rep"], "accumulated")
    assert finding.tensors == ("w",)
    assert (
        "this run added to the gradient left by 2 earlier runs (3 runs now sum" in finding.message
    )
    assert "set `w.grad = None` before `backward()`" in finding.message


def test_gradient_left_by_an_unwatched_cell(ip):
    ip.run("w = torch.tensor([1., -1.], requires_grad=True)\n(3 * w).sum().backward()")
    ip.run("%%grad -q -o rep\n(3 * w).sum().backward()\n")
    [finding] = _findings(ip.ns["rep"], "accumulated")
    assert "from a backward outside `%%grad` (another cell?), so 2 runs now sum" in finding.message


def test_detach_before_the_loss(ip):
    ip.run(MLP)
    result = ip.run_raw(
        "%%grad -q -o rep\n"
        "pred = model(x).detach()\n"
        "loss = nn.functional.mse_loss(pred, y)\n"
        "loss.backward()\n"
    )
    assert "does not require grad" in str(result.error_in_exec)
    rep = ip.ns["rep"]
    assert list(rep.table["status"]) == ["none"] * 4
    [finding] = _findings(rep, "no-grad")
    assert finding.severity == "error"
    assert finding.tensors == ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias")
    assert (
        "`model` ran in this cell with gradients on, yet no gradient reached it" in finding.message
    )
    assert "(the cell uses `model(x).detach()`)" in finding.message
    assert (
        'why `loss.backward()` raised "element 0 of tensors does not require grad and does not '
        'have a grad_fn": `loss` has no `grad_fn`'
    ) in finding.message
    assert not _findings(rep, "grad-disabled")


def test_unused_layer_and_unused_tensor(ip):
    ip.run(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.used = nn.Linear(3, 1)\n"
        "        self.spare = nn.Linear(3, 1)\n"
        "    def forward(self, x):\n"
        "        return self.used(x)\n"
        "net = Net()\nx = torch.randn(5, 3)\n"
        "scale = torch.tensor(2., requires_grad=True)\n"
    )
    ip.run("%%grad -q -o rep\nloss = net(x).pow(2).mean()\nloss.backward()\nscale\n")
    rep = ip.ns["rep"]
    unused, spare = _findings(rep, "no-grad")  # in table order: `scale` was defined first
    assert spare.tensors == ("net.spare.weight", "net.spare.bias")
    assert "other parameters of `net` did get one" in spare.message
    assert unused.tensors == ("scale",)
    assert "it is not used in the loss that backward started from" in unused.message


def test_log_of_zero_gives_an_infinite_gradient(ip):
    ip.run("w = torch.zeros(1, requires_grad=True)")
    ip.run("%%grad -q -o rep\ntorch.log(w).sum().backward()\n")
    rep = ip.ns["rep"]
    assert torch.equal(ip.ns["w"].grad, torch.tensor([float("inf")]))  # d log(w)/dw = 1/w
    [finding] = _findings(rep, "nan-inf")
    assert finding.severity == "error" and finding.tensors == ("w",)
    assert finding.message == (
        "`w.grad` has 1 Inf (of 1 element): the first non-finite gradient came out of "
        "`LogBackward0` at line 2: `torch.log(w).sum().backward()`: likely `log` at 0 (its "
        "gradient is 1/x)."
    )
    assert rep.table.loc["w", "status"] == "nan/inf"
    # Without the graph's gradient flow there is no first op to name: the cause stays general.
    ip.run("%%grad -q -o rep -G\nw.grad = None\ntorch.log(w).sum().backward()\n")
    [finding] = _findings(ip.ns["rep"], "nan-inf")
    assert finding.message == (
        "`w.grad` has 1 Inf (of 1 element): an operation between the loss and it produced a "
        "non-finite gradient (log or division of 0, sqrt at 0, or overflow)."
    )


def test_log_of_a_product_with_zero_counts_nan_and_inf(ip):
    ip.run(
        "w = torch.zeros(3, requires_grad=True)\nv = torch.tensor([0., 1., 2.], requires_grad=True)"
    )
    ip.run("%%grad -q -o rep\nloss = torch.log(w * v).sum()\nloss.backward()\n")
    # d/dw = v · 1/(w·v) = v · inf = [nan, inf, inf]; d/dv = w · inf = [nan, nan, nan].
    w, v = ip.ns["w"].grad, ip.ns["v"].grad
    assert (torch.isnan(w).sum(), torch.isinf(w).sum(), torch.isnan(v).sum()) == (1, 2, 3)
    [finding] = _findings(ip.ns["rep"], "nan-inf")
    assert finding.tensors == ("w", "v")
    assert finding.message.startswith(
        "`w.grad` has 1 NaN and 2 Inf (of 3 elements); `v.grad` has 3 NaN (of 3 elements): "
        "the first non-finite gradient came out of `LogBackward0`"
    )


def test_nan_gradient_counts_nan(ip):
    ip.run("w = torch.tensor([0., 4.], requires_grad=True)")
    ip.run("%%grad -q -o rep\n(torch.sqrt(w) * 0).sum().backward()\n")
    # 0 * 1/(2*sqrt(0)) = 0 * inf = NaN in the first element only.
    [finding] = _findings(ip.ns["rep"], "nan-inf")
    assert finding.message.startswith("`w.grad` has 1 NaN (of 2 elements)")


def test_twenty_sigmoid_layers_vanish(ip):
    ip.run(
        "from torch import nn\n"
        "layers = []\n"
        "for _ in range(20):\n"
        "    layers += [nn.Linear(16, 16), nn.Sigmoid()]\n"
        "model = nn.Sequential(*layers, nn.Linear(16, 1))\n"
        "x = torch.randn(32, 16)\n"
    )
    ip.run("%%grad -q -o rep\nloss = model(x).pow(2).mean()\nloss.backward()\n")
    rep, model = ip.ns["rep"], ip.ns["model"]
    [finding] = _findings(rep, "vanishing")
    first = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[0].parameters()]))
    last = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[40].parameters()]))
    ratio = (first / last).item()
    assert ratio < 1e-12
    assert finding.message.startswith(f"`model.0` gradients are {ratio:.2g} of `model.40`'s")
    assert f"(‖g‖ {first.item():.2g} vs {last.item():.2g})".replace("e-0", "e-") in finding.message
    assert "through 20 saturating activations" in finding.message
    assert finding.tensors == ("model.0.weight", "model.0.bias", "model.40.weight", "model.40.bias")
    assert not _findings(rep, "exploding")


def test_thresholds_are_options(ip):
    ip.run("w = torch.tensor([1., 1.], requires_grad=True)")
    ip.run("%%grad -q -o rep --explode 100\n(1000 * w).sum().backward()\n")
    [finding] = _findings(ip.ns["rep"], "exploding")
    assert finding.message.startswith("`w` got gradients of norm 1.4e+3, above 1e+2")
    ip.run("%%grad -q -o rep\nw.grad = None\n(1000 * w).sum().backward()\n")
    assert not _findings(ip.ns["rep"], "exploding")
    ip.run("%%grad -q -o rep --vanish 1e-2\nw.grad = None\n(1e-3 * w).sum().backward()\n")
    [finding] = _findings(ip.ns["rep"], "vanishing")
    assert "`w` got gradients of norm 0.0014, below 0.01" in finding.message
    for bad, message in (("--ratio 0", "--ratio must be above 0"), ("--vanish x", "a number")):
        with pytest.raises(UsageError, match=message):
            ip.shell.run_cell_magic("grad", bad, "pass\n")


def test_frozen_model_with_nothing_left_to_train(ip):
    ip.run(MLP)
    result = ip.run_raw(
        "%%grad -q -o rep\nmodel.requires_grad_(False)\n"
        "nn.functional.mse_loss(model(x), y).backward()\n"
    )
    assert result.error_in_exec is not None
    [finding] = _findings(ip.ns["rep"], "no-grad")
    assert finding.message.endswith(
        "does not depend on any tensor that requires grad (the cell uses "
        "`model.requires_grad_(False)`)."
    )


def test_sgd_step_shows_values_before_and_after(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)\nopt = torch.optim.SGD([x], lr=0.001)")
    ip.run("%%grad -q -o rep\nloss = (100 * x).sum()\nloss.backward()\nopt.step()\n")
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "optimizer-step")
    assert finding.severity == "info" and finding.tensors == ("x",)
    assert finding.message.startswith(
        "`opt = SGD(lr=0.001)` stepped once, updating 1 tensor: "
        "`x`: tensor([1., 2.]) → tensor([0.9000, 1.9000])"
    )
    row = rep.step_table.loc["x"]
    assert (row["optimizer"], row["kind"], row["steps"]) == ("opt", "SGD", 1)
    assert torch.equal(row["grad"], torch.tensor([100.0, 100.0]))
    assert torch.equal(row["before"], torch.tensor([1.0, 2.0]))
    assert torch.equal(row["after"], torch.tensor([0.9, 1.9]))
    assert torch.allclose(row["change"], torch.tensor([-0.1, -0.1]))
    text = repr(rep)
    assert "optimizer step: opt = SGD(lr=0.001) · 1 step" in text
    [line] = [line for line in text.splitlines() if line.strip().startswith("x ")][-1:]
    assert re.split(r"\s{2,}", line.strip()) == [
        "x",
        "(2,)",
        "[100., 100.]",
        "[1., 2.]",
        "[0.9000, 1.9000]",
        "[-0.1000, -0.1000]",
    ]
    html = rep._repr_html_()
    [table] = re.findall(r'<table class="gradmagic-steps".*?</table>', html, re.S)
    cells = re.findall(r'<td class="gm-step-(\w+)"[^>]*>(.*?)</td>', table)
    assert cells == [
        ("grad", "[100., 100.]"),
        ("before", "[1., 2.]"),
        ("after", "[0.9000, 1.9000]"),
        ("change", "[-0.1000, -0.1000]"),
    ]
    assert _serious(rep) == []
    # The global step hooks are gone with the block.
    from torch.optim import optimizer

    assert not optimizer._global_optimizer_pre_hooks
    assert not optimizer._global_optimizer_post_hooks


def test_a_step_table_holds_the_parameters_as_the_block_ended_not_as_they_are_later():
    def block(w: torch.Tensor, big: torch.Tensor) -> object:
        opt = torch.optim.SGD([w, big], lr=0.5)
        with gradmagic.watch({"w": w, "big": big, "opt": opt}) as rec:
            (3 * w).sum().backward()
            (2 * big).sum().backward()
            opt.step()
        return rec

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    big = torch.ones(100, requires_grad=True)  # large: within the copy budget, by norms
    rec = block(w, big)
    with torch.no_grad():
        big.add_(1.0)  # `big` moves again after the block: the report must not see it
        w.data.mul_(10)  # nor a write that bumps no version
    rep = rec.report()
    step_w, step_big = rep.steps[0].params
    assert torch.equal(step_w.after, torch.tensor([-0.5, 0.5]))  # w - 0.5 * 3
    assert torch.equal(step_w.change, torch.tensor([-1.5, -1.5]))
    # big - 0.5 * 2 = 0 everywhere: norm 0 after, 10 before, and it moved by ‖-1‖·√100.
    assert step_big.after.norm == 0.0
    assert step_big.before.norm == pytest.approx(10.0)
    assert step_big.change == pytest.approx(10.0)
    assert not step_w.moved_after_step and not step_big.moved_after_step


def test_a_write_to_a_parameter_after_its_step_is_said():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    with gradmagic.watch({"w": w, "opt": opt}) as rec:
        (3 * w).sum().backward()
        opt.step()
        with torch.no_grad():
            w.clamp_(min=0.0)  # weight clipping, as a WGAN critic does
    [step] = rec.report().steps[0].params
    assert torch.equal(step.after, torch.tensor([0.0, 0.5]))  # as the block ended
    assert step.moved_after_step


def test_large_parameters_step_as_summaries_and_no_tensor_is_kept(ip):
    ip.run(
        "from torch import nn\nmodel = nn.Linear(64, 8)\n"
        "opt = torch.optim.Adam(model.parameters(), lr=1e-2)\nx = torch.randn(8, 64)"
    )
    ip.run("%%grad -q -o rep\nopt.zero_grad()\nmodel(x).sum().backward()\nopt.step()\n")
    rep = ip.ns["rep"]
    [steps] = rep.steps
    weight, bias = steps.params
    assert (weight.name, weight.steps) == ("model.weight", 1)
    assert isinstance(weight.after, torch.Tensor) is False and weight.after.numel == 64 * 8
    # Adam's first step moves every weight by lr (its update is g/|g|): ‖Δ‖ = lr·sqrt(n).
    assert weight.change == pytest.approx(1e-2 * (64 * 8) ** 0.5, rel=1e-3)
    assert steps.hyperparameters == {"lr": 1e-2, "betas": (0.9, 0.999)}
    assert "‖Δ‖=0.2263" in repr(rep)
    # Only small copies outlive the block: large values are summaries, the model goes away.
    kept = [v for p in steps.params for v in vars(p).values() if isinstance(v, torch.Tensor)]
    assert [t.numel() for t in kept] == [8] * 4  # the bias: grad, before, after, change
    ref = weakref.ref(ip.ns["model"].weight)
    ip.run("del model, opt")
    gc.collect()
    assert ref() is None


def test_reading_grad_of_a_non_leaf(ip, capsys):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    cell = "%%grad -q -o rep\ny = x * 3\ny.sum().backward()\nprint(y.grad)\n"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ip.run(cell)
    # The user's warning is shown exactly as without gradmagic.
    assert [str(w.message)[:40] for w in seen] == ["The .grad attribute of a Tensor that is "]
    [finding] = _findings(ip.ns["rep"], "nonleaf-grad")
    assert finding.tensors == ("y",)
    assert finding.message.startswith("`y.grad` was read, but `y` is not a leaf")
    assert "Call `y.retain_grad()` before `backward()`" in finding.message
    assert "or read a leaf's instead (`x`)" in finding.message
    # Filters that hide the warning (a repeat under "default", or "ignore") hide it still;
    # the finding stays, read from the cell's source.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("ignore")
        ip.run(cell)
    assert seen == []
    assert [f.tensors for f in _findings(ip.ns["rep"], "nonleaf-grad")] == [("y",)]
    assert "None" in capsys.readouterr().out


def test_warning_probe_leaves_filters_and_showwarning_alone(ip):
    import gradmagic

    before = warnings._showwarnmsg
    x = torch.ones(2, requires_grad=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("ignore")
        with gradmagic.watch({"x": x}) as rec:
            y = x * 2
            y.sum().backward()
            assert y.grad is None
    assert seen == [] and warnings._showwarnmsg is before
    assert rec.block.nonleaf_grad_reads == []  # ignored by the user's filter: not seen


def test_second_backward_through_a_freed_graph(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    result = ip.run_raw(
        "%%grad -q -o rep\nloss = (x ** 2).sum()\nloss.backward()\nloss.backward()\n"
    )
    assert "second time" in str(result.error_in_exec)
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "double-backward")
    assert finding.severity == "error" and finding.tensors == ("loss",)
    assert finding.message.startswith(
        "`loss.backward()` went through a graph a second time, but backward frees the graph's "
        "saved tensors as it goes: the earlier `loss.backward()` in this cell freed it."
    )
    assert "`retain_graph=True`" in finding.message
    assert torch.equal(ip.ns["x"].grad, torch.tensor([2.0, 4.0]))
    assert not _findings(rep, "accumulated")


def test_retain_graph_explains_the_sum(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run(
        "%%grad -q -o rep\nloss = (x ** 2).sum()\nloss.backward(retain_graph=True)\nloss.backward()\n"
    )
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "retain-graph")
    assert "(it ran 2 times here)" in finding.message
    assert torch.equal(rep.table.loc["x", "after"], torch.tensor([4.0, 8.0]))


def test_backward_of_a_loss_computed_under_no_grad(ip):
    ip.run(MLP)
    result = ip.run_raw(
        "%%grad -q -o rep\nwith torch.no_grad():\n    loss = nn.functional.mse_loss(model(x), y)\n"
        "loss.backward()\n"
    )
    assert "does not require grad" in str(result.error_in_exec)
    [finding] = _findings(ip.ns["rep"], "grad-disabled")
    assert finding.severity == "error" and finding.tensors == ("loss",)
    assert "the cell computes it under `torch.no_grad()`, which records no graph" in finding.message


def test_backward_when_gradients_were_switched_off_earlier(ip):
    ip.run("w = torch.ones(2, requires_grad=True)\ntorch.set_grad_enabled(False)")
    try:
        result = ip.run_raw("%%grad -q -o rep\nloss = (w * 2).sum()\nloss.backward()\n")
    finally:
        torch.set_grad_enabled(True)
    assert result.error_in_exec is not None
    [finding] = _findings(ip.ns["rep"], "grad-disabled")
    assert "gradients were off when the cell began" in finding.message


def test_autograd_grad_says_what_it_returned(ip):
    ip.run(
        "x = torch.tensor([1., 2.], requires_grad=True)\nW = torch.ones(5, 5, requires_grad=True)"
    )
    ip.run(
        "%%grad -q -o rep\ndx, dW = torch.autograd.grad((x ** 3).sum() + (W * 2).sum(), [x, W])\n"
    )
    [finding] = _findings(ip.ns["rep"], "autograd-grad")
    assert finding.tensors == ("x", "W")
    assert "d/d`x` = tensor([ 3., 12.]); d/d`W` = shape (5, 5): n=25" in finding.message
    assert "not stored in `.grad`, so `.grad` was not touched" in finding.message
    assert ip.ns["x"].grad is None and ip.ns["W"].grad is None


def test_custom_gradient_shows_the_vector(ip):
    ip.run("a = torch.tensor([2., 3.], requires_grad=True)")
    ip.run("%%grad -q -o rep\nQ = 3 * a ** 3\nQ.backward(gradient=torch.tensor([1., 0.5]))\n")
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "custom-gradient")
    assert finding.tensors == ("Q",)
    assert "v = `tensor([1.0000, 0.5000])`" in finding.message
    assert "vector-Jacobian product `vᵀ·∂Q/∂leaf`" in finding.message
    # 9 a² · v = [36, 81 * 0.5]
    assert torch.equal(rep.table.loc["a", "after"], torch.tensor([36.0, 40.5]))


def test_clean_training_step_has_no_warnings(ip):
    ip.run(
        "from torch import nn\n"
        "backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU()).requires_grad_(False)\n"
        "head = nn.Linear(16, 3)\n"
        "other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))  # a second, untouched model\n"
        "opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)\n"
        "x = torch.randn(32, 6)\ny = torch.randint(0, 3, (32,))\n"
    )
    cell = (
        "%%grad -q -o rep\n"
        "opt.zero_grad()\n"
        "loss = nn.functional.cross_entropy(head(backbone(x)), y)\n"
        "loss.backward()\n"
        "opt.step()\n"
    )
    for _ in range(2):
        ip.run(cell)
        rep = ip.ns["rep"]
        assert _serious(rep) == []
        assert [f.kind for f in rep.findings] == ["optimizer-step"]
        assert list(rep.table.index) == ["head.weight", "head.bias"]
        assert set(rep.table["status"]) == {"new"}


COMPILED = (
    MLP + "cmodel = torch.compile(model, backend='aot_eager')\n"
    "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
)


@pytest.mark.slow
def test_a_compiled_module_is_one_opaque_op_said_by_name(ip, images):
    ip.run(COMPILED)
    plain = {n: p.detach().clone() for n, p in ip.ns["model"].named_parameters()}
    step = "opt.zero_grad()\nloss = nn.functional.mse_loss(cmodel(x), y)\nloss.backward()\n"
    ip.run("%%grad -q -o rep\n" + step)
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "compiled-region")
    assert finding.severity == "info" and finding.tensors == ("cmodel",)
    assert finding.message.startswith(
        "`cmodel` (a compiled `Sequential`) ran compiled by `torch.compile`: its backward is "
        "one op in the graph (`CompiledFunctionBackward`), whose inside is opaque to gradmagic"
    )
    assert not _serious(rep)
    assert [r.status for r in rep.rows] == ["new"] * 4
    dot = rep.graph.source
    label = "CompiledFunctionBackward\\nsaved: 3 tensors\\ncompiled module cmodel\\n"
    assert label + '(inside opaque to gradmagic)"' in dot
    assert 'tooltip="compiled module cmodel: the backward of everything' in dot
    [svg] = images(rep._repr_html_(), "gradmagic-graph")
    assert "(inside opaque to gradmagic)" in svg and "torch.compile region" in svg  # legend
    # The same gradients as without gradmagic, bit for bit.
    grads = {n: p.grad.clone() for n, p in ip.ns["model"].named_parameters()}
    ip.run("opt.zero_grad()\n" + step)
    for n, p in ip.ns["model"].named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), plain[n])


@pytest.mark.slow
def test_a_compiled_function_is_named_in_the_finding(ip):
    ip.run(
        "w = torch.tensor([1.0, 2.0], requires_grad=True)\n"
        "@torch.compile(backend='aot_eager')\n"
        "def cube_sum(t):\n    return (t**3).sum()\n"
    )
    ip.run("%%grad -q -o rep\nloss = cube_sum(w)\nloss.backward()\n")
    rep = ip.ns["rep"]
    assert torch.equal(rep.table.loc["w", "after"], torch.tensor([3.0, 12.0]))  # 3w²
    [finding] = _findings(rep, "compiled-region")
    assert finding.message.startswith(
        "`cube_sum` (the compiled function `cube_sum`) ran compiled by `torch.compile`: its "
        "backward is one op in the graph"
    )
    assert "a torch.compile region\\n(inside opaque to gradmagic)" in rep.graph.source


def test_no_compiled_region_finding_without_torch_compile(ip):
    ip.run(MLP)
    ip.run("%%grad -q -o rep\nnn.functional.mse_loss(model(x), y).backward()\n")
    rep = ip.ns["rep"]
    assert not _findings(rep, "compiled-region")
    assert "opaque" not in rep.graph.source


def test_torch_func_grad_is_said_to_be_unobserved(ip):
    ip.run("from torch.func import grad, vmap\nx = torch.tensor([1.0, 2.0, 3.0])")
    ip.run("%%grad -q -o rep\ng = grad(lambda t: (t**3).sum())(x)\n")
    rep = ip.ns["rep"]
    assert torch.equal(ip.ns["g"], torch.tensor([3.0, 12.0, 27.0]))
    assert rep.rows == [] and not _findings(rep, "no-backward")
    [finding] = _findings(rep, "func-transform")
    assert finding.message == (
        "The cell uses `grad`: torch.func transforms are not observed by gradmagic. The "
        "gradients a transform returns are ordinary tensors, not `.grad`, so they have no "
        "rows here."
    )
    assert [f.kind for f in rep.findings] == ["func-transform"]
    ip.run("%%grad -q -o rep\nsq = torch.vmap(lambda t: t * t)(x)\n")
    rep = ip.ns["rep"]
    [finding] = _findings(rep, "func-transform")
    assert finding.message.startswith("The cell uses `torch.vmap`: torch.func transforms")
    assert not _findings(rep, "no-backward")


def test_a_transform_beside_a_backward_is_said_and_the_backward_observed(ip):
    ip.run("import torch.func\nw = torch.tensor([1.0, 2.0], requires_grad=True)")
    ip.run(
        "%%grad -q -o rep\n"
        "h = torch.func.jacrev(lambda t: t * t)(w.detach())\n"
        "(w * 3).sum().backward()\n"
    )
    rep = ip.ns["rep"]
    assert torch.equal(rep.table.loc["w", "after"], torch.tensor([3.0, 3.0]))
    [finding] = _findings(rep, "func-transform")
    assert finding.message.startswith("The cell uses `torch.func.jacrev`:")


def test_a_name_that_is_no_transform_is_not_taken_for_one(ip):
    ip.run("def grad(t):\n    return t * 2\nx = torch.tensor([1.0], requires_grad=True)")
    ip.run("%%grad -q -o rep\ny = grad(x)\n")
    rep = ip.ns["rep"]
    assert not _findings(rep, "func-transform")
    [finding] = _findings(rep, "no-backward")
    assert finding.message == "No backward ran in this cell: nothing reached the autograd engine."


def test_per_sample_gradients_with_vmap_and_grad_are_said_unobserved(ip):
    # The torch.func tutorial's per-sample gradients: nothing lands in `.grad`.
    ip.run(
        MLP + "from torch.func import functional_call, grad, vmap\n"
        "params = {k: v.detach() for k, v in model.named_parameters()}\n"
        "def loss_of(p, xb, yb):\n"
        "    out = functional_call(model, p, (xb.unsqueeze(0),))\n"
        "    return nn.functional.mse_loss(out, yb.unsqueeze(0))\n"
    )
    ip.run(
        "%%grad -q -o rep\nper_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)\n"
    )
    rep = ip.ns["rep"]
    assert ip.ns["per_sample"]["0.weight"].shape == (16, 8, 4)
    assert all(p.grad is None for p in ip.ns["model"].parameters())
    assert rep.rows == [] and [f.kind for f in rep.findings] == ["func-transform"]
    assert rep.findings[0].message.startswith("The cell uses `vmap` and `grad`: torch.func")
