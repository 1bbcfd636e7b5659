"""`GRADMAGIC=1 python train.py`: watch a script started by any launcher.

Installing gradmagic puts `gradmagic-autorun.pth` into site-packages. Python runs its
one line at every start (twice in some virtual environments: the line checks it has not
run already); the line only reads `GRADMAGIC` and does nothing else unless it is set
(and not `0`). Then it loads this file, which imports nothing heavy: it waits
for the script to import torch (a finder on `sys.meta_path`, gone once torch is
found), so that whatever the script sets before `import torch` (threads, devices)
still counts. Once torch is in, a `StepWatcher` watches the steps in `GRADMAGIC_STEPS`
(default 1) and writes their reports into `GRADMAGIC_OUT` (default `gradmagic-run/`);
the step in progress when the process exits is written at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any

_watcher: Any = None
_finder: Any = None
_pending = False


def enabled() -> bool:
    return os.environ.get("GRADMAGIC", "").strip() not in ("", "0")


def _say(text: str) -> None:
    with contextlib.suppress(Exception):  # a closed stderr must not break the script
        print(f"gradmagic: {text}", file=sys.stderr, flush=True)


class _AfterTorch:
    """Lets torch import as usual, then starts the watcher."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        _remove_finder()
        from importlib.util import find_spec

        spec = find_spec(name)  # what the other finders say, this one removed
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            if _initializing("gradmagic"):
                global _pending  # gradmagic imports torch: start once it is whole
                _pending = True
            else:
                start()

        loader.exec_module = exec_module
        return spec


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def start_if_pending() -> None:
    """Called at the end of `gradmagic/__init__.py`: the start torch's import put off."""
    global _pending
    if _pending:
        _pending = False
        start()


def _remove_finder() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def install() -> None:
    """Called by the .pth line when GRADMAGIC is set: start once torch is imported."""
    global _finder
    if not enabled() or _finder is not None or _watcher is not None:
        return
    if "torch" in sys.modules:
        start()
        return
    _finder = _AfterTorch()
    sys.meta_path.insert(0, _finder)


_starting = False


def start() -> None:
    global _watcher, _starting
    if _watcher is not None or _starting:
        return
    _starting = True
    try:
        from gradmagic.run import DEFAULT_OUT, StepWatcher, parse_steps, rank

        try:
            steps = parse_steps(os.environ.get("GRADMAGIC_STEPS", "1"))
        except ValueError as exc:
            _say(f"GRADMAGIC_STEPS: {exc} gradmagic is off for this run.")
            return
        out = os.environ.get("GRADMAGIC_OUT") or DEFAULT_OUT
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        watcher = StepWatcher(steps, out, script=script, rank=rank(), quiet_if_idle=True)
        _watcher = watcher.start()
        atexit.register(stop)
    except Exception as exc:  # noqa: BLE001 - the script runs on, unwatched
        _say(f"GRADMAGIC is set but gradmagic could not start: {type(exc).__name__}: {exc}")
    finally:
        _starting = False


def stop() -> None:
    """Write the step in progress and remove everything (at exit, or for `gradmagic run`)."""
    global _watcher
    _remove_finder()
    watcher, _watcher = _watcher, None
    if watcher is not None:
        from gradmagic.run import innermost_frame

        # After an uncaught exception, Python keeps its traceback: the script's frames.
        watcher.stop(frame=innermost_frame(getattr(sys, "last_traceback", None)))
