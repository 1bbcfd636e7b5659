"""`--steps` (the backward step by step) and `--check` (gradcheck on custom Functions).

Numbers come from the math: seed 001's `Q = 3a³ − b²` and seed 000's mean absolute
error, whose gradient is `(1/N) Σ sign(pred − t) · inputs`.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from IPython.core.error import UsageError

import gradmagic
from gradmagic.capture import custom as custom_check
from gradmagic.graph.data import flow_text
from tests import launch

SEED_001 = """
a = torch.tensor([2., 3.], requires_grad=True)
b = torch.tensor([6., 4.], requires_grad=True)
"""
Q_CELL = "Q = 3*a**3 - b**2\nQ.backward(gradient=torch.tensor([1., 1.]))"


def _steps(rep):
    [walked] = rep.backward_steps
    return walked


def _rows(walked):
    return [
        (s.op, s.received, s.derivative, [(x.to, x.value, x.local, x.read) for x in s.sent])
        for s in walked.steps
    ]


# -- the backward, step by step ------------------------------------------------------------
def test_seed_001_steps_in_the_engine_order_with_exact_numbers(ip):
    ip.run(SEED_001)
    ip.run(f"%%grad --steps -o rep\n{Q_CELL}")
    rep = ip.ns["rep"]
    walked = _steps(rep)
    # 9a² = [36, 81], −2b = [−12, −8]; Pow's local derivative 3a² = [12, 27], 2b = [12, 8].
    assert _rows(walked) == [
        (
            "SubBackward0",
            "[1., 1.]",
            "input 0: 1; input 1: −1",
            [("MulBackward0", "[1., 1.]", "1", False), ("PowBackward0", "[-1., -1.]", "-1", False)],
        ),
        ("PowBackward0", "[-1., -1.]", "2·a", [("`b`", "[-12., -8.]", "[12., 8.]", True)]),
        ("AccumulateGrad", "[-12., -8.]", "adds what it received to `b.grad`", []),
        (
            "MulBackward0",
            "[1., 1.]",
            "the other factor",
            [("PowBackward0", "[3., 3.]", "3.", True)],
        ),
        ("PowBackward0", "[3., 3.]", "3·a²", [("`a`", "[36., 81.]", "[12., 27.]", True)]),
        ("AccumulateGrad", "[36., 81.]", "adds what it received to `a.grad`", []),
    ]
    assert [s.number for s in walked.steps] == [1, 2, 3, 4, 5, 6]
    assert [c.text for c in walked.chains] == [
        "b.grad = [-12., -8.] = [1., 1.] · -1 · [12., 8.]",
        "a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]",
    ]
    assert torch.equal(ip.ns["a"].grad, 9 * ip.ns["a"].detach() ** 2)
    assert torch.equal(ip.ns["b"].grad, -2 * ip.ns["b"].detach())

    text = repr(rep)
    assert "  the backward, step by step: the order the engine ran the ops" in text
    assert "    5. PowBackward0  received [3., 3.]  local derivative: 3·a²" in text
    assert "         → `a`: [36., 81.] (local [12., 27.] = sent ÷ received)" in text
    assert "      a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]" in text
    page = rep._repr_html_()
    assert '<table class="gradmagic-backward-steps"' in page
    assert "a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]" in page
    assert "<script" not in page and "<style" not in page and "<svg" not in page


def test_steps_change_no_gradient_and_are_absent_without_the_option(ip):
    ip.run(SEED_001)
    ip.run(f"%%grad -o plain\n{Q_CELL}")
    plain = (ip.ns["a"].grad.clone(), ip.ns["b"].grad.clone())
    ip.run(SEED_001)
    ip.run(f"%%grad --steps -q\n{Q_CELL}")
    assert torch.equal(ip.ns["a"].grad, plain[0]) and torch.equal(ip.ns["b"].grad, plain[1])
    rep = ip.ns["plain"]
    assert rep.backward_steps == [] and rep.steps_notes == []
    assert "step by step" not in repr(rep) and "gradmagic-backward-steps" not in rep._repr_html_()


def test_second_run_writes_the_chain_as_an_addition(ip):
    ip.run(SEED_001)
    ip.run(f"%%grad -q\n{Q_CELL}")
    ip.run(f"%%grad --steps -o rep\n{Q_CELL}")
    chains = [c.text for c in _steps(ip.ns["rep"]).chains]
    assert chains[1] == "a.grad += [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]"
    assert ip.ns["a"].grad.tolist() == [72.0, 162.0]


def test_seed_000_mean_absolute_error_step_by_step():
    """loss = mean|inputs @ params − targets|: ∂loss/∂params = (1/N) Σ sign(pred − t) · inputs."""
    torch.manual_seed(0)
    inputs = torch.rand(4, 3)
    targets = torch.tensor([0.0, 10.0, 0.0, 10.0])  # pred in [0, 3): signs +, −, +, −
    params = torch.rand(3, requires_grad=True)
    with gradmagic.watch(steps=True) as rec:
        loss = (inputs @ params - targets).abs().mean()
        loss.backward()
    rep = rec.report()
    walked = _steps(rep)
    signs = torch.sign(inputs @ params.detach() - targets)
    assert signs.tolist() == [1.0, -1.0, 1.0, -1.0]
    expected = inputs.T @ signs / 4
    assert torch.equal(params.grad, expected)
    assert _rows(walked)[:3] == [
        (
            "MeanBackward0",
            "1.",
            "1/N, N = 4",
            [("AbsBackward0", "[0.2500, 0.2500, 0.2500, 0.2500]", "1/4", False)],
        ),
        (
            "AbsBackward0",
            "[0.2500, 0.2500, 0.2500, 0.2500]",
            "sign(x)",
            [("SubBackward0", "[0.2500, -0.2500, 0.2500, -0.2500]", "[1., -1., 1., -1.]", True)],
        ),
        (
            "SubBackward0",
            "[0.2500, -0.2500, 0.2500, -0.2500]",
            "1",
            [("MvBackward0", "[0.2500, -0.2500, 0.2500, -0.2500]", "1", False)],
        ),
    ]
    mv = walked.steps[3]
    assert (mv.op, mv.derivative) == ("MvBackward0", "the matrixᵀ · the gradient")
    [(to, value, local, _)] = _rows(walked)[3][3]
    assert (to, local) == ("`params`", "")
    assert value == "[" + ", ".join(f"{v:.4f}" for v in expected.tolist()) + "]"
    [chain] = walked.chains
    assert chain.text == (
        f"params.grad = {value} = 1. · 1/4 · [1., -1., 1., -1.] · 1 · "
        "(MvBackward0: the matrixᵀ · the gradient)"
    )


def test_a_leaf_reached_twice_gets_the_sum_not_a_product():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch(steps=True) as rec:
        y = x * x
        y.sum().backward()
    walked = _steps(rec.report())
    mul = next(s for s in walked.steps if s.op == "MulBackward0")
    # Both factors are x: each edge sends g·x, and x receives their sum 2x.
    assert [(s.to, s.value, s.shared) for s in mul.sent] == [("`x`", "", 2), ("`x`", "", 2)]
    assert walked.chains[0].text == (
        "x.grad = [2., 4.]: the sum of what reached it along 2 edges into it"
    )
    assert x.grad.tolist() == [2.0, 4.0]


def test_a_small_network_with_mse_loss(ip):
    ip.run(
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(3, 1)\n"
        "inputs = torch.rand(4, 3)\n"
        "targets = torch.rand(4, 1)\n"
    )
    ip.run(
        "%%grad -q\nloss = torch.nn.functional.mse_loss(torch.relu(model(inputs)), targets)\n"
        "loss.backward()"
    )
    plain = [p.grad.clone() for p in ip.ns["model"].parameters()]
    ip.run("model.zero_grad()")
    ip.run(
        "%%grad --steps -o rep\n"
        "loss = torch.nn.functional.mse_loss(torch.relu(model(inputs)), targets)\n"
        "loss.backward()"
    )
    after = [p.grad for p in ip.ns["model"].parameters()]
    assert all(torch.equal(p, q) for p, q in zip(plain, after))
    walked = _steps(ip.ns["rep"])
    ops = [s.op for s in walked.steps]
    assert ops[:3] == ["MseLossBackward0", "ReluBackward0", "AddmmBackward0"]
    assert walked.steps[0].derivative == "2·(x − y)/N, N = 4"
    assert walked.steps[1].derivative == "1 where the output is > 0, else 0"
    assert walked.steps[2].derivative == ""  # not described: its numbers still show
    assert sorted(s.leaf for s in walked.steps if s.op == "AccumulateGrad") == [
        "model.bias",
        "model.weight",
    ]


def test_a_graph_too_large_is_said_not_shown(ip):
    ip.run("x = torch.tensor([1.0], requires_grad=True)")
    ip.run("%%grad --steps -o rep\ny = x\nfor _ in range(70):\n    y = y * 1.0\ny.sum().backward()")
    rep = ip.ns["rep"]
    assert rep.backward_steps == []
    assert rep.steps_notes == ["The backward of 71 ops is not shown step by step (at most 60 ops)."]
    assert "The backward of 71 ops is not shown step by step (at most 60 ops)." in repr(rep)


def test_steps_without_the_graph_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="--steps shows the graph's ops one by one"):
        ip.shell.run_cell_magic("grad", "--steps -G", "pass")
    needs_graph = "steps=True shows the graph's ops: it needs graph=True"
    with pytest.raises(ValueError, match=needs_graph), gradmagic.watch(steps=True, graph=False):
        pass


def test_names_from_the_user_are_escaped_in_the_steps(ip):
    ip.run("d = {'<b>&x': torch.tensor([2.0], requires_grad=True)}")
    ip.run("%%grad --steps -o rep\n(d['<b>&x'] ** 2).sum().backward()")
    page = ip.ns["rep"]._repr_html_()
    assert "d[&#x27;&lt;b&gt;&amp;x&#x27;].grad = [4.] = 1. · 1 · 4." in page
    assert "<b>&x" not in page


# -- gradcheck on custom Functions ---------------------------------------------------------
FUNCTIONS = """
class Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y, g * x


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x  # wrong: the derivative of x² is 2x


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x * k

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


class Float32Only(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        assert x.dtype == torch.float32, "needs float32"
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g
"""


def _functions() -> dict:
    """The Functions of `FUNCTIONS`, defined outside a shell."""
    namespace = {"torch": torch}
    exec(FUNCTIONS, namespace)
    return namespace


def _first_input() -> float:
    generator = torch.Generator().manual_seed(custom_check.SEED)
    x = torch.rand((3,), dtype=torch.float64, generator=generator)
    return float(x[0] * (custom_check.HIGH - custom_check.LOW) + custom_check.LOW)


def test_check_names_the_wrong_backward_the_input_and_the_gap(ip):
    ip.run(FUNCTIONS)
    ip.run(
        "a = torch.tensor([1., 2., 3.], requires_grad=True)\n"
        "b = torch.tensor([4., 5., 6.], requires_grad=True)"
    )
    ip.run("torch.manual_seed(123)\nstate = torch.get_rng_state()")
    ip.run(
        "%%grad --check -o rep\n"
        "(Product.apply(a, b).sum() + Square.apply(a).sum() + Scale.apply(b, 2.0).sum()).backward()"
    )
    assert torch.equal(torch.get_rng_state(), ip.ns["state"])  # the user's random state
    assert ip.ns["a"].tolist() == [1.0, 2.0, 3.0]
    assert ip.ns["a"].grad.tolist() == [5.0, 7.0, 9.0]  # b + x, what the wrong backward gives
    assert ip.ns["b"].grad.tolist() == [3.0, 4.0, 5.0]
    rep = ip.ns["rep"]
    x0 = _first_input()
    found = {f.kind: f.message for f in rep.findings if f.kind.startswith("custom-function")}
    assert found["custom-function-gradient"] == (
        f"`Square`'s backward disagrees with finite differences for input 0 (`a`), at element "
        f"[0] (output element 0): the backward gives {x0:.6g}, finite differences give "
        f"{2 * x0:.6g}, a difference of {x0:.6g} (`gradcheck` on float64 inputs drawn uniformly "
        "in [0.2, 1), of shapes (3,))."
    )
    assert rep.findings[0].kind == "custom-function-gradient"  # an error: said first
    checks = {c.function: c for c in rep.block.custom_checks}
    assert checks["Product"].status == "ok"
    assert checks["Scale"].status == "not checked"
    messages = [f.message for f in rep.findings]
    assert (
        "`Product`'s backward agrees with finite differences: `gradcheck` passed on float64 "
        "inputs drawn uniformly in [0.2, 1), of shapes (3,), (3,)." in messages
    )
    assert (
        "`Scale` was not checked with `gradcheck`: its forward takes 2 arguments and the graph "
        "holds 1 tensor: the others (numbers, flags, objects) are not recorded, so gradmagic "
        "cannot call it again." in messages
    )


def test_check_changes_nothing_the_engine_computes(ip):
    ip.run(FUNCTIONS)
    cell = (
        "torch.manual_seed(5)\n"
        "a = torch.rand(3, requires_grad=True)\n"
        "(Product.apply(a, a * 2).sum() + Square.apply(a).sum()).backward()\n"
        "after = torch.rand(2)\n"
    )
    ip.run(cell)
    plain = (ip.ns["a"].grad.clone(), ip.ns["after"].clone())
    ip.run("%%grad --check -q\n" + cell)
    assert torch.equal(ip.ns["a"].grad, plain[0])
    assert torch.equal(ip.ns["after"], plain[1])


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


def test_check_is_unseen_by_the_users_saved_tensor_hooks_and_dispatch_modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    def run(watching):
        calls = []
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        mode = Ops()
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: calls.append("pack") or t, lambda t: calls.append("unpack") or t
        )
        with hooks, mode:
            if watching:
                with gradmagic.watch({}, steps=True, check=True) as rec:
                    _Cube.apply(x * 2).sum().backward()
            else:
                _Cube.apply(x * 2).sum().backward()
        if watching:
            [check] = rec.report().block.custom_checks
            assert check.status == "ok"
        return calls, mode.seen, x.grad

    plain, watched = run(False), run(True)
    assert plain[0] == watched[0] == ["pack", "unpack"]
    assert plain[1] == watched[1]
    assert torch.equal(plain[2], watched[2]) and plain[2].tolist() == [24.0, 96.0]


def test_a_forward_that_draws_random_numbers_is_not_judged(ip):
    ip.run(
        "class Noisy(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        return x + torch.rand_like(x)\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        return g\n"
        "x = torch.tensor([1., 2.], requires_grad=True)"
    )
    ip.run("%%grad --check -o rep\nNoisy.apply(x).sum().backward()")
    [message] = [f.message for f in ip.ns["rep"].findings if f.kind.startswith("custom")]
    assert message == (
        "`Noisy` was not checked with `gradcheck`: its forward gave different outputs on the "
        "same inputs (does it draw random numbers?), so finite differences cannot judge its "
        "backward."
    )


def test_a_forward_that_refuses_float64_is_a_sentence_not_a_traceback(ip):
    ip.run(FUNCTIONS)
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad --check -o rep\nFloat32Only.apply(x).sum().backward()")
    rep = ip.ns["rep"]
    assert [f.message for f in rep.findings if f.kind.startswith("custom")] == [
        "`Float32Only` was not checked with `gradcheck`: its forward raised on float64 inputs: "
        "AssertionError: needs float32."
    ]
    assert rep.errors == []
    assert ip.ns["x"].grad.tolist() == [1.0, 1.0]


def test_an_input_that_needs_no_grad_is_said_not_checked():
    Product = _functions()["Product"]
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch(check=True) as rec:
        Product.apply(x, torch.tensor([3.0, 4.0])).sum().backward()
    [check] = rec.report().block.custom_checks
    assert (check.status, check.reason) == (
        "not checked",
        "its tensor input 1 did not require grad, so the graph does not record its shape "
        "and gradmagic cannot make one like it",
    )


def test_no_custom_function_no_check_finding(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad --check -o rep\n(x * 3).sum().backward()")
    rep = ip.ns["rep"]
    assert rep.block.custom_checks == []
    assert not [f for f in rep.findings if f.kind.startswith("custom")]
    ip.run(FUNCTIONS)
    ip.run("%%grad -o rep2\nSquare.apply(x).sum().backward()")  # no --check: nothing checked
    assert ip.ns["rep2"].block.custom_checks is None
    assert not [f for f in ip.ns["rep2"].findings if f.kind.startswith("custom")]


# -- a script ------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import torch
    import gradmagic

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * g * x

    a = torch.tensor([2., 3.], requires_grad=True)
    b = torch.tensor([6., 4.], requires_grad=True)
    with gradmagic.watch(steps=True, check=True) as rec:
        Q = 3 * a ** 3 - Square.apply(b)
        Q.backward(gradient=torch.tensor([1., 1.]))
    print(rec.report())
    """
)


def test_watch_in_a_script_prints_steps_and_check(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    code, out, err = launch.bounded([sys.executable, str(path)], timeout=120)
    assert code == 0, err
    assert "  ℹ `Square`'s backward agrees with finite differences" in out
    assert "      b.grad = [-12., -8.] = [1., 1.] · -1 · [12., 8.]" in out
    assert "      a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]" in out
    assert (
        "    2. SquareBackward  received [-1., -1.]  local derivative: what `Square.backward` "
        "computes (your code)\n" in out
    )


# -- a real kernel -------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.slow
def test_steps_and_check_in_a_real_kernel(tmp_path):
    import html
    import re

    import nbformat

    from gradmagic import demo

    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%load_ext gradmagic"),
            nbformat.v4.new_code_cell("import torch\n" + SEED_001 + FUNCTIONS),
            nbformat.v4.new_code_cell(
                "%%grad --steps --check\nQ = 3*a**3 - Square.apply(b)\n"
                "Q.backward(gradient=torch.tensor([1., 1.]))"
            ),
        ]
    )
    demo.execute_node(nb, cwd=tmp_path)
    [page] = [
        o["data"]["text/html"] for o in nb.cells[2].outputs if o.output_type == "display_data"
    ]
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "a.grad = [36., 81.] = [1., 1.] · 1 · 3. · [12., 27.]" in text
    # Square's backward sends g·b where 2·g·b is right: b gets −b, not −2b.
    assert "b.grad = [-6., -4.] = [1., 1.] · -1 · [6., 4.]" in text
    x0 = _first_input()
    assert "Square's backward disagrees with finite differences for input 0 (b)" in text
    assert f"the backward gives {x0:.6g}, finite differences give {2 * x0:.6g}" in text
    assert "<script" not in page and "<style" not in page


def test_a_loop_shows_its_graph_once_with_the_first_runs_numbers():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch(steps=True) as rec:
        for k in range(3):
            (x * float(k + 1)).sum().backward()
    rep = rec.report()
    walked = _steps(rep)
    assert walked.repeat == 3
    assert [c.text for c in walked.chains] == [
        "x.grad = [1., 1.] = 1. · 1 · 1."
    ]  # as it was after the first
    assert "step by step (it ran 3×: the numbers of its first run)" in repr(rep)
    assert x.grad.tolist() == [6.0, 6.0]


def test_a_larger_function_is_checked_in_fast_mode_and_a_huge_one_is_not():
    Square = _functions()["Square"]  # its backward is wrong: g·x, not 2x·g
    a = torch.rand(10, 10, requires_grad=True)
    huge = torch.rand(5000, requires_grad=True)
    with gradmagic.watch(check=True) as rec:
        Square.apply(a).sum().backward()
        Square.apply(huge).sum().backward()
    rep = rec.report()
    fast, skipped = rep.block.custom_checks
    assert (fast.status, fast.fast, fast.input) == ("mismatch", True, 0)
    # Along any direction v the right backward gives twice what this one does: 2x·v vs x·v.
    assert fast.numerical == pytest.approx(2 * fast.analytical, rel=1e-6)
    messages = [f.message for f in rep.findings if f.kind.startswith("custom")]
    assert messages[0].startswith(
        "`Square`'s backward disagrees with finite differences for input 0 (`a`): along a "
        "random direction the backward gives "
    )
    assert messages[1] == (
        "`Square` was not checked with `gradcheck`: its inputs hold 5,000 elements; finite "
        "differences over more than 4,096 are too slow to run as a cell ends."
    )


def test_steps_of_an_autograd_grad_call_write_no_grad_attribute():
    a = torch.tensor([2.0, 3.0], requires_grad=True)
    with gradmagic.watch(steps=True) as rec:
        (g,) = torch.autograd.grad((a**2).sum(), a)
    walked = _steps(rec.report())
    assert [s.op for s in walked.steps] == ["SumBackward0", "PowBackward0"]
    [sent] = walked.steps[1].sent
    assert (sent.to, sent.value, sent.missing) == ("`a`", "", "returned by `torch.autograd.grad`")
    assert walked.chains == []  # nothing was written to `a.grad`
    assert "→ `a`: (returned by `torch.autograd.grad`)" in repr(rec.report())
    assert a.grad is None and g.tolist() == [4.0, 6.0]


def test_a_block_that_raises_is_still_checked_and_the_error_reaches_the_user():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="after the backward"):  # noqa: SIM117
        with gradmagic.watch(steps=True, check=True) as rec:
            _Cube.apply(x).sum().backward()
            raise ValueError("after the backward")
    rep = rec.report()
    assert [c.status for c in rep.block.custom_checks] == ["ok"]
    assert [c.text for c in _steps(rep).chains] == ["x.grad = [3., 12.] = 1. · 1 · [3., 12.]"]
    assert x.grad.tolist() == [3.0, 12.0]


@pytest.mark.parametrize(
    "make, op, words, local",
    [
        (lambda x: x.exp(), "ExpBackward0", "exp(x), the op's own output", lambda x: x.exp()),
        (lambda x: x.log(), "LogBackward0", "1/x", lambda x: 1 / x),
        (lambda x: x.abs(), "AbsBackward0", "sign(x)", lambda x: x.sign()),
        (lambda x: x.sgn(), "SgnBackward0", "0 (the sign is flat everywhere but at 0)", None),
        (lambda x: x.relu(), "ReluBackward0", "1 where the output is > 0, else 0", None),
        (lambda x: x / torch.tensor([4.0, 8.0]), "DivBackward0", "1/b", None),
        (lambda x: x**3, "PowBackward0", "3·a²", lambda x: 3 * x**2),
    ],
)
def test_each_common_op_says_its_derivative_and_sends_its_numbers(make, op, words, local):
    x = torch.tensor([0.5, 2.0], requires_grad=True)
    with gradmagic.watch(steps=True) as rec:
        make(x).sum().backward()
    assert rec.report().errors == []
    walked = _steps(rec.report())
    step = next(s for s in walked.steps if s.op == op)
    assert step.received == "[1., 1.]"  # the sum's gradient: every local factor shows as sent
    assert step.derivative == words
    [sent] = step.sent
    assert sent.to == "`x`"
    assert sent.value == flow_text((x.grad + 0).tolist())  # `+ 0`: sgn sends a zero tensor
    if local is not None:
        with torch.no_grad():
            assert torch.equal(x.grad, local(x))
    if op == "SgnBackward0":
        assert torch.equal(x.grad + 0, torch.zeros(2))
    if op == "DivBackward0":
        assert x.grad.tolist() == [0.25, 0.125]


def test_no_tensor_outlives_a_block_with_steps_and_check():
    import gc
    import weakref

    def block():
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        with gradmagic.watch({}, steps=True, check=True) as rec:
            _Cube.apply(x * 2).sum().backward()
        rec.report()._repr_html_()
        return weakref.ref(x), weakref.ref(x.grad)

    refs = block()
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_an_optional_argument_is_not_guessed_from_its_default():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k=2.0):
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch(check=True) as rec:
        Scale.apply(x, 3.0).sum().backward()
    [check] = rec.report().block.custom_checks
    assert check.status == "not checked"
    assert check.reason.startswith("its forward takes 2 arguments and the graph holds 1 tensor")
    assert x.grad.tolist() == [3.0, 3.0]


def test_a_function_with_setup_context_is_checked():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * g * x**2

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch(check=True) as rec:
        Cube.apply(x).sum().backward()
    assert [(c.function, c.status) for c in rec.report().block.custom_checks] == [("Cube", "ok")]
    assert x.grad.tolist() == [3.0, 12.0]


def test_a_warning_the_check_provokes_is_not_shown_and_not_remembered():
    import warnings

    class Picky(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            if x.dtype == torch.float64:
                warnings.warn("float64 is slow here", UserWarning, stacklevel=1)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with warnings.catch_warnings(record=True) as during:
        warnings.simplefilter("default")
        with gradmagic.watch(check=True) as rec:
            Picky.apply(x).sum().backward()
        rec.report()
        assert [str(w.message) for w in during] == []  # the check's float64 call: unseen
        Picky.apply(torch.ones(2, dtype=torch.float64))  # the user's own: shown, as without
    assert [str(w.message) for w in during] == ["float64 is slow here"]
    assert [c.status for c in rec.report().block.custom_checks] == ["ok"]
