"""`SourceLines`: the line of the user's code that created each autograd node.

Every node the forward creates takes the thread's next autograd sequence number.
A trace function on the user's own frames (the cell, the script, helper functions
outside libraries) notes that number at each line it runs and as each helper
returns: the nodes numbered from one note to the next were created by the line of
the first. No tensor is touched and no mode entered, so nothing PyTorch computes
changes; anomaly mode, which would also know the lines, raises on NaN and is not
used.

Library frames get no local trace, and the trace is off inside `nn.Module` calls
and optimizer steps (`hold`), like the naming hook: an op inside `model(x)` is
credited to the line that called the model. When another trace function is
installed (a debugger, coverage) it stays alone and no line is known. With
`budget`, the trace stops once the block has created that many autograd nodes:
nodes made after that have no line.
"""

from __future__ import annotations

import bisect
import inspect
import linecache
import os
import re
import sys
from typing import Any, NamedTuple

from .. import _engine
from .holds import HeldHook
from .names import _is_library_file

# gradmagic's own files are never the user's, even run from a checkout (`_is_library_file`
# knows the package's folder only where it is installed).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

DEFAULT_BUDGET = 10_000  # autograd nodes a block may create with lines traced, by default

_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
# IPython's names for a cell's code: `<ipython-input-3-…>` in a terminal, a file under
# `ipykernel_<pid>/` in a kernel.
_CELL_FILE = re.compile(r"^<ipython-input-|[\\/]ipykernel_\d+[\\/]\d+\.py$")


class Where(NamedTuple):
    """Where a node was created: a line of the watched cell, of another cell, or of a file."""

    file: str
    line: int
    kind: str  # "block" (the watched cell or script), "cell" (another cell), "file"
    func: str  # the function running the line (`<module>` at top level)
    cell_line: int | None  # the watched block's line that called it, when known

    @property
    def label(self) -> str:
        """`line 3`; `line 2 of `f` (another cell)`; `util.py:14 in `f`, from line 3`."""
        if self.kind == "block":
            return f"line {self.line}"
        if self.kind == "cell":
            here = f"line {self.line} of `{self.func}` (another cell)"
        else:
            here = f"{os.path.basename(self.file)}:{self.line}"
            if self.func != "<module>":
                here += f" in `{self.func}`"
        return f"{here}, from line {self.cell_line}" if self.cell_line else here

    def code(self, source: str | None = None) -> str:
        """The line's code, stripped ("" when it cannot be read)."""
        if self.kind == "block" and source is not None:
            lines = source.splitlines()
            text = lines[self.line - 1] if 0 < self.line <= len(lines) else ""
        else:
            text = linecache.getline(self.file, self.line)
        return text.strip()


class SourceLines(HeldHook):
    """The trace function of one block, and the notes it took."""

    _get_hook = staticmethod(sys.gettrace)
    _set_hook = staticmethod(sys.settrace)

    def __init__(
        self,
        enabled: bool = True,
        budget: int | None = DEFAULT_BUDGET,
        source: str | None = None,
        errors: list[str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.budget = budget
        self.source = source
        self.errors = errors
        self.stopped = False  # the budget ran out: later nodes have no line
        self._counter = _engine.sequence_counter()
        self._seqs: list[int] = []  # sequence numbers at each note, non-decreasing
        self._where: list[Where | None] = []
        self._start = 0
        self._user: dict[Any, bool] = {}
        self._cell_files: dict[str, str] = {}
        self._block_file: str | None = None  # the file of the watched code
        self._cell_line: int | None = None
        self._installed = False
        self._reset_holds()
        self._tracer = self._local  # one bound method: frames traced by it are told by `is`
        self.entry_frame: Any = None  # set by `watch()`: the frame running the block
        self._frame: Any = None
        self._frame_trace: Any = None

    # -- the trace function ------------------------------------------------------------------
    def _is_user(self, code: Any) -> bool:
        user = self._user.get(code)
        if user is None:
            filename = code.co_filename
            user = not (
                _is_library_file(filename)
                or filename.startswith(_PACKAGE_DIR)
                or code.co_flags & _SUSPENDABLE
            )
            self._user[code] = user
        return user

    def _kind(self, filename: str) -> str:
        """ "block" for the watched code's own file, "cell" for another IPython cell, "file"."""
        kind = self._cell_files.get(filename)
        if kind is None:
            known = self._block_file is None and self.source is not None
            if known and "".join(linecache.getlines(filename)) == self.source:
                self._block_file = filename
            if filename == self._block_file:
                kind = "block"
            else:
                kind = "cell" if _CELL_FILE.search(filename) else "file"
            self._cell_files[filename] = kind
        return kind

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and self._is_user(frame.f_code):
            return self._tracer
        return None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self._note(frame.f_code, frame.f_lineno)
        elif event == "return":
            # Back in the caller: its current line makes what follows. A caller that is not
            # traced (a library's, or one that was running before the trace began) says no
            # line; the nearest traced frame above it is the line that called it all.
            caller = frame.f_back
            while caller is not None and caller.f_trace is not self._tracer:
                caller = caller.f_back
            if caller is None:
                self._note(None, 0)
            else:
                self._note(caller.f_code, caller.f_lineno)
            del caller
        return self._tracer

    def _note(self, code: Any, line: int) -> None:
        """From now on, nodes are made by `line` of `code` (None: by a line not known)."""
        try:
            seq = self._counter()
            if self.budget is not None and seq - self._start > self.budget:
                self._stop(seq)
                return
            if code is None:
                self._add(seq, None)
                return
            filename = code.co_filename
            kind = self._kind(filename)
            if kind == "block":
                self._cell_line = line
            cell_line = None if kind == "block" else self._cell_line
            self._add(seq, Where(filename, line, kind, code.co_name, cell_line))
        except Exception as exc:  # noqa: BLE001 - never into the user's code
            self._stop(None)
            if self.errors is not None:
                self.errors.append(f"line trace: {type(exc).__name__}: {exc}")

    def _add(self, seq: int, where: Where | None) -> None:
        if self._seqs and self._seqs[-1] == seq:
            self._where[-1] = where  # the line before created no node
        else:
            self._seqs.append(seq)
            self._where.append(where)

    def _stop(self, seq: int | None) -> None:
        self.stopped = True
        if seq is not None:
            self._seqs.append(seq)
            self._where.append(None)
        self._uninstall()

    # -- looking up ------------------------------------------------------------------------------
    def where(self, seq: int | None) -> Where | None:
        """The line that created the node numbered `seq`; None when not known."""
        if seq is None or seq < self._start or not self._seqs:
            return None
        k = bisect.bisect_right(self._seqs, seq) - 1
        return self._where[k] if k >= 0 else None

    def code(self, where: Where) -> str:
        return where.code(self.source)

    # -- on and off ------------------------------------------------------------------------------
    def _hook_function(self) -> Any:
        return self._global

    def enter(self, frame: Any = None) -> None:
        """Start tracing; `frame`, already running (a script's `with watch():`), is traced too."""
        if not self.enabled or self._counter is None or sys.gettrace() is not None:
            self.enabled = False
            return
        self._start = self._counter()
        if frame is not None and self._is_user(frame.f_code):
            self._frame, self._frame_trace = frame, frame.f_trace
            frame.f_trace = self._tracer
            if _CELL_FILE.search(frame.f_code.co_filename):  # `with watch():` in a cell
                self._block_file = frame.f_code.co_filename
            self._note(frame.f_code, frame.f_lineno)
        sys.settrace(self._global)
        self._installed = True

    def _uninstall(self) -> None:
        if self._installed and sys.gettrace() == self._global:
            sys.settrace(None)
        self._installed = False
        if self._frame is not None:
            if self._frame.f_trace is self._tracer:
                self._frame.f_trace = self._frame_trace
            self._frame = self._frame_trace = None

    def annotate(self, snap: Any) -> None:
        """Write each op node's line (`line 3`) and its code into a graph snapshot."""
        if not self._seqs:
            return
        for node in snap.nodes:
            if node.kind == "op":
                where = self.where(node.seq)
                if where is not None:
                    node.line = where.label
                    node.code = self.code(where)

    def __enter__(self) -> SourceLines:
        frame, self.entry_frame = self.entry_frame, None
        self.enter(frame)
        del frame
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed and self._counter is not None:
            # The nodes created after the last note, up to now, belong to its line;
            # those created later do not.
            self._seqs.append(self._counter())
            self._where.append(None)
        self._uninstall()
        self._reset_holds()
        self._tracer = None  # the bound method held this object: no cycle outlives the block
