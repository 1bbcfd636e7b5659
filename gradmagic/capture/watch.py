"""`watch()`: record every call into the autograd engine while a block runs."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .. import _engine, stats
from ..history import History
from ..options import Options
from ..records import RankCheck
from . import edits
from .custom import check_functions
from .ranks import check_ranks as check_ranks_now
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
    check_ranks: bool = False,
    rank_timeout: float = 60.0,
    steps: bool = False,
    check: bool = False,
    recorder_type: type[Recorder] = Recorder,
    lines: bool | None = None,
) -> Iterator[Recorder]:
    """Record every backward, optimizer step and gradient edit made inside the block.

    `namespace` names the leaves (defaults to the caller's globals and locals);
    `source` is the code of the block, used to tell which leaves were expected
    to get a gradient. Everything installed is removed when the block exits,
    also when it raises. `vanish`, `explode` and `ratio` are the gradient-norm
    thresholds of the findings; `plot` turns the gradient-flow chart on or off
    (None: on from 8 leaves). `recorder_type` is the class that records (a subclass of
    `Recorder` that also sees each engine call: the script runner's). `lines` records
    the line of code that created each op of the graph: None (the default) until the block
    has created 10,000 autograd nodes, True without that limit, False not at all.

    `steps=True` records, on small graphs, the order in which the engine ran each op
    and what it received and sent (`rep.backward_steps`). `check=True` runs
    `torch.autograd.gradcheck` on every custom `autograd.Function` the graphs ran, on
    fresh float64 inputs of the recorded shapes, when the block ends.

    Under torch.distributed, `check_ranks=True` compares every parameter's `.grad`
    across the ranks when the block ends and names those that differ. It is a
    collective: every rank must run the block with it, or the others wait
    `rank_timeout` seconds and the report says the check did not run.

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
        check_ranks=bool(check_ranks),
        rank_timeout=rank_timeout,
        steps=bool(steps),
        check=bool(check),
        lines=lines,
    )
    recorder = recorder_type(namespace, source, history, options)
    recorder.lines.entry_frame = sys._getframe(2)
    entered: list[Any] = []
    raised = False
    interrupted = False
    _engine.install(_dispatch)  # reference counted: undone once in `finally`
    try:
        edits.install()
        try:
            ACTIVE.append(recorder)
            for probe in recorder.probes:
                probe.__enter__()
                entered.append(probe)
            yield recorder
        except BaseException as exc:
            raised = True
            interrupted = not isinstance(exc, Exception)  # Ctrl-C: run nothing more
            raise
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
        if options.check and recorder.block is not None and not interrupted:
            calls, recorder.custom_functions = recorder.custom_functions, []
            checks = recorder.guard(check_functions, calls)
            recorder.block.custom_checks = checks if checks is not None else []
        if options.check_ranks and recorder.block is not None:
            recorder.block.rank_check = _rank_check(recorder, raised)


def _rank_check(recorder: Recorder, raised: bool) -> RankCheck:
    if raised:
        return RankCheck(error="the block raised on this rank, so this rank did not take part")
    check = recorder.guard(check_ranks_now, recorder, recorder.options.rank_timeout)
    return check if check is not None else RankCheck(error="it failed inside gradmagic")
