"""`watch()`: record every call into the autograd engine while a block runs."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .. import _engine, stats
from ..history import History
from ..options import Options
from . import edits
from .recorder import ACTIVE, Recorder


def _dispatch(original: Any, args: tuple, kwargs: dict, frame: Any) -> Any:
    """The engine wrapper's single handler: the innermost active recorder records."""
    __tracebackhide__ = True
    recorder = ACTIVE[-1] if ACTIVE else None
    if recorder is None:
        return original(*args, **kwargs)
    return recorder.handle(original, args, kwargs, frame)


@contextmanager
def watch(
    namespace: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
    history: History | None = None,
    values: int = stats.DEFAULT_VALUES,
    copies: bool = False,
    only: str | None = None,
    graph: bool = True,
    max_nodes: int = 60,
    depth: int | None = None,
    vanish: float = 1e-8,
    explode: float = 1e4,
    ratio: float = 1e4,
    plot: bool | None = None,
) -> Iterator[Recorder]:
    """Record every backward, optimizer step and gradient edit made inside the block.

    `namespace` names the leaves (defaults to the caller's globals and locals);
    `source` is the code of the block, used to tell which leaves were expected
    to get a gradient. Everything installed is removed when the block exits,
    also when it raises. `vanish`, `explode` and `ratio` are the gradient-norm
    thresholds of the findings; `plot` turns the gradient-flow chart on or off
    (None: on from 8 leaves).

    >>> x = torch.tensor([1., 2.], requires_grad=True)
    >>> with watch() as rec:
    ...     (100 * x).sum().backward()
    >>> rec.report().table.loc["x", "after"]
    tensor([100., 100.])
    """
    caller = sys._getframe(2) if namespace is None else None
    options = Options(
        values,
        copies,
        only,
        graph,
        max_nodes,
        depth,
        vanish=vanish,
        explode=explode,
        ratio=ratio,
        plot=plot,
    )
    recorder = Recorder(namespace, source, history, options)
    entered: list[Any] = []
    _engine.install(_dispatch)  # reference counted: undone once in `finally`
    try:
        edits.install()
        try:
            ACTIVE.append(recorder)
            for probe in recorder.probes:
                probe.__enter__()
                entered.append(probe)
            yield recorder
        finally:
            for probe in reversed(entered):
                recorder.guard(probe.__exit__, None, None, None)
            if recorder in ACTIVE:
                ACTIVE.remove(recorder)
            edits.uninstall()
    finally:
        _engine.uninstall()
        if caller is not None:
            # Read the caller's variables now: the block may have created them.
            recorder.namespace = {**caller.f_globals, **caller.f_locals}
            del caller
        recorder.close()
