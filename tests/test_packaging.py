"""The wheel: built from the sources, installed (not editable) into a fresh venv.

From there `%load_ext gradmagic` and `python -m gradmagic demo` must work, also
when started in a folder that holds a clone named `gradmagic` (which Python
would otherwise import as an empty namespace package).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "gradmagic-autorun.pth",
    "README.md",
    "gradmagic",
    "demo_notebooks",
)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")

CELL_SCRIPT = r"""
import json, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_cell("%colors NoColor")
result = shell.run_cell("%load_ext gradmagic")
assert result.success, result.error_in_exec
shell.run_cell("import torch\nw = torch.tensor([1.0, 2.0], requires_grad=True)")
result = shell.run_cell("%%grad -o rep\n(3 * w * w).sum().backward()")
assert result.success, result.error_in_exec
import gradmagic
rep = shell.user_ns["rep"]
print(json.dumps({
    "file": gradmagic.__file__,
    "grad": shell.user_ns["w"].grad.tolist(),
    "rows": [(r.name, r.status) for r in rep.rows],
    "html": "gradmagic-graph" in rep._repr_html_(),
}))
"""


def _run(
    args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the venv's python, a working folder holding a clone named `gradmagic`)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            shutil.copy(path, src / name)
    dist = tmp / "dist"
    # No build isolation: the build backend is already installed, nothing is downloaded.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=tmp,
    )
    [wheel] = dist.glob("gradmagic-*.whl")
    # torch, IPython and the rest come from this interpreter's packages; gradmagic from the wheel.
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp
    )
    work = tmp / "work"
    shutil.copytree(src, work / "gradmagic", ignore=IGNORE)  # a clone, named like the package
    return python, work


def test_the_wheel_holds_the_package_and_the_demo_notebooks(installed):
    python, work = installed
    [wheel] = (work.parent / "dist").glob("gradmagic-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        f"gradmagic/{p.relative_to(ROOT / 'gradmagic').as_posix()}"
        for p in (ROOT / "gradmagic").rglob("*.py")
    }
    assert modules <= names, sorted(modules - names)
    notebooks = {
        f"gradmagic/demo_notebooks/{p.name}" for p in (ROOT / "demo_notebooks").glob("*.ipynb")
    }
    assert notebooks and notebooks <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    assert "gradmagic-autorun.pth" in names  # at the top: installed into site-packages


def test_gradmagic_env_watches_a_script_with_the_installed_wheel(installed):
    python, work = installed
    script = "import torch\nw = torch.ones(2, requires_grad=True)\n(3 * w).sum().backward()\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADMAGIC")}
    assert _run([str(python), "-c", script], cwd=work, env=env).stderr == ""
    out = work.parent / "autorun"
    env.update(GRADMAGIC="1", GRADMAGIC_OUT=str(out))
    result = _run([str(python), "-c", script], cwd=work, env=env)
    assert result.stderr == f"gradmagic: backward 1 → {out}/step-1.html\n"
    assert "gradmagic · -c · backward 1 · 1 engine call (backward) · 1 leaf" in (
        (out / "step-1.html").read_text()
    )


def test_load_ext_works_from_the_installed_wheel_beside_a_clone(installed):
    python, work = installed
    out = _run([str(python), "-c", CELL_SCRIPT], cwd=work, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    venv = python.parent.parent
    assert Path(result["file"]).is_relative_to(venv), result["file"]
    assert result["grad"] == [6.0, 12.0]  # d/dw sum(3 w^2) = 6 w
    assert result["rows"] == [["w", "new"]]
    assert result["html"] is True


def test_the_demo_runs_from_the_installed_wheel(installed):
    python, work = installed
    out = work / "pages"
    # nbconvert's templates belong to the nbconvert the venv borrows from this
    # interpreter: they lie under its prefix, which a venv's Jupyter paths leave out.
    env = {**os.environ, "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter")}
    args = [str(python), "-m", "gradmagic", "demo", "--out", str(out), "01"]
    result = _run(args, cwd=work, env=env)
    assert (out / "01_backward_basics.html").stat().st_size > 10_000
    assert (out / "01_backward_basics.ipynb").is_file()
    assert f"Pages written to {out.resolve()}/" in result.stdout
