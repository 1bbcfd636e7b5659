"""`python -m gradmagic run` and `GRADMAGIC=1`: unmodified scripts, watched step by step."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_mlp.py"
TIMEOUT = 180
NAMES = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]


def _run(cmd: list[str], cwd: Path, **env: str) -> tuple[int, str, str]:
    """Run `cmd`, failing the test (and killing its process group) past TIMEOUT."""
    return launch.bounded(cmd, cwd=cwd, env=launch.child_env(**env), timeout=TIMEOUT)


def _rows(page: str) -> list[tuple[str, str]]:
    """(name, status) of each row of a report's gradient table."""
    table = page[page.index('class="gradmagic-table"') :]
    table = table[: table.index("</table>")]
    statuses = re.findall(r'<tr id="[^"]+" data-status="([^"]+)"', table)
    cells = re.findall(r'<td class="gm-name"[^>]*>(.*?)</td>', table)
    names = [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in cells]
    return list(zip(names, statuses))


def _same_params(a: Path, b: Path) -> None:
    left, right = torch.load(a), torch.load(b)
    assert list(left) == list(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.slow
def test_run_writes_the_steps_asked_for_and_changes_nothing(tmp_path):
    args = ["--steps", "3", "--save"]
    code, plain_out, plain_err = _run([sys.executable, str(SCRIPT), *args, "plain.pt"], tmp_path)
    assert (code, plain_err) == (0, "")
    code, out, err = _run(
        [sys.executable, "-m", "gradmagic", "run", "--steps", "1,3", "--out", "rep", str(SCRIPT)]
        + [*args, "watched.pt"],
        tmp_path,
    )
    assert code == 0
    assert out == plain_out  # the script's own output, untouched
    assert err == (
        "gradmagic: optimizer step 1 → rep/step-1.html\n"
        "gradmagic: optimizer step 3 → rep/step-3.html\n"
    )
    assert sorted(os.listdir(tmp_path / "rep")) == ["step-1.html", "step-3.html"]
    _same_params(tmp_path / "plain.pt", tmp_path / "watched.pt")
    page = (tmp_path / "rep" / "step-3.html").read_text()
    assert _rows(page) == [(name, "new") for name in NAMES]
    assert "gradmagic · train_mlp.py · optimizer step 3 · 1 engine call (backward) · 4 leaves" in (
        page
    )
    assert "opt = SGD(lr=0.1, momentum=0.9) · 1 step" in page
    assert "<script" not in page and "<style" not in page


@pytest.mark.slow
def test_a_script_that_raises_keeps_its_traceback_and_exit_code(tmp_path):
    args = [str(SCRIPT), "--steps", "3", "--raise-at", "2"]
    code, plain_out, plain_err = _run([sys.executable, *args], tmp_path)
    assert code == 1 and plain_err.startswith("Traceback (most recent call last):\n")
    code, out, err = _run(
        [sys.executable, "-m", "gradmagic", "run", "--steps", "1,2,5", *args], tmp_path
    )
    assert (code, out) == (1, plain_out)
    ours = [line for line in err.splitlines(keepends=True) if line.startswith("gradmagic")]
    assert ours == [
        "gradmagic: optimizer step 1 → gradmagic-run/step-1.html\n",
        "gradmagic: optimizer step 2 (the script ended during it) → gradmagic-run/step-2.html\n",
        "gradmagic: optimizer step 5 not reached (the script made 1 optimizer step); "
        "nothing written for it\n",
    ]
    assert "".join(line for line in err.splitlines(keepends=True) if line not in ours) == (
        plain_err
    )
    page = (tmp_path / "gradmagic-run" / "step-2.html").read_text()
    assert "optimizer step 2 (the script ended before it returned)" in page
    assert _rows(page) == [(name, "new") for name in NAMES]


@pytest.mark.slow
def test_exit_code_and_argv_are_the_scripts(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text(
        "import sys, os\n"
        "print(os.path.basename(sys.argv[0]), sys.argv[1:], __name__, __file__)\n"
        "print(sys.path[0] == os.path.dirname(os.path.abspath(__file__)))\n"
        "sys.exit(3)\n"
    )
    plain = _run([sys.executable, "exits.py", "a", "--b"], tmp_path)
    watched = _run([sys.executable, "-m", "gradmagic", "run", "exits.py", "a", "--b"], tmp_path)
    # runpy gives sys.argv[0] the path it runs: the absolute one, like `__file__`.
    assert plain[:2] == (3, f"exits.py ['a', '--b'] __main__ {script}\nTrue\n")
    assert watched[:2] == plain[:2]
    assert (
        watched[2]
        == "gradmagic: the script ran no backward and no optimizer step; nothing written\n"
    )


@pytest.mark.slow
def test_without_an_optimizer_a_step_is_a_backward(tmp_path):
    (tmp_path / "manual.py").write_text(
        "import torch\n"
        "w = torch.tensor([1.0, 2.0], requires_grad=True)\n"
        "for k in range(3):\n"
        "    ((k + 1) * w).sum().backward()  # the gradient is k + 1 everywhere\n"
        "    with torch.no_grad():\n"
        "        w -= 0.5 * w.grad\n"
        "    w.grad = None\n"
        "print(w.tolist())\n"
    )
    plain = _run([sys.executable, "manual.py"], tmp_path)
    code, out, err = _run(
        [sys.executable, "-m", "gradmagic", "run", "--steps", "2", "manual.py"], tmp_path
    )
    assert (code, out) == (0, plain[1]) and out == "[-2.0, -1.0]\n"
    assert err == "gradmagic: backward 2 → gradmagic-run/step-2.html\n"
    page = (tmp_path / "gradmagic-run" / "step-2.html").read_text()
    assert _rows(page) == [("w", "new")]
    assert re.search(r'<td class="gm-after"[^>]*>\[2\., 2\.\]</td>', page)
    assert "gradmagic · manual.py · backward 2 · 1 engine call (backward) · 1 leaf" in page


def test_bad_input_is_a_sentence(tmp_path, monkeypatch, capsys):
    from gradmagic.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "nope.py"]) == 2
    assert capsys.readouterr().err == (
        "gradmagic run: cannot open 'nope.py': no such file. Give the path of a Python "
        "script: python -m gradmagic run train.py [ARGS...]\n"
    )
    for steps in ("0", "1,x", "", "-3"):
        with pytest.raises(SystemExit) as exit_:
            main(["run", "--steps", steps, str(SCRIPT)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].endswith(
            f"argument --steps: {steps!r} is not a list of positive whole numbers: "
            "give steps like 1 or 1,100."
        )
        assert "Traceback" not in err
    assert not (tmp_path / "gradmagic-run").exists()


def _torchrun(*args: str) -> list[str]:
    return launch.torchrun(*args)


def test_torchrun_ddp_each_rank_writes_its_own_reports(tmp_path):
    args = [str(SCRIPT), "--steps", "2", "--save"]

    def each_rank(logs: str, name: str) -> list[str]:
        # Each rank's output in its own file: two ranks writing to one pipe interleave.
        files = [next((tmp_path / logs).glob(f"**/attempt_0/{r}/{name}")) for r in (0, 1)]
        return [f.read_text() for f in files]

    logs = ["--log-dir", "plain-logs", "--redirects", "3"]
    code, _, _ = _run(_torchrun(*logs, *args, "plain.pt"), tmp_path)
    assert code == 0
    logs = ["--log-dir", "logs", "--redirects", "3"]
    code, _, _ = _run(
        _torchrun(*logs, "-m", "gradmagic", "run", "--steps", "1,2", *args, "watched.pt"),
        tmp_path,
    )
    assert code == 0
    assert each_rank("logs", "stdout.log") == each_rank("plain-logs", "stdout.log")
    assert each_rank("plain-logs", "stdout.log")[1] == (
        "rank 1 step 1 loss 1.192505\nrank 1 step 2 loss 1.167606\n"
    )
    for r, err in enumerate(each_rank("logs", "stderr.log")):
        assert [line for line in err.splitlines() if line.startswith("gradmagic")] == [
            f"gradmagic[rank {r}]: optimizer step {s} → gradmagic-run/step-{s}.rank{r}.html"
            for s in (1, 2)
        ]
    assert sorted(os.listdir(tmp_path / "gradmagic-run")) == [
        "step-1.rank0.html",
        "step-1.rank1.html",
        "step-2.rank0.html",
        "step-2.rank1.html",
    ]
    for r in (0, 1):
        _same_params(tmp_path / f"plain.pt.rank{r}", tmp_path / f"watched.pt.rank{r}")
        page = (tmp_path / "gradmagic-run" / f"step-2.rank{r}.html").read_text()
        assert _rows(page) == [(name, "new") for name in NAMES]  # as the model names them
        assert f"gradmagic · rank {r}/2 · train_mlp.py · optimizer step 2 · " in page


def _venv(tmp_path: Path) -> Path:
    """A virtual environment over this one's packages, with gradmagic's .pth installed as
    `pip install` puts it (at the top of site-packages)."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=TIMEOUT,
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    ).stdout.strip()
    shutil.copy(ROOT / "gradmagic-autorun.pth", Path(purelib) / "gradmagic-autorun.pth")
    return python


@pytest.mark.slow
def test_gradmagic_environment_variable_watches_a_plain_python_start(tmp_path):
    python = str(_venv(tmp_path))
    args = [str(SCRIPT), "--steps", "3", "--save"]
    code, plain_out, plain_err = _run([python, *args, "plain.pt"], tmp_path)
    assert (code, plain_err) == (0, "")  # the .pth does nothing without GRADMAGIC
    assert not (tmp_path / "gradmagic-run").exists()
    code, out, err = _run(
        [python, *args, "watched.pt"],
        tmp_path,
        GRADMAGIC="1",
        GRADMAGIC_STEPS="2,3",
        GRADMAGIC_OUT="o",
    )
    assert (code, out) == (0, plain_out)
    assert err == (
        "gradmagic: optimizer step 2 → o/step-2.html\ngradmagic: optimizer step 3 → o/step-3.html\n"
    )
    _same_params(tmp_path / "plain.pt", tmp_path / "watched.pt")
    assert _rows((tmp_path / "o" / "step-3.html").read_text()) == [(n, "new") for n in NAMES]
    code, out, err = _run([python, *args, "x.pt"], tmp_path, GRADMAGIC="1", GRADMAGIC_STEPS="a")
    assert (code, out) == (0, plain_out)
    assert err == (
        "gradmagic: GRADMAGIC_STEPS: 'a' is not a list of positive whole numbers: give steps "
        "like 1 or 1,100. gradmagic is off for this run.\n"
    )


def test_the_watcher_restores_everything_when_the_script_raises(tmp_path):
    from torch.optim import optimizer as optim_hooks

    from gradmagic import _engine
    from gradmagic.capture.recorder import ACTIVE
    from gradmagic.run import StepWatcher

    hooks = (
        len(optim_hooks._global_optimizer_pre_hooks),
        len(optim_hooks._global_optimizer_post_hooks),
    )
    log = tmp_path / "log.txt"
    w = torch.tensor([1.0], requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    with open(log, "w") as stream:
        watcher = StepWatcher([2, 3], tmp_path / "out", script="<b>&.py", log=stream).start()
        with pytest.raises(ZeroDivisionError):
            for k in range(5):
                opt.zero_grad()
                ((k + 1) * w).sum().backward()
                if k == 2:
                    raise ZeroDivisionError("in step 3")
                opt.step()
        assert _engine.is_patched()  # the block of step 3 is open
        watcher.stop()
    assert not _engine.is_patched() and ACTIVE == []
    assert (
        len(optim_hooks._global_optimizer_pre_hooks),
        len(optim_hooks._global_optimizer_post_hooks),
    ) == hooks
    assert len(opt._optimizer_step_post_hooks) == 0
    assert log.read_text() == (
        f"gradmagic: optimizer step 2 → {tmp_path}/out/step-2.html\n"
        f"gradmagic: optimizer step 3 (the script ended during it) → {tmp_path}/out/step-3.html\n"
    )
    page = (tmp_path / "out" / "step-3.html").read_text()
    assert _rows(page) == [("w", "new")]  # named from the test's frame, as it was left
    assert re.search(r'<td class="gm-after"[^>]*>\[3\.\]</td>', page)
    assert "<b>" not in page  # the script's name is escaped, in the title and the headline
    assert page.count("&lt;b&gt;&amp;.py · optimizer step 3") == 2


@pytest.mark.slow
def test_gradmagic_environment_variable_when_gradmagic_imports_torch_first(tmp_path):
    python = str(_venv(tmp_path))
    code, out, err = _run(
        [
            python,
            "-c",
            "import gradmagic, torch; (3 * torch.ones(2, requires_grad=True)).sum().backward()",
        ],
        tmp_path,
        GRADMAGIC="1",
    )
    assert (code, out, err) == (0, "", "gradmagic: backward 1 → gradmagic-run/step-1.html\n")
    code, _, err = _run(
        [python, "-m", "gradmagic", "run", "--steps", "2", "--out", "r", str(SCRIPT)],
        tmp_path,
        GRADMAGIC="1",
    )
    assert (code, err) == (0, "gradmagic: optimizer step 2 → r/step-2.html\n")
    assert sorted(os.listdir(tmp_path / "r")) == ["step-2.html"]
