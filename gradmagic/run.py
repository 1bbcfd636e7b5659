"""Watching an unmodified training script: `python -m gradmagic run train.py [ARGS...]`.

The script runs as `python train.py ARGS` would: `runpy.run_path(..., run_name="__main__")`
with `sys.argv[1:]` its arguments, `sys.path[0]` its folder, `__file__` its absolute path
(as Python 3.9+ gives it), its own traceback and exit code. One difference: runpy sets
`sys.argv[0]` to the path it runs, so it is absolute too (its basename, which argparse
shows, is the same).

A *step* is an optimizer step (each `step()` call of any optimizer that returns), or,
when no optimizer exists as the first backward runs, a backward. Each requested step is
one `watch()` block, from the return of the step before it (the script's start for
step 1) to the return of the step itself; its report is written as HTML. Between
requested steps nothing of gradmagic runs but torch's global optimizer pre-hook and a
post-hook on each optimizer that steps (counting steps), or, when steps are backwards,
the engine wrapper counting them.

The post-hook that ends a block is registered on the optimizer itself, not globally:
torch calls an optimizer's own post-hooks before the global ones, so removing the
block's (global) hooks there changes no dictionary torch is iterating.
"""

from __future__ import annotations

import contextlib
import gc
import os
import runpy
import sys
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _engine
from .capture.recorder import ACTIVE, Recorder
from .capture.watch import _dispatch, watch
from .history import History

DEFAULT_OUT = "gradmagic-run"
OPTIMIZER_STEP, BACKWARD = "optimizer step", "backward"


def parse_steps(text: str) -> list[int]:
    """`"1,100"` -> `[1, 100]`; a ValueError with a sentence for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise ValueError(
            f"{text!r} is not a list of positive whole numbers: give steps like 1 or 1,100."
        )
    return sorted(set(steps))


def rank() -> int | None:
    """This process's rank under torchrun (`RANK`), None outside it."""
    value = os.environ.get("RANK")
    return int(value) if value is not None and value.isdigit() else None


def _world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else 1


def _user_frame(frame: Any) -> Any:
    """The innermost frame of the user's code (not torch's, gradmagic's or runpy's)."""
    skip = (
        os.path.dirname(torch.__file__),
        os.path.dirname(__file__),
        os.path.dirname(runpy.__file__) + os.sep + "runpy",
    )
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    return frame


def innermost_frame(tb: Any) -> Any:
    """The user's innermost frame where a traceback ends (its locals name the leaves)."""
    last = None
    while tb is not None:
        last, tb = tb.tb_frame, tb.tb_next
    return _user_frame(last) if last is not None else None


class _StepRecorder(Recorder):
    """A block's recorder that also tells the watcher when a backward returns."""

    watcher: StepWatcher | None = None

    def handle(self, original: Any, args: tuple, kwargs: dict, frame: Any) -> Any:
        __tracebackhide__ = True
        watcher = self.watcher
        outer = (
            watcher is not None
            and not self.closed
            and self._running is None
            and self._depth == 0
            and threading.get_ident() == self._thread
        )
        backward = outer and watcher.is_backward(args, kwargs)  # type: ignore[union-attr]
        if backward:
            watcher.safely(watcher.backward_begins)  # type: ignore[union-attr]
        result = super().handle(original, args, kwargs, frame)
        if backward:
            watcher.safely(watcher.backward_returned, frame)  # type: ignore[union-attr]
        return result


class StepWatcher:
    """Watches the requested steps of a running script and writes each one's report.

    `start()` installs the step counting; `stop()` ends an unfinished step's block,
    writes its report, removes everything and says which requested steps never came.
    One line on `log` (stderr) per report written.
    """

    closed = True  # to the edit wrappers, which look for a recording block in ACTIVE

    def __init__(
        self,
        steps: Iterable[int],
        out: str | os.PathLike[str] = DEFAULT_OUT,
        *,
        script: str = "",
        rank: int | None = None,
        log: TextIO | None = None,
        quiet_if_idle: bool = False,
    ) -> None:
        self.wanted = sorted(set(steps))
        self.out = Path(out)
        self.script = script
        self.rank = rank
        self.log = log
        self.quiet_if_idle = quiet_if_idle
        self.unit: str | None = None  # fixed at the first backward or optimizer step
        self.done = 0  # steps that returned
        self.backwards = 0
        self.written: list[Path] = []
        self.opened: set[int] = set()  # steps whose block began
        self.history = History()
        self._block: tuple[Any, _StepRecorder, int] | None = None
        self._pre_hook: Any = None
        self._optimizers: dict[int, tuple[Any, Any]] = {}  # id -> (weakref, post-hook handle)
        self._counting = False
        self._depth = 0
        self._thread = threading.get_ident()
        self._started = False

    # -- installing ----------------------------------------------------------------------------
    def start(self) -> StepWatcher:
        self._started = True
        self._pre_hook = register_optimizer_step_pre_hook(self._before_step)
        self._count_backwards(True)  # until the unit is known
        if 1 in self.wanted:
            self._open(1)
        return self

    def stop(self, frame: Any = None, namespace: dict[str, Any] | None = None) -> None:
        """End the step in progress (its report is written when it did something). Its
        names come from `frame` (where an exception left the script) or `namespace`
        (the script's globals)."""
        if not self._started:
            return
        self._started = False
        if self._block is not None:
            self._close(finished=False, frame=frame, namespace=namespace)
        self._count_backwards(False)
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        for _, handle in self._optimizers.values():
            handle.remove()
        self._optimizers = {}
        self._missing()

    def _count_backwards(self, on: bool) -> None:
        if on and not self._counting:
            _engine.install(_dispatch)
            ACTIVE.insert(0, self)  # below any block: a block's recorder sees its calls
            self._counting = True
        elif not on and self._counting:
            if self in ACTIVE:
                ACTIVE.remove(self)
            _engine.uninstall()
            self._counting = False

    # -- counting ----------------------------------------------------------------------------
    def is_backward(self, args: tuple, kwargs: dict) -> bool:
        """Whether an engine call is a backward the user's code made (not a
        `torch.autograd.grad`, not one torch.compile traces)."""
        try:
            call = _engine.parse_call(args, kwargs)
            return call.accumulate_grad and _engine.skip_reason(call) is None
        except Exception:  # noqa: BLE001 - an unusual call is not counted
            return False

    def handle(self, original: Any, args: tuple, kwargs: dict, frame: Any) -> Any:
        """The engine wrapper's handler while no block records: counts backwards."""
        __tracebackhide__ = True
        backward = (
            self._depth == 0
            and threading.get_ident() == self._thread
            and self.is_backward(args, kwargs)
        )
        if backward:
            self.safely(self.backward_begins)
        self._depth += 1
        try:
            result = original(*args, **kwargs)
        finally:
            self._depth -= 1
        if backward:
            self.safely(self.backward_returned, frame)
        return result

    def backward_begins(self) -> None:
        if self.unit is None:
            self.unit = OPTIMIZER_STEP if _optimizer_exists() else BACKWARD
            if self.unit == OPTIMIZER_STEP:
                self._count_backwards(False)

    def backward_returned(self, frame: Any) -> None:
        self.backwards += 1
        if self.unit != BACKWARD:
            return
        self.done += 1
        self._step_returned(frame)

    def safely(self, fn: Any, *args: Any) -> None:
        """Run bookkeeping so that a fault in gradmagic never reaches the script."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - one line on stderr, the script runs on
            self._say(f"internal error in {fn.__name__}: {type(exc).__name__}: {exc}")

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.safely(self._note_step, optimizer)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.safely(self._step_done, optimizer, args, kwargs)

    def _note_step(self, optimizer: Any) -> None:
        if threading.get_ident() != self._thread or torch.compiler.is_compiling():
            return
        if self.unit is None:
            self.unit = OPTIMIZER_STEP
            self._count_backwards(False)
        if self.unit != OPTIMIZER_STEP:
            return
        known = self._optimizers.get(id(optimizer))
        if known is None or known[0]() is not optimizer:
            # On the optimizer itself: torch runs it before the global post-hooks.
            handle = optimizer.register_step_post_hook(self._after_step)
            self._optimizers[id(optimizer)] = (weakref.ref(optimizer), handle)

    def _step_done(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if threading.get_ident() != self._thread or self.unit != OPTIMIZER_STEP:
            return
        self.done += 1
        if self._block is not None and self._block[2] == self.done:
            # torch runs the optimizer's own post-hooks before the global ones: the block's
            # probe is told of the step here, and its global hook is gone before torch
            # iterates them (a hook added now sees the step, but knows no such optimizer).
            probe = self._block[1].steps
            if probe is not None:
                probe._after_step(optimizer, args, kwargs)
        self._step_returned(sys._getframe(2))

    def _step_returned(self, frame: Any) -> None:
        if self._block is not None and self._block[2] == self.done:
            self._close(finished=True, frame=frame)
        if self.done + 1 in self.wanted and self._started:
            self._open(self.done + 1)

    # -- blocks ------------------------------------------------------------------------------
    def _open(self, step: int) -> None:
        # An empty namespace: no naming profile hook; the names come when the block closes.
        context = watch({}, history=self.history, recorder_type=_StepRecorder)
        recorder = context.__enter__()
        recorder.watcher = self
        self._block = (context, recorder, step)
        self.opened.add(step)

    def _close(
        self, finished: bool, frame: Any = None, namespace: dict[str, Any] | None = None
    ) -> None:
        context, recorder, step = self._block  # type: ignore[misc]
        self._block = None
        user = _user_frame(frame if frame is not None else sys._getframe(1))
        names = namespace
        namespace = {}
        main = sys.modules.get("__main__")
        if main is not None:
            namespace.update(vars(main))
        namespace.update(names or {})
        if user is not None:
            namespace.update(user.f_globals)
            namespace.update(user.f_locals)
        del user, frame
        recorder.namespace = namespace
        recorder.watcher = None
        try:
            context.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - never into the script
            self._say(f"could not record {self._what(step)}: {type(exc).__name__}: {exc}")
            return
        finally:
            namespace.clear()
        if not recorder.records:
            if self.backwards or self.done:
                self._say(
                    f"{self._what(step)}: the script ended before it ran a backward; "
                    "nothing written"
                )
            elif not self.quiet_if_idle:
                self._say("the script ran no backward and no optimizer step; nothing written")
            return
        self._write(recorder, step, finished)

    def _what(self, step: int) -> str:
        return f"{self.unit or OPTIMIZER_STEP} {step}"

    def _write(self, recorder: Recorder, step: int, finished: bool) -> None:
        path = self.out / f"step-{step}.html"
        label = " · ".join(
            part
            for part in (
                self.script,
                self._what(step) + ("" if finished else " (the script ended before it returned)"),
            )
            if part
        )
        try:
            report = recorder.report()
            report.label = label
            if report.rank is None and self.rank is not None and _world_size() > 1:
                # A rank without a process group yet: its name, as `save` gives the others.
                path = self.out / f"step-{step}.rank{self.rank}.html"
            self.out.mkdir(parents=True, exist_ok=True)
            path = Path(report.save(path))  # `step-1.rank1.html` on rank 1 of several
        except Exception as exc:  # noqa: BLE001 - never into the script
            self._say(f"could not write the report of {self._what(step)}: {exc}")
            return
        self.written.append(path)
        during = "" if finished else " (the script ended during it)"
        self._say(f"{self._what(step)}{during} → {path}")

    def _missing(self) -> None:
        late = [s for s in self.wanted if s not in self.opened]
        if not late or (not self.backwards and not self.done):
            return  # said already, or nothing to say (a launcher's own process)
        unit = self.unit or OPTIMIZER_STEP
        steps = ", ".join(str(s) for s in late)
        made = f"{self.done} {unit}{'s' if self.done != 1 else ''}"
        self._say(f"{unit} {steps} not reached (the script made {made}); nothing written for it")

    def _say(self, text: str) -> None:
        log = self.log if self.log is not None else sys.stderr
        prefix = f"gradmagic[rank {self.rank}]" if self.rank is not None else "gradmagic"
        with contextlib.suppress(Exception):  # a closed stderr must not break the script
            print(f"{prefix}: {text}", file=log, flush=True)


def _optimizer_exists() -> bool:
    """Whether the process holds an optimizer (asked once, at the first backward).
    `type()`, not `isinstance`: the latter reads `__class__`, which some objects compute
    (and warn about)."""
    optimizer = torch.optim.Optimizer
    return any(issubclass(type(o), optimizer) for o in gc.get_objects())


def _script_traceback(exc: BaseException, filename: str) -> Any:
    """The traceback from the script's own first frame: what `python train.py` prints."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return tb if tb is not None else exc.__traceback__


def run_script(
    script: str,
    args: list[str],
    steps: Iterable[int] = (1,),
    out: str | os.PathLike[str] = DEFAULT_OUT,
) -> int:
    """Run `script` with `args` as `python script args` would, watching `steps`; the exit
    code is the script's (1 when it raised, as Python's)."""
    path = os.path.abspath(script)
    if not os.path.isfile(path):
        print(
            f"gradmagic run: cannot open {script!r}: no such file. "
            "Give the path of a Python script: python -m gradmagic run train.py [ARGS...]",
            file=sys.stderr,
        )
        return 2
    from . import _autorun

    _autorun.stop()  # GRADMAGIC=1 set as well: this command watches, not the start-up hook
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(path)
    watcher = StepWatcher(steps, out, script=os.path.basename(path), rank=rank())
    watcher.start()
    try:
        names = runpy.run_path(path, run_name="__main__")
    except (SystemExit, KeyboardInterrupt) as exc:
        watcher.stop(frame=innermost_frame(exc.__traceback__))
        raise
    except BaseException as exc:  # noqa: BLE001 - shown as Python shows it
        watcher.stop(frame=innermost_frame(exc.__traceback__))
        tb = _script_traceback(exc, path)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        return 1
    watcher.stop(namespace=names)
    return 0
