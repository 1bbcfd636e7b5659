"""Run a corpus notebook in a fresh Jupyter kernel, plain or watched by gradmagic.

    plain    the truth recorder (`tests.corpus.truth`) is loaded, then every code cell
             runs in order; a target cell (one that calls backward, autograd.grad,
             gradcheck or a step, or a function of the notebook that does: see
             `find_targets`) runs twice in a row.
    watched  the same, with `%load_ext gradmagic` first and every target cell
             prefixed with `%%grad -q -o _gm_rep` (the report lands in the
             namespace as `_gm_rep`; nothing is displayed).

After each run of a target cell a hidden cell (`probe.hidden_cell`) prints one
JSON line: the truth recorder's record of the cell, a fingerprint of every
tensor in the namespace, and what `probe.extra_checks` return.

From Python: `run_notebook(path, mode)` -> `NotebookRun`; `run_modes(path)` runs
both modes side by side -> {mode: NotebookRun}. From a shell:

    python -m tests.corpus.harness NOTEBOOK --mode plain|watched
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import probe

CORPUS_DIR = Path(__file__).resolve().parent
NOTEBOOK_DIR = CORPUS_DIR / "notebooks"
REPO_ROOT = CORPUS_DIR.parent.parent
MODES = ("plain", "watched")
GRAD_LINE = "%%grad -q -o _gm_rep"
NOTEBOOK_TIMEOUT_S = 150.0
ALLOWED_TAG = "raises-exception"

TARGET = re.compile(
    r"\.backward\(|autograd\.grad\(|torch\.autograd\.backward\(|gradcheck\(|\.step\("
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
# "/tmp/ipykernel_123/456.py:7: UserWarning: ..." and gradmagic's own cell file names:
# where a warning points differs between the modes (the %%grad line), what it says must not.
_WARNING_AT = re.compile(r"^(?P<file>\S.*?):(?P<line>\d+): (?P<kind>\w*(Warning|Error)\b)", re.M)
_CELL_FILE = re.compile(r"/tmp/ipykernel_\d+/\d+\.py|<ipython-input-[^>]*>")


def find_notebooks() -> list[Path]:
    """Every corpus notebook, by name."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def is_target(source: str) -> bool:
    """Whether a cell's code calls backward, autograd.grad, gradcheck or a step."""
    return bool(TARGET.search(source))


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except SyntaxError:  # IPython syntax (magics, `!`): the text is all there is
        return None


def find_targets(sources: Sequence[str]) -> list[bool]:
    """Which cells are targets: those whose code calls backward, autograd.grad, gradcheck
    or a step, and those that call a function (`name(...)`) or a method (`obj.name(...)`)
    defined in the notebook that does, directly or through other such functions: a
    tutorial's `train_loop(...)` cell runs backward as surely as the cell defining it."""
    trees = [_parse(s) for s in sources]
    defined: dict[tuple[str, str], list[str]] = {}  # ("function"|"method", name) -> code
    for source, tree in zip(sources, trees):
        for node in tree.body if tree is not None else []:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                code = ast.get_source_segment(source, node) or ""
                defined.setdefault(("function", node.name), []).append(code)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        code = ast.get_source_segment(source, item) or ""
                        defined.setdefault(("method", item.name), []).append(code)
    running = {key for key, codes in defined.items() if any(map(is_target, codes))}
    while True:
        more = {
            key
            for key, codes in defined.items()
            if key not in running and any(running & _called(_parse(c)) for c in codes)
        }
        if not more:
            break
        running |= more
    return [is_target(s) or bool(running & _called(t)) for s, t in zip(sources, trees)]


def _called(tree: ast.AST | None) -> set[tuple[str, str]]:
    """What the code calls: ("function", name) for `name(...)`, ("method", name) for
    `obj.name(...)`."""
    calls: set[tuple[str, str]] = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                calls.add(("function", node.func.id))
            elif isinstance(node.func, ast.Attribute):
                calls.add(("method", node.func.attr))
    return calls


def normalise_text(text: str) -> str:
    """Text as the two modes can be compared: no colours, addresses or cell file names."""
    text = _ANSI.sub("", text)
    text = _ADDRESS.sub("0x…", text)
    text = _WARNING_AT.sub(lambda m: f"<{_where(m['file'])}>: {m['kind']}", text)
    return _CELL_FILE.sub("<cell>", text)


def _where(filename: str) -> str:
    return "cell" if _CELL_FILE.fullmatch(filename) or filename.startswith("<") else filename


@dataclass
class ExecutedCell:
    """One execution of one notebook cell."""

    index: int  # position among the notebook's cells
    repeat: int  # 1, or 2 for the second run of a target cell
    target: bool
    source: str  # the cell's code as written in the notebook
    outputs: list[tuple[str, str]]  # (kind, normalised text): stdout, stderr, result, display
    error: str | None  # "Name: message" when the cell raised
    allowed_error: bool  # the cell carries the `raises-exception` tag
    probe: dict[str, Any] | None = None  # the hidden cell's JSON line (target cells)
    probe_error: str | None = None
    seconds: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return self.index, self.repeat


@dataclass
class NotebookRun:
    """A notebook run in one mode: every executed cell, in order."""

    notebook: Path
    mode: str
    cells: list[ExecutedCell] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why the run ended before the last cell
    setup_error: str | None = None
    dropped_displays: int = 0  # gradmagic reports displayed despite -q

    @property
    def ok(self) -> bool:
        return self.stopped is None and self.setup_error is None

    def probes(self) -> list[dict[str, Any]]:
        return [c.probe for c in self.cells if c.probe is not None]

    def summary(self) -> str:
        lines = [f"{self.notebook.name} [{self.mode}] {self.seconds:.1f} s"]
        if self.setup_error:
            lines.append(f"  setup failed: {self.setup_error}")
        for c in self.cells:
            mark = "T" if c.target else " "
            head = f"  [{c.index:2d}.{c.repeat}] {mark} {c.seconds:5.2f} s"
            if c.error:
                head += f"  {'(allowed) ' if c.allowed_error else ''}raised {c.error[:100]}"
            if c.probe is not None:
                truth = c.probe.get("truth") or {}
                head += (
                    f"  calls={len(truth.get('calls', []))} steps={len(truth.get('steps', []))}"
                    f" leaves={len(truth.get('leaves', []))}"
                    f" tensors={len(c.probe.get('fingerprint', {}))}"
                )
            if c.probe_error:
                head += f"  probe failed: {c.probe_error[:100]}"
            lines.append(head)
        if self.dropped_displays:
            lines.append(f"  gradmagic displays dropped: {self.dropped_displays}")
        if self.stopped:
            lines.append(f"  stopped: {self.stopped}")
        return "\n".join(lines)


# --- the kernel ----------------------------------------------------------------------------


def _kernel_manager_class() -> type:
    """A kernel manager whose kernel is an ipykernel of this very interpreter."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    spec = KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python 3 (ipykernel)",
        language="python",
    )

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> Any:
            return spec

    return ThisInterpreterKernelManager


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    # The kernel imports this checkout's gradmagic and tests.corpus.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    # One thread per kernel: the two modes run side by side on few cores, and
    # the same thread count in both keeps float reductions in the same order.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONHASHSEED"] = "0"  # the same order when code iterates over a set of strings
    env["MPLBACKEND"] = "agg"
    env.pop("PYTHONSTARTUP", None)
    return env


def setup_cells(mode: str, extra_setup: Sequence[str] = ()) -> list[str]:
    """The hidden cells run before the notebook's first cell."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    cells = [
        f"{probe.HIDDEN_CELL_MARKER}\n%load_ext tests.corpus.truth\n"
        "assert __import__('tests.corpus.probe')\n"
        # Python's and numpy's generators are seeded from the OS at start-up: seeded here,
        # the two modes start equal, as torch's do after the notebook's manual_seed.
        "__import__('random').seed(0)\n"
        "__import__('numpy').random.seed(0)"
    ]
    if mode == "watched":
        cells.append(f"{probe.HIDDEN_CELL_MARKER}\n%load_ext gradmagic")
    cells.extend(f"{probe.HIDDEN_CELL_MARKER}\n{code}" for code in extra_setup)
    return cells


def _outputs(cell: Any) -> tuple[list[tuple[str, str]], str | None, int]:
    """(kind, text) of a cell's outputs with consecutive streams merged; the error; and
    how many gradmagic reports it displayed."""
    items: list[tuple[str, str]] = []
    error, dropped = None, 0
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            name = out.get("name", "stdout")
            if items and items[-1][0] == name:
                items[-1] = (name, items[-1][1] + out.get("text", ""))
            else:
                items.append((name, out.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            html = data.get("text/html", "")
            if 'class="gradmagic' in html:
                dropped += 1
                continue
            if "text/plain" in data:
                items.append(
                    ("result" if kind == "execute_result" else "display", data["text/plain"])
                )
        elif kind == "error":
            error = f"{out.get('ename', '')}: {out.get('evalue', '')}"
    items = [(k, normalise_text(t)) for k, t in items]
    return items, (normalise_text(error) if error else None), dropped


def _probe_line(cell: Any) -> tuple[dict[str, Any] | None, str | None]:
    text = "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == "stdout"
    )
    for line in text.splitlines():
        if line.startswith(probe.LINE_PREFIX):
            return json.loads(line[len(probe.LINE_PREFIX) :]), None
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        return None, f"{errors[0].get('ename')}: {errors[0].get('evalue')}"
    return None, "no probe line in the hidden cell's output"


async def run_notebook_async(
    path: str | os.PathLike[str],
    mode: str,
    timeout: float = NOTEBOOK_TIMEOUT_S,
    extra_setup: Sequence[str] = (),
) -> NotebookRun:
    """Run one notebook in one mode in a fresh kernel (see the module docstring)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    nb = nbformat.read(os.fspath(path), as_version=4)
    run = NotebookRun(path, mode)
    start = time.monotonic()
    deadline = start + timeout
    workdir = tempfile.TemporaryDirectory(prefix="gradmagic-corpus-")
    # nbclient writes each executed cell back into its notebook at the index given: it gets
    # a scratch notebook of one cell, so the notebook read here stays as written.
    scratch = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("")])
    client = NotebookClient(
        scratch,
        kernel_manager_class=_kernel_manager_class(),
        timeout=int(timeout),
        startup_timeout=60,
        resources={"metadata": {"path": workdir.name}},
        allow_errors=False,
    )

    async def execute(cell: Any, store_history: bool) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CellTimeoutError(f"the notebook ran past its {timeout:.0f} s limit")
        client.timeout = max(1, int(remaining))
        scratch.cells[0] = cell
        return await client.async_execute_cell(cell, 0, store_history=store_history)

    try:
        async with client.async_setup_kernel(
            env=kernel_env(), cwd=workdir.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ):
            for code in setup_cells(mode, extra_setup):
                hidden = nbformat.v4.new_code_cell(code)
                try:
                    await execute(hidden, store_history=False)
                except CellExecutionError as exc:
                    run.setup_error = f"{exc.ename}: {exc.evalue}"
                    return run
            code_cells = [
                (i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()
            ]
            targets = find_targets([c.source for _, c in code_cells])
            for (index, original), target in zip(code_cells, targets):
                tags = original.get("metadata", {}).get("tags", [])
                for repeat in (1, 2) if target else (1,):
                    source = original.source
                    if target and mode == "watched":
                        source = f"{GRAD_LINE}\n{source}"
                    cell = nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)})
                    began = time.monotonic()
                    stop = None
                    try:
                        await execute(cell, store_history=True)
                    except CellExecutionError as exc:
                        stop = f"cell {index} run {repeat} raised {exc.ename}: {exc.evalue}"
                    except CellTimeoutError as exc:
                        stop = f"timeout in cell {index} run {repeat}: {_first_line(exc)}"
                    except DeadKernelError as exc:
                        stop = f"the kernel died in cell {index} run {repeat}: {_first_line(exc)}"
                    outputs, error, dropped = _outputs(cell)
                    run.dropped_displays += dropped
                    done = ExecutedCell(
                        index,
                        repeat,
                        target,
                        original.source,
                        outputs,
                        error,
                        ALLOWED_TAG in tags,
                        seconds=time.monotonic() - began,
                    )
                    run.cells.append(done)
                    if stop is not None:
                        run.stopped = normalise_text(stop)
                        return run
                    if target:
                        hidden = nbformat.v4.new_code_cell(probe.hidden_cell(index, repeat))
                        try:
                            await execute(hidden, store_history=False)
                            done.probe, done.probe_error = _probe_line(hidden)
                        except CellExecutionError as exc:
                            done.probe_error = f"{exc.ename}: {exc.evalue}"
    except CellTimeoutError as exc:  # in a hidden cell
        run.stopped = f"timeout: {_first_line(exc)}"
    except DeadKernelError as exc:
        run.stopped = f"the kernel died: {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a kernel that did not start: recorded, not hung
        run.stopped = f"{type(exc).__name__}: {_first_line(exc)}"
    finally:
        run.seconds = time.monotonic() - start
        workdir.cleanup()
    return run


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_notebook(
    path: str | os.PathLike[str],
    mode: str,
    timeout: float = NOTEBOOK_TIMEOUT_S,
    extra_setup: Sequence[str] = (),
) -> NotebookRun:
    """Run one notebook in one mode in a fresh kernel; see `run_notebook_async`."""
    return asyncio.run(run_notebook_async(path, mode, timeout, extra_setup))


def run_modes(
    path: str | os.PathLike[str],
    modes: Sequence[str] = MODES,
    parallel: bool = True,
    timeout: float = NOTEBOOK_TIMEOUT_S,
    extra_setup: Sequence[str] = (),
) -> dict[str, NotebookRun]:
    """Run a notebook in several modes, each in its own kernel; side by side if `parallel`."""

    async def both() -> list[NotebookRun]:
        if parallel:
            return list(
                await asyncio.gather(
                    *(run_notebook_async(path, m, timeout, extra_setup) for m in modes)
                )
            )
        return [await run_notebook_async(path, m, timeout, extra_setup) for m in modes]

    return {run.mode: run for run in asyncio.run(both())}


# --- comparing two runs -----------------------------------------------------------------------


def differences(plain: NotebookRun, watched: NotebookRun, limit: int = 20) -> list[str]:
    """What differs between two runs of a notebook: cells run, outputs, errors, and the
    fingerprint of every tensor after every target cell. Empty when they are identical."""
    out: list[str] = []
    keys_p = [c.key for c in plain.cells]
    keys_w = [c.key for c in watched.cells]
    if keys_p != keys_w:
        out.append(f"cells run differ: plain {keys_p} vs watched {keys_w}")
    for p, w in zip(plain.cells, watched.cells):
        where = f"cell {p.index} run {p.repeat}"
        if p.key != w.key:
            break
        if p.outputs != w.outputs:
            out.append(
                f"{where}: outputs differ:\n  plain:   {p.outputs!r}\n  watched: {w.outputs!r}"
            )
        if p.error != w.error:
            out.append(f"{where}: error differs: plain {p.error!r} vs watched {w.error!r}")
        if (p.probe is None) != (w.probe is None):
            out.append(
                f"{where}: probe missing: plain {p.probe_error!r} vs watched {w.probe_error!r}"
            )
        if p.probe is not None and w.probe is not None:
            fp, fw = p.probe["fingerprint"], w.probe["fingerprint"]
            for name in sorted(set(fp) | set(fw)):
                if fp.get(name, "<absent>") != fw.get(name, "<absent>"):
                    out.append(
                        f"{where}: {name} differs: plain {fp.get(name, '<absent>')} vs "
                        f"watched {fw.get(name, '<absent>')}"
                    )
        if len(out) >= limit:
            out.append("(more differences left out)")
            break
    return out


# --- command line ----------------------------------------------------------------------------


def _resolve(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    matches = [p for p in find_notebooks() if p.stem == name or p.stem.startswith(name)]
    if len(matches) != 1:
        known = ", ".join(p.stem for p in find_notebooks())
        raise SystemExit(f"{name!r} matches {len(matches)} corpus notebooks; known: {known}")
    return matches[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.corpus.harness", description=__doc__)
    parser.add_argument("notebook", help="a path, or a corpus notebook's name or prefix")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="plain")
    parser.add_argument("--timeout", type=float, default=NOTEBOOK_TIMEOUT_S)
    parser.add_argument("--json", metavar="FILE", help="also write the probe lines to FILE")
    args = parser.parse_args(argv)
    path = _resolve(args.notebook)
    modes = MODES if args.mode == "both" else (args.mode,)
    runs = run_modes(path, modes, timeout=args.timeout)
    for run in runs.values():
        print(run.summary())
    if args.json:
        data = {mode: run.probes() for mode, run in runs.items()}
        Path(args.json).write_text(json.dumps(data, indent=1), encoding="utf-8")
    status = 0 if all(r.ok for r in runs.values()) else 1
    if len(runs) == 2:
        diffs = differences(runs["plain"], runs["watched"])
        print("identical" if not diffs else "\n".join(diffs))
        status = status or (1 if diffs else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
