"""Watching a cell changes nothing PyTorch computes: the corpus, run plain and under %%grad.

Each notebook in `tests/corpus/notebooks/` (training code as tutorials write it) runs in
two fresh kernels side by side: plain, and with every cell that runs a backward or a step
under `%%grad -q`. The same cells must run, print the same text, and leave every tensor
(parameters, buffers, gradients, optimizer state, RNG states) bit-identical after each of
those cells. The truth recorder those runs rely on is checked here too, against gradients
that follow from the math.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the kernel imports `tests.corpus` from the checkout, so does this
    sys.path.insert(0, str(ROOT))

from tests.corpus import harness, probe, truth  # noqa: E402

NOTEBOOKS = harness.find_notebooks()
# In both kernels: the report check runs after each target cell (None where no report).
CHECK_SETUP = (
    "from tests.corpus import check as _check, probe as _probe\n"
    "_probe.extra_checks.append(_check.truth_check)"
)


# -- plain and watched runs are identical ------------------------------------------------
@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_watching_changes_nothing(notebook: Path) -> None:
    runs = harness.run_modes(notebook, extra_setup=[CHECK_SETUP])
    plain, watched = runs["plain"], runs["watched"]
    assert plain.ok, f"the plain run failed:\n{plain.summary()}"
    missing = [c.key for c in plain.cells if c.target and c.probe is None]
    assert not missing, f"no probe line after target cells {missing}:\n{plain.summary()}"
    assert watched.setup_error is None, f"%load_ext gradmagic failed: {watched.setup_error}"
    assert watched.ok, f"the watched run failed:\n{watched.summary()}"
    assert watched.dropped_displays == 0, "%%grad -q displayed a report"
    diffs = harness.differences(plain, watched)
    assert not diffs, "watching changed the run:\n" + "\n".join(diffs)
    # Every report tells the truth: each value it shows, each finding it makes.
    checks = [c.probe["extra"].get("truth_check") for c in watched.cells if c.probe]
    assert checks and all(c is not None for c in checks), checks
    wrong = [m for c in checks for m in c.get("mismatches", [c])]
    assert not wrong, "the report said what is not so:\n" + "\n".join(wrong[:30])
    assert sum(c["checked"] for c in checks) >= len(checks), "the check compared nothing"


# -- the corpus itself --------------------------------------------------------------------
def test_the_corpus_is_offline_seeded_and_small() -> None:
    assert len(NOTEBOOKS) >= 14
    for path in NOTEBOOKS:
        assert path.stat().st_size < 1_000_000, path.name
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and "Follows" in first.source, path.name
        assert "Changed" in first.source, f"{path.name}: say what differs from the source"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "torch.manual_seed(0)" in code[0].source, path.name
        assert all(c.outputs == [] and c.execution_count is None for c in code), path.name
        text = "\n".join(c.source for c in code)
        for banned in ("download=True", "torchvision", "torch.hub", "urllib", "requests"):
            assert banned not in text, f"{path.name} uses {banned!r}"
        assert not re.search(r"^\s*!", text, re.M), f"{path.name} runs a shell command"
        assert any(harness.find_targets([c.source for c in code])), path.name


def test_target_cells_include_callers_of_training_functions() -> None:
    cells = [
        "import torch",
        "def train(model, opt):\n    loss = model().sum()\n    loss.backward()\n    opt.step()",
        "def epoch():\n    train(model, opt)",
        "for _ in range(2):\n    epoch()",
        "print(model.weight.grad)",
        "g = torch.autograd.grad(y, x)",
        "%%time\nloss.backward()",
        "model.train()",
    ]
    assert harness.find_targets(cells) == [False, True, True, True, False, True, True, False]


def test_normalised_text_keeps_what_matters() -> None:
    text = (
        "\x1b[31m<MulBackward0 object at 0x7f3a12b4c5d0>\x1b[0m\n"
        "/tmp/ipykernel_123/4567.py:3: UserWarning: careful\n"
    )
    assert harness.normalise_text(text) == (
        "<MulBackward0 object at 0x…>\n<cell>: UserWarning: careful\n"
    )


# -- the truth recorder, on cells whose gradients follow from the math -------------------
@pytest.fixture
def shell() -> Any:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.reset(new_session=False)
    truth.load_ipython_extension(ip)
    try:
        yield ip
    finally:
        truth.unload_ipython_extension(ip)


def run(ip: Any, code: str) -> Any:
    result = ip.run_cell(code, store_history=True)
    assert result.error_before_exec is None, result.error_before_exec
    return result


def events(name: str) -> list[tuple[Any, ...]]:
    """A leaf's events in the last cell, with values as lists."""
    record = truth.last_cell
    assert record is not None
    leaf = record.named(name)
    assert leaf is not None, f"no leaf named {name}: {[v.names for v in record.leaves.values()]}"
    return [
        tuple(v.tolist() if isinstance(v, torch.Tensor) else v for v in event)
        for event in leaf.events
    ]


def test_truth_of_two_backwards_in_two_runs(shell: Any) -> None:
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    cell = "(100 * x).sum().backward()"
    run(shell, cell)
    assert events("x") == [
        ("backward_before", 0, None),
        ("backward_after", 0, [100.0, 100.0]),
        ("end", [100.0, 100.0]),
    ]
    run(shell, cell)
    assert events("x") == [
        ("backward_before", 0, [100.0, 100.0]),
        ("backward_after", 0, [200.0, 200.0]),
        ("end", [200.0, 200.0]),
    ]
    [call] = truth.last_cell.calls
    assert (call.api, call.parent, call.error, call.finished) == (
        "Tensor.backward",
        None,
        None,
        True,
    )
    # Restored after the cell.
    assert torch.Tensor.backward.__module__ == "torch._tensor"
    assert not isinstance(torch.autograd.grad, truth._Api)


def test_truth_of_an_optimizer_step(shell: Any) -> None:
    run(
        shell,
        "import torch\nw = torch.nn.Parameter(torch.tensor([1., 2.]))\n"
        "opt = torch.optim.SGD([w], lr=0.1)",
    )
    run(shell, "opt.zero_grad()\n(w * w).sum().backward()\nopt.step()")
    assert events("w") == [
        ("backward_before", 0, None),
        ("backward_after", 0, [2.0, 4.0]),
        ("step", 0, [2.0, 4.0], [1.0, 2.0], [0.800000011920929, 1.600000023841858], [2.0, 4.0]),
        ("end", [2.0, 4.0]),
    ]
    assert truth.last_cell.named("w").names == ["w", "opt.param_groups[0]['params'][0]"]
    [step] = truth.last_cell.steps
    assert (step.optimizer, step.completed) == ("SGD", True)


def test_truth_of_a_reentrant_checkpoint_records_the_nested_backward(shell: Any) -> None:
    run(
        shell,
        "import torch\nfrom torch.utils.checkpoint import checkpoint\n"
        "torch.manual_seed(0)\nlin = torch.nn.Linear(2, 2)\n"
        "x = torch.tensor([[1., 3.]], requires_grad=True)",
    )
    run(shell, "checkpoint(lin, x, use_reentrant=True).sum().backward()")
    outer, inner = truth.last_cell.calls
    assert (outer.parent, inner.parent, inner.depth) == (None, 0, 1)
    assert inner.api == "torch.autograd.backward"
    weight = truth.last_cell.named("lin.weight")
    # Reached only by the nested backward, and still part of the outer one.
    assert weight.key not in outer.own_leaves and weight.key in outer.leaves
    assert events("lin.weight") == [
        ("backward_before", 0, None),
        ("backward_before", 1, None),
        ("backward_after", 1, [[1.0, 3.0], [1.0, 3.0]]),
        ("backward_after", 0, [[1.0, 3.0], [1.0, 3.0]]),
        ("end", [[1.0, 3.0], [1.0, 3.0]]),
    ]


def test_truth_of_autograd_grad_with_a_generator_and_of_gradient(shell: Any) -> None:
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    # A generator for `inputs`: reading it must not leave torch an exhausted one.
    run(shell, "g, = torch.autograd.grad((x ** 2).sum(), (t for t in [x]))")
    assert shell.user_ns["g"].tolist() == [2.0, 4.0]
    [call] = truth.last_cell.calls
    assert call.kind == "grad" and [r.tolist() for r in call.results] == [[2.0, 4.0]]
    assert events("x") == [("grad_before", 0, None), ("grad_after", 0, None), ("end", None)]
    run(shell, "(3 * x).backward(gradient=torch.tensor([1., 10.]))")
    [call] = truth.last_cell.calls
    assert [g.tolist() for g in call.gradient] == [[1.0, 10.0]]
    assert events("x")[1] == ("backward_after", 0, [3.0, 30.0])


def test_truth_survives_a_failing_cell_and_encodes_nan(shell: Any) -> None:
    run(shell, "import torch\nx = torch.tensor([0., 1.], requires_grad=True)")
    result = run(shell, "y = (x * 2).sum()\ny.backward()\ny.backward()")
    assert isinstance(result.error_in_exec, RuntimeError)
    first, second = truth.last_cell.calls
    assert first.error is None and second.error.startswith("RuntimeError: Trying to backward")
    assert torch.Tensor.backward.__module__ == "torch._tensor"
    run(shell, "x.grad = None\ntorch.log(x).sum().backward()")
    data = json.loads(json.dumps(truth.to_json(), allow_nan=False))
    [leaf] = data["leaves"]
    assert leaf["names"] == ["x"]
    assert leaf["events"][1][2]["values"] == ["inf", 1.0]
    assert leaf["events"][1][2]["nonfinite"] == 1


def test_truth_hides_its_tensors_from_profile_functions(shell: Any) -> None:
    run(shell, "import sys, torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    run(
        shell,
        "seen = []\n"
        "def watch(frame, event, arg):\n"
        "    if event == 'return' and frame.f_code.co_filename.endswith('truth.py'):\n"
        "        seen.extend(k for k, v in frame.f_locals.items() if isinstance(v, torch.Tensor))\n"
        "sys.setprofile(watch)\n"
        "(100 * x).sum().backward()\n"
        "sys.setprofile(None)",
    )
    assert shell.user_ns["seen"] == []
    assert events("x")[1] == ("backward_after", 0, [100.0, 100.0])


def test_hidden_cells_keep_the_last_record(shell: Any) -> None:
    run(shell, "import torch\nx = torch.tensor([1.], requires_grad=True)\nx.sum().backward()")
    record = truth.last_cell
    run(shell, f"{truth.HIDDEN_CELL_MARKER}\ny = 1")
    assert truth.last_cell is record
    line = probe.payload(0, 1, shell.user_ns)
    assert line["truth"]["leaves"][0]["names"] == ["x"]
    assert line["fingerprint"]["x.grad"]["shape"] == [1]
    json.dumps(line, allow_nan=False)


# -- the runner ------------------------------------------------------------------------------
def _tiny_notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("Follows nothing. Changed: nothing.")]
        + [nbformat.v4.new_code_cell(c) for c in cells]
    )
    nbformat.write(nb, path)
    return path


@pytest.mark.kernel
@pytest.mark.slow
def test_the_comparison_sees_a_change_and_nothing_else(tmp_path: Path) -> None:
    path = _tiny_notebook(
        tmp_path / "tiny.ipynb",
        "import torch\ntorch.manual_seed(0)\nw = torch.ones(2, requires_grad=True)",
        "(w * torch.rand(2)).sum().backward()\nprint(w.grad)",
    )
    # After every cell, draw a random number: what a watcher must never do.
    meddle = "get_ipython().events.register('post_run_cell', lambda _: __import__('torch').rand(1))"
    first = harness.run_notebook(path, "plain")
    again = harness.run_notebook(path, "plain")
    meddled = harness.run_notebook(path, "plain", extra_setup=[meddle])
    assert [c.key for c in first.cells] == [(1, 1), (2, 1), (2, 2)]
    assert harness.differences(first, again) == []
    diffs = harness.differences(first, meddled)
    assert any("<torch rng> differs" in d for d in diffs)
    assert any("w.grad differs" in d for d in diffs)  # the second run drew other numbers
    assert first.cells[1].probe["truth"]["leaves"][0]["names"] == ["w"]


@pytest.mark.kernel
@pytest.mark.slow
def test_a_notebook_past_its_time_limit_stops_the_run(tmp_path: Path) -> None:
    path = _tiny_notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(60)", "print('never')")
    run = harness.run_notebook(path, "plain", timeout=8)
    assert run.stopped is not None and run.stopped.startswith("timeout in cell 1 run 1")
    assert run.seconds < 40
    assert [c.key for c in run.cells] == [(1, 1)]
