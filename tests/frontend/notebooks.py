"""The notebooks and pages the front-end tests look at.

The repository's demo notebooks, plus `frontend_cases.ipynb` written here: a
re-run cell (an `accumulated` row), a NaN gradient, a model with a long list
of long parameter names (a wide table and a gradient-flow chart) and names
that are HTML.
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat

from .measure import Expected, expected_from_html

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "demo_notebooks"
CASES = "frontend_cases"
DEMO_TIMEOUT_S = 600

# Names that are HTML. Module names cannot hold dots: that one sets a global instead.
IMG = """<img src=x onerror="document.title='pwned-img'">"""
SCRIPT = "<script>document.title='pwned-script'</script>"
MODULE = "<img src=x onerror=window['pwned']=1>"
# What must show as text: dict keys appear in names through repr(), quotes escaped.
SHOWN = ("<img src=x onerror=", "<script>document.title=", MODULE)

HOSTILE_SETUP = f"""\
IMG = {IMG!r}
SCRIPT = {SCRIPT!r}
MODULE = {MODULE!r}
weights = {{IMG: torch.ones(2, requires_grad=True), SCRIPT: torch.ones(2, requires_grad=True)}}
layers = nn.ModuleDict({{MODULE: nn.Linear(2, 1)}})"""

CASE_CELLS = [
    "%load_ext gradmagic",
    "import torch\nfrom torch import nn\n\ntorch.manual_seed(0)\n"
    "w = torch.tensor([1.0, 2.0], requires_grad=True)",
    # The same cell twice: the second run's row is `accumulated`.
    "%%grad\nloss = (3 * w).sum()\nloss.backward()",
    "%%grad\nloss = (3 * w).sum()\nloss.backward()",
    # sqrt'(-1) is NaN.
    "%%grad\nz = torch.tensor([-1.0, 4.0], requires_grad=True)\ntorch.sqrt(z).sum().backward()",
    # Twelve parameters with long names: a wide table, and 8+ leaves draw the flow chart.
    "model = nn.ModuleDict({\n"
    '    "encoder_with_a_rather_long_descriptive_name": nn.Sequential(\n'
    "        *[nn.Linear(8, 8) for _ in range(4)]),\n"
    '    "decoder_projection_head_for_the_output": nn.Sequential(\n'
    "        *[nn.Linear(8, 8) for _ in range(2)]),\n"
    "})\n"
    "batch = torch.randn(4, 8)",
    "%%grad\n"
    'hidden = model["encoder_with_a_rather_long_descriptive_name"](batch)\n'
    'model["decoder_projection_head_for_the_output"](hidden).pow(2).mean().backward()',
    HOSTILE_SETUP,
    "%%grad\nlayers[MODULE](weights[IMG] * weights[SCRIPT]).sum().backward()",
]


def cases_notebook() -> Any:
    """`frontend_cases.ipynb`, not executed."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CASE_CELLS])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def sources(workdir: Path) -> dict[str, Path]:
    """Every notebook under test, not executed, by name (demo notebooks first)."""
    out = {p.stem: p for p in sorted(DEMO_DIR.glob("*.ipynb"))}
    path = workdir / f"{CASES}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(cases_notebook(), os.fspath(path))
    out[CASES] = path
    return out


def copy_cleared(source: Path, dest: Path) -> Path:
    """The notebook without outputs or execution counts, as someone opens it to run it."""
    nb = nbformat.read(os.fspath(source), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, os.fspath(dest))
    return dest


class DemoRun:
    """`python -m gradmagic demo --out OUT ...` in the background: executed notebooks
    (nbclient, unsigned) and the nbconvert pages, one per notebook."""

    def __init__(self, notebooks: dict[str, Path], out: Path) -> None:
        self.notebooks = notebooks
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._log = (out.parent / "demo.log").open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "gradmagic", "demo", "--out", str(out)]
            + [str(p) for p in notebooks.values()],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = DEMO_TIMEOUT_S) -> DemoRun:
        if self._process.returncode is None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            finally:
                self._log.close()
        if self._process.returncode != 0:
            log = (self.out.parent / "demo.log").read_text(errors="replace")
            raise RuntimeError(f"python -m gradmagic demo failed:\n{log[-3000:]}")
        return self

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()

    def executed(self, name: str) -> Path:
        return self.out / f"{name}.ipynb"

    def page(self, name: str) -> Path:
        return self.out / f"{name}.html"


def report_htmls(path: Path) -> list[str]:
    """The HTML of every gradmagic report in an executed notebook, in order."""
    nb = nbformat.read(os.fspath(path), as_version=4)
    return [
        out["data"]["text/html"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if 'class="gradmagic"' in out.get("data", {}).get("text/html", "")
    ]


def expected_reports(path: Path) -> list[Expected]:
    return [expected_from_html(h) for h in report_htmls(path)]


def vscode_page(htmls: list[str], dest: Path) -> Path:
    """The reports as VS Code's dark theme shows an output: on #1e1e1e, text #cccccc."""
    body = "\n".join(f'<div class="output">{h}</div>' for h in htmls)
    dest.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(dest.stem)}</title><style>"
        "body { background: #1e1e1e; color: #cccccc; margin: 0; padding: 12px 20px;"
        " font-family: system-ui, 'Segoe UI', Ubuntu, sans-serif; font-size: 13px; }"
        " .output { margin: 12px 0; }"
        f"</style></head><body>{body}</body></html>\n",
        encoding="utf-8",
    )
    return dest
