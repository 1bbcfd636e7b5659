"""`python -m gradmagic demo`: run the demo notebooks in a real kernel, export static pages.

Each notebook in the repository's `demo_notebooks/` runs top to bottom in a
fresh `ipykernel` started with this interpreter (so it imports the same
gradmagic), and is written, executed, to the output folder together with a
static HTML page that loads nothing from the web.

Tests and `docs/make_screenshot.py` use `execute()` and `export_html()` too.
"""

from __future__ import annotations

import html
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


def _notebook_dir() -> Path:
    """The demo notebooks: installed from a wheel, the copy inside the package;
    in a checkout, `demo_notebooks/` beside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "demo_notebooks"
    return installed if installed.is_dir() else package.parent / "demo_notebooks"


NOTEBOOK_DIR = _notebook_dir()
DEFAULT_OUT = Path("gradmagic-demo")
CELL_TIMEOUT_S = 300

# nbconvert's `lab` page without the <script> tags that fetch require.js,
# MathJax and mermaid from a CDN: the pages must work offline, and the
# notebooks write their formulas in plain Unicode so they need no MathJax.
_TEMPLATE_NAME = "gradmagic_demo.html.j2"
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# Anything a browser would fetch from elsewhere.
_REMOTE = re.compile(
    r"<(?:script|img|iframe|link|source|video|audio)\b[^>]*?\b(?:src|href)\s*=\s*['\"]?(?:https?:)?//"
    r"|@import\b|url\(\s*['\"]?(?:https?:)?//",
    re.IGNORECASE,
)


class DemoError(Exception):
    """A demo notebook could not be found, run or exported; the message says which and why."""


def find_notebooks(names: Sequence[str] = ()) -> list[Path]:
    """The demo notebooks to run: all of them, or those named (a path, file name or stem).

    >>> [p.name for p in find_notebooks(["01"])]  # doctest: +SKIP
    ['01_backward_basics.ipynb']
    """
    available = sorted(NOTEBOOK_DIR.glob("*.ipynb")) if NOTEBOOK_DIR.is_dir() else []
    if not names:
        if not available:
            raise DemoError(
                f"no demo notebooks in {NOTEBOOK_DIR}: reinstall gradmagic, or pass notebook paths."
            )
        return available
    found = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.is_file():
            found.append(path.resolve())
            continue
        matches = [p for p in available if p.name == name or p.stem == name]
        matches = matches or [p for p in available if p.stem.startswith(name)]
        if len(matches) != 1:
            known = ", ".join(p.stem for p in available) or f"none in {NOTEBOOK_DIR}"
            what = "matches several" if matches else "matches no"
            raise DemoError(f"{name!r} {what} demo notebook; known: {known}.")
        found.append(matches[0])
    return found


def _this_interpreter_spec() -> Any:
    from jupyter_client.kernelspec import KernelSpec

    return KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name=f"Python {sys.version_info[0]} (ipykernel)",
        language="python",
    )


def _kernel_manager_class() -> type:
    """A kernel manager whose `python3` is an ipykernel running *this* interpreter.

    A `python3` kernel spec installed on the machine may point at another
    Python, one without gradmagic; the spec is built here instead.
    """
    from jupyter_client.manager import AsyncKernelManager

    spec = _this_interpreter_spec()

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> Any:
            return spec

    return ThisInterpreterKernelManager


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    # The kernel imports the gradmagic this runner was imported from.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # A non-interactive backend set for the runner would keep plots out of the outputs.
    env.pop("MPLBACKEND", None)
    return env


def execute(path: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> Any:
    """Run a notebook top to bottom in a fresh kernel; return the executed notebook.

    Raises nbclient's `CellExecutionError` at the first cell that raises. Use
    `execute_node` to keep the notebook, filled up to that cell.
    """
    import nbformat

    nb = nbformat.read(os.fspath(path), as_version=4)
    execute_node(nb, cwd=cwd or Path(path).parent)
    return nb


def execute_node(nb: Any, cwd: str | os.PathLike[str], failed: list[int] | None = None) -> Any:
    """Execute a `nbformat` notebook in place in a fresh kernel (see `execute`).

    The index of a cell that raised is appended to `failed`.
    """
    import subprocess

    from nbclient import NotebookClient

    def on_cell_error(cell: Any, cell_index: int, execute_reply: Any) -> None:
        if failed is not None:
            failed.append(cell_index)

    client = NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=_kernel_manager_class(),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": os.fspath(cwd)}},
        on_cell_error=on_cell_error,
    )
    # The kernel process's own stderr holds only its start-up chatter; what the
    # cells print reaches the notebook through the kernel protocol.
    client.execute(env=_kernel_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return nb


def export_html(nb: Any) -> str:
    """A static HTML page of an executed notebook that fetches nothing from the web."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({_TEMPLATE_NAME: _TEMPLATE})],
        template_file=_TEMPLATE_NAME,
        embed_images=True,
    )
    page, _ = exporter.from_notebook_node(nb)
    remote = _REMOTE.search(page)
    if remote:
        raise DemoError(
            f"the exported page would load {remote.group(0)!r}... from the web; "
            f"nbconvert's template changed: update gradmagic/demo.py's _TEMPLATE."
        )
    return page


@dataclass
class Outcome:
    """How one notebook went."""

    notebook: Path
    seconds: float
    html: Path | None
    error: str | None = None


def _one_line(exc: BaseException, failed: list[int]) -> str:
    """`cell 5: ValueError: boom`: which cell, and what it raised."""
    ename = getattr(exc, "ename", None)
    if ename:
        what = f"{ename}: {getattr(exc, 'evalue', '')}".strip()
    else:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        what = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    where = f"cell {failed[0] + 1}: " if failed else ""
    return where + " ".join(what.split())


def run_one(path: Path, out: Path) -> Outcome:
    """Execute one notebook and write it and its page into `out`, also when it fails."""
    import nbformat

    nb = nbformat.read(os.fspath(path), as_version=4)
    start = time.perf_counter()
    error = None
    failed: list[int] = []
    try:
        execute_node(nb, cwd=out, failed=failed)
    except Exception as exc:  # noqa: BLE001 - reported in one line, the notebook is kept
        error = _one_line(exc, failed)
    seconds = time.perf_counter() - start
    nbformat.write(nb, os.fspath(out / path.name))
    page = out / f"{path.stem}.html"
    try:
        page.write_text(export_html(nb), encoding="utf-8")
    except DemoError as exc:
        error = error or str(exc)
        page = None
    return Outcome(path, seconds, page, error)


def _index(outcomes: list[Outcome]) -> str:
    items = "".join(
        f'<li><a href="{html.escape(o.html.name)}">{html.escape(o.notebook.stem)}</a>'
        + (f" (failed: {html.escape(o.error)})" if o.error else "")
        + "</li>"
        for o in outcomes
        if o.html is not None
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>gradmagic demo</title></head>'
        '<body style="font-family: sans-serif; margin: 2em;"><h1>gradmagic demo notebooks</h1>'
        f"<ul>{items}</ul></body></html>\n"
    )


def run_demo(
    out: str | os.PathLike[str] = DEFAULT_OUT,
    names: Sequence[str] = (),
    stream: TextIO | None = None,
) -> int:
    """Run the demo notebooks into `out`; print one line per notebook. Returns an exit status."""
    stream = stream or sys.stdout
    try:
        notebooks = find_notebooks(names)
    except DemoError as exc:
        print(f"gradmagic demo: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(len(p.name) for p in notebooks)
    outcomes = []
    for i, path in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {path.name:<{width}} ", end="", file=stream, flush=True)
        outcome = run_one(path, out_dir)
        outcomes.append(outcome)
        verdict = "FAILED" if outcome.error else "ok"
        print(f"{verdict:<6} {outcome.seconds:5.1f} s", file=stream, flush=True)
    (out_dir / "index.html").write_text(_index(outcomes), encoding="utf-8")
    failed = [o for o in outcomes if o.error]
    if failed:
        for o in failed:
            print(
                f"gradmagic demo: {o.notebook.name} failed at {o.error} "
                f"(executed notebook: {out_dir / o.notebook.name})",
                file=sys.stderr,
            )
        return 1
    print(f"Pages written to {out_dir.resolve()}/ (open index.html).", file=stream)
    return 0
