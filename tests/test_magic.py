"""The magic itself: options, errors that fail the cell, load/unload, text output."""

from __future__ import annotations

import re

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import gradmagic
from gradmagic import _engine


def _engine_is_original() -> bool:
    original = _engine.original_engine()
    return (
        torch.autograd.graph._engine_run_backward is original
        and torch.autograd._engine_run_backward is original
        and not _engine.is_patched()
    )


def test_import_does_not_need_ipython():
    import subprocess
    import sys

    code = "import sys, gradmagic; print('IPython' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cell_error_fails_the_cell_and_the_report_still_shows(ip, capsys):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    result = ip.run_raw(
        "%%grad -o rep\n(100 * x).sum().backward()\nraise ValueError('boom from the cell')\n"
    )
    assert isinstance(result.error_in_exec, ValueError)
    assert str(result.error_in_exec) == "boom from the cell"
    assert not result.success
    assert _engine_is_original()
    rep = ip.ns["rep"]
    assert torch.equal(rep.table.loc["x", "after"], torch.tensor([100.0, 100.0]))
    out = capsys.readouterr()
    text = out.out + out.err
    # The report came first, the traceback once, pointing at the user's third line.
    assert text.index("gradmagic · cell run") < text.index("ValueError")
    assert text.count("ValueError: boom from the cell") == 1
    assert "----> 3 raise ValueError('boom from the cell')" in text
    assert "run_cell_magic" not in text and "magic.py" not in text
    # The next run works and sees the gradient the failed cell left.
    ip.run("%%grad -q -o rep\n(100 * x).sum().backward()\n")
    assert ip.ns["rep"].table.loc["x", "status"] == "accumulated"


def test_error_inside_backward_is_the_users_error(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("y = (x * 2).sum()\ny.backward()")
    result = ip.run_raw("%%grad -q -o rep\ny.backward()\n")
    plain = None
    try:
        ip.ns["y"].backward()
    except RuntimeError as exc:
        plain = exc
    assert type(result.error_in_exec) is type(plain) is RuntimeError
    assert str(result.error_in_exec) == str(plain)
    assert "second time" in str(plain)
    assert _engine_is_original()
    [record] = ip.ns["rep"].backwards
    assert record.error.startswith(
        "RuntimeError: Trying to backward through the graph a second time"
    )


def test_keyboard_interrupt_from_a_hook_restores_everything(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("def stop(grad):\n    raise KeyboardInterrupt\ny = x * 3\nh = y.register_hook(stop)")
    result = ip.run_raw("%%grad -q\ny.sum().backward()\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert _engine_is_original()
    ip.run("h.remove()\n")
    ip.run("%%grad -q -o rep\n(x * 3).sum().backward()\n")
    assert torch.equal(ip.ns["rep"].table.loc["x", "after"], torch.tensor([3.0, 3.0]))


def test_last_expression_and_prints_show_as_usual(ip, capsys):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad -q\nprint('hello from the cell')\n(100 * x).sum().backward()\nx.grad * 2\n")
    out = capsys.readouterr().out
    assert "hello from the cell" in out
    assert "tensor([200., 200.])" in out
    assert ip.ns["_"].tolist() == [200.0, 200.0]


def test_terminal_text_report_shows_the_same_values(ip, capsys):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    cell = "%%grad -G\n(100 * x).sum().backward()\n"
    ip.run(cell)
    first = capsys.readouterr().out
    ip.run(cell)
    second = capsys.readouterr().out
    head = next(ln for ln in first.splitlines() if ln.strip().startswith("name "))
    assert head.split() == [
        "name",
        "status",
        "runs",
        "added",
        "before",
        "after",
        "shape",
        "dtype/device",
    ]
    line = next(ln for ln in first.splitlines() if ln.strip().startswith("x "))
    assert re.split(r"\s{2,}", line.strip()) == [
        "x",
        "new",
        "1",
        "= after",
        "None",
        "[100., 100.]",
        "(2,)",
        "float32/cpu",
    ]
    line = next(ln for ln in second.splitlines() if ln.strip().startswith("x "))
    assert re.split(r"\s{2,}", line.strip()) == [
        "x",
        "ACCUMULATED",
        "2",
        "[100., 100.]",
        "[100., 100.]",
        "[200., 200.]",
        "(2,)",
        "float32/cpu",
    ]
    assert "not zeroed" in second
    assert "\x1b[" not in first + second  # captured output is no terminal: no colour codes


@pytest.mark.parametrize(
    "options, message",
    [
        ("--values -1", "--values must be at least 0, not -1."),
        ("--values abc", "--values takes a whole number, not 'abc'."),
        ("--max-nodes abc", "--max-nodes takes a whole number, not 'abc'."),
        ("--only '('", "--only '(' is not a valid regular expression"),
        ("--frobnicate", "unrecognized arguments: --frobnicate"),
        ("extra words", "%%grad takes options only"),
    ],
)
def test_bad_options_are_usage_errors_with_a_sentence(ip, options, message):
    with pytest.raises(UsageError, match=None) as info:
        ip.shell.run_cell_magic("grad", options, "pass\n")
    assert message in str(info.value)
    assert _engine_is_original()


def test_line_magic_reset_and_unknown(ip, capsys):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad -q\n(100 * x).sum().backward()\n")
    ip.run("%grad reset")
    ip.run("%%grad -q -o rep\n(100 * x).sum().backward()\n")
    # History forgotten: the stale gradient is still accumulated, its origin unknown.
    assert ip.ns["rep"].table.loc["x", "runs"] == 2
    with pytest.raises(UsageError, match="takes `reset`, `history NAME` or `why NAME`"):
        ip.shell.run_line_magic("grad", "frob")


def test_only_filters_rows(ip):
    ip.run("a = torch.ones(2, requires_grad=True)\nb = torch.ones(2, requires_grad=True)")
    ip.run("%%grad -q -o rep --only '^a$'\n(a * b).sum().backward()\n")
    assert list(ip.ns["rep"].table.index) == ["a"]


def test_no_backward_says_so(ip):
    ip.run("%%grad -q -o rep\nz = 1 + 1\n")
    rep = ip.ns["rep"]
    assert [f.kind for f in rep.findings] == ["no-backward"]
    assert "No backward ran in this cell" in repr(rep)


def test_unload_and_reload():
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext gradmagic")
    shell.run_cell("%unload_ext gradmagic")
    assert "grad" not in shell.magics_manager.magics["cell"]
    assert "grad" not in shell.magics_manager.magics["line"]
    assert _engine_is_original()
    shell.run_cell("%load_ext gradmagic")
    result = shell.run_cell("x = torch.ones(2, requires_grad=True)\n", store_history=False)
    assert result.success or "torch" not in shell.user_ns  # torch may not be imported here
    shell.run_cell("import torch\nx = torch.ones(2, requires_grad=True)")
    result = shell.run_cell("%%grad -q -o rep\n(5 * x).sum().backward()\n")
    assert result.success
    assert torch.equal(shell.user_ns["rep"].table.loc["x", "after"], torch.tensor([5.0, 5.0]))


def test_report_html_escapes_user_names():
    names = {"<img src=x onerror=alert(1)>": torch.ones(2, requires_grad=True)}
    with gradmagic.watch(names) as rec:
        (names["<img src=x onerror=alert(1)>"] * 2).sum().backward()
    html = rec.report()._repr_html_()
    assert "<img src=x" not in html
    # Shown as text, with line-break opportunities (<wbr>) between its escaped parts.
    assert "&lt;img src=<wbr>x onerror=<wbr>alert(1)&gt;" in html
