"""Observe without touching: each way gradmagic once changed what PyTorch did, reproduced.

Each test runs the same code plainly and under `watch()` (with the report built,
as `%%grad` does) and asserts that PyTorch saw exactly the same: unpack hooks,
recomputations, hook inputs, warnings, the ops a user's dispatch mode sees.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import gradmagic


def both(fn: Callable[[], Any]) -> tuple[Any, Any, Any]:
    """`fn()` plainly, then under `watch()` with its report built: both results and the report.

    The namespace holds `fn`, a function of the user's: every probe is on, the naming
    hook among them.
    """
    plain = fn()
    with gradmagic.watch({"fn": fn}) as rec:
        watched = fn()
    report = rec.report()
    str(report), report._repr_html_()
    assert rec.internal_errors == [], rec.internal_errors
    return plain, watched, report


# --- 1. saved tensors are never unpacked --------------------------------------------------------


def test_unpack_hooks_run_as_often_as_without_watching():
    def run() -> int:
        unpacked = []
        x = torch.randn(5, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: unpacked.append(1) or t
        ):
            y = (x.exp() * x).sin().sum()
        y.backward()
        return len(unpacked)

    plain, watched, _ = both(run)
    assert plain == watched == 4  # exp's result, mul's two inputs, sin's input: once each


def test_checkpointing_recomputes_the_forward_once():
    def run() -> tuple[int, list[float]]:
        calls = []
        torch.manual_seed(0)
        w = torch.randn(4, 4, requires_grad=True)

        def segment(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return torch.nn.functional.dropout(x @ w, 0.5).tanh()

        out = checkpoint(segment, torch.randn(3, 4), use_reentrant=False)
        out.sum().backward()
        return len(calls), w.grad.flatten().tolist()

    (plain_calls, plain_grad), (calls, grad), _ = both(run)
    # The forward, and one recomputation in the backward: not a third for gradmagic
    # (which would also draw the dropout mask again).
    assert plain_calls == calls == 2
    assert grad == plain_grad


def test_a_function_that_clears_its_saved_tensors_on_access_still_works():
    class Square(torch.autograd.Function):
        clear_saved_tensors_on_access = True

        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 2 * x * g

    def run() -> list[float]:
        x = torch.tensor([1.0, 3.0], requires_grad=True)
        Square.apply(x).sum().backward()
        return x.grad.tolist()

    plain, watched, report = both(run)
    assert plain == watched == [2.0, 6.0]
    [graph] = report.graphs
    saved = [dict(n.saved) for n in graph.snapshot.nodes if n.op == "SquareBackward"]
    assert saved == [{"saved": "1 tensor"}]  # counted, never read


# --- 2. no hook changes what another hook receives ---------------------------------------------


def test_a_post_hook_registered_during_the_backward_receives_no_inputs():
    def run() -> list[bool]:
        received = []

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            received.append(all(g is None for g in grad_outputs))

        def unpack(t: torch.Tensor) -> torch.Tensor:
            torch._C._current_autograd_node().register_hook(hook)
            return t

        a = torch.rand(3, 3, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            var, mean = torch.var_mean(a, dim=0)
            loss = (var + mean).sum()
        loss.backward()
        return received

    plain, watched, _ = both(run)
    # The engine hands a node's inputs to post-hooks only if it had some when it started.
    assert plain == watched == [True]


# --- 3. the naming hook touches nothing that can raise or wrap nodes ------------------------------


def test_a_view_modified_in_place_under_no_grad_is_left_alone():
    def run() -> str:
        a = torch.ones(1, requires_grad=True)

        def helper() -> str:
            with torch.no_grad():
                b = a[:]
                b *= 2
            return repr(b)  # the frame returns holding `b`: its grad_fn cannot be read

        return helper()

    plain, watched, _ = both(run)
    assert plain == watched == "tensor([2.], grad_fn=<Invalid>)"


@pytest.mark.slow
def test_freeing_a_deep_graph_built_in_a_helper_does_not_crash():
    code = textwrap.dedent(
        """
        import torch, gradmagic

        def scope():
            y = torch.randn(1, requires_grad=True).clone()
            prev = [None, None]
            for _ in range(60_000):
                older = [t for t in prev[:-1] if t is not None]  # a frame per item
                prev.append(y)
                prev.pop(0)
                y = y + y * 1e-6
                if older:
                    y = y + older[0].sum() * 0
        with gradmagic.watch({"scope": scope}):
            scope()
        print("freed")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "freed"


# --- 4. gradmagic's tensor work is out of the user's dispatch modes -----------------------------


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_same_ops_with_and_without_watching():
    def run() -> list[str]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(4, 3)
        with OpLog() as log:
            loss = model(x).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad(set_to_none=False)
        return log.ops

    plain, watched, _ = both(run)
    assert watched == plain


def test_showing_a_report_inside_a_dispatch_mode_runs_no_op_there():
    # Large exact copies are summarised when the report is shown: never in the user's mode.
    w = torch.ones(300, requires_grad=True)
    with gradmagic.watch({"w": w}, copies=True) as rec:
        (w * 2).sum().backward()
    report = rec.report()
    with OpLog() as log:
        text, html = repr(report), report._repr_html_()
    assert log.ops == []
    assert "‖g‖=34.64" in text and "‖g‖=34.64" in html  # ‖2·1‖ over 300 elements = 2√300


# --- 5. no warning gradmagic's reads would cause -------------------------------------------------


def test_backward_into_a_non_leaf_input_warns_as_without_watching():
    def run() -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            x = torch.randn(3, requires_grad=True)
            y = x * 2
            (y * y).sum().backward(inputs=[y])
            z = x * 3
            torch.autograd.grad((z * z).sum(), [z])
        return [str(w.message)[:60] for w in seen]

    plain, watched, _ = both(run)
    assert watched == plain == []


# --- reports on tensors whose values cannot be read ----------------------------------------------


class Wrapper(torch.Tensor):
    """A wrapper subclass: it dispatches in Python, and has no `tolist()` of its own."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> Wrapper:
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, requires_grad=inner.requires_grad
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(t: Any) -> Any:
            return t.inner if isinstance(t, Wrapper) else t

        def wrap(t: Any) -> Any:
            return Wrapper(t) if isinstance(t, torch.Tensor) else t

        out = func(*torch.utils._pytree.tree_map(unwrap, args), **(kwargs or {}))
        return torch.utils._pytree.tree_map(wrap, out)

    def __repr__(self) -> str:
        return f"Wrapper({self.inner!r})"


def test_gradients_of_a_wrapper_subclass_are_reported_without_reading_them():
    def run() -> list[float]:
        w = Wrapper(torch.tensor([1.0, 2.0])).requires_grad_()
        (w * 3).sum().backward()
        return w.grad.inner.tolist()

    plain, watched, report = both(run)
    assert plain == watched == [3.0, 3.0]
    [row] = report.rows
    assert str(row.after) == "n=2 no values (Wrapper: values not read)"
    assert row.status == "new"


def test_meta_gradients_show_no_values_and_no_nan():
    w = torch.empty(3, 4, device="meta", requires_grad=True)
    with gradmagic.watch({"w": w}) as rec:
        (w * 2).sum().backward()
    report = rec.report()
    assert report.table.loc["w", "status"] == "new"
    assert str(report["w"].after) == "n=12 no values (meta)"
    assert [f.kind for f in report.findings] == []


def test_a_profiler_records_the_same_ops_with_and_without_watching():
    def run() -> list[str]:
        x = torch.randn(10, 10, requires_grad=True)
        y = torch.randn(10, 10, requires_grad=True)
        with torch.autograd.profiler.profile() as prof:
            (x + y).sum().backward()
        return [e.name for e in prof.function_events]

    plain, watched, _ = both(run)
    assert watched == plain


def test_a_batched_grad_call_is_left_alone_and_said_so():
    def run() -> list[float]:
        x = torch.randn(3, requires_grad=True)
        (jacobian,) = torch.autograd.grad(x * 2, x, torch.eye(3), is_grads_batched=True)
        return jacobian.flatten().tolist()

    plain, watched, report = both(run)
    assert plain == watched == torch.eye(3).mul(2).flatten().tolist()
    [finding] = report.findings
    assert finding.kind == "not-observed"
    assert finding.message.startswith(
        "1 call into the autograd engine made by a batched `torch.autograd.grad` "
        "(`is_grads_batched=True`) was not observed"
    )


class Tagged(torch.Tensor):
    """A subclass with a __torch_function__ of its own that logs every call it sees."""

    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_subclass_with_its_own_torch_function_sees_the_same_calls():
    def run() -> list[str]:
        Tagged.seen = []
        w = torch.nn.Parameter(torch.tensor([1.0, 2.0])).as_subclass(Tagged)
        w.requires_grad_()
        (w * 3).sum().backward()
        return list(Tagged.seen)

    plain, watched, report = both(run)
    assert watched == plain
    assert torch.equal(report.rows[0].after, torch.tensor([3.0, 3.0]))
