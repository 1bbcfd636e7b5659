"""Where a watched step's time goes: `python benchmarks/run.py --profile KEY` (cProfile)
or `--breakdown KEY` (milliseconds per step in each of gradmagic's functions)."""

from __future__ import annotations

import contextlib
import cProfile
import importlib
import io
import pstats
import statistics
import time
from typing import Any

import models
from timing import PHASES, phased_step


def profile(key: str, sizes: dict[str, Any], graph: bool, steps: int, copies: bool) -> str:
    """cProfile of watched steps: gradmagic's functions by cumulative time, then all by own time."""
    import gradmagic
    from gradmagic.history import History

    w = models.BUILDERS[key](**sizes)
    ns, history = w.namespace(), History()

    def watched() -> None:
        with gradmagic.watch(ns, history=history, graph=graph, copies=copies):
            w.step()

    for _ in range(2):
        watched()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        watched()
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    st.print_stats("gradmagic", 30)
    st.sort_stats("tottime").print_stats(25)
    return buf.getvalue()


# Functions timed by `--breakdown` ("module:Qualified.name"); missing ones are skipped.
# Not the per-event hooks (the naming profile hook, module hooks): a timer around a
# function called tens of thousands of times a step would measure mostly itself; their
# cost shows in the step benchmark as the difference from the sum of the rest.
BREAKDOWN_TARGETS = (
    "gradmagic.capture.recorder:Recorder.__init__",
    "gradmagic.capture.recorder:Recorder.handle",
    "gradmagic.capture.recorder:Recorder._begin",
    "gradmagic.capture.recorder:Recorder._before",
    "gradmagic.capture.recorder:Recorder._end",
    "gradmagic.capture.recorder:Recorder.close",
    "gradmagic.capture.recorder:Recorder._register",
    "gradmagic.capture.finish:_read_at_end",
    "gradmagic.capture.finish:_add_expected",
    "gradmagic.capture.finish:_name_leaves",
    "gradmagic.capture.finish:_place_leaves",
    "gradmagic.capture.finish:_settle",
    "gradmagic.capture.finish:_remember",
    "gradmagic.capture.finish:_steps",
    "gradmagic.capture.modules:ModuleCalls.__enter__",
    "gradmagic.capture.modules:ModuleCalls.__exit__",
    "gradmagic.graph.modules:ModuleSpans.assign",
    "gradmagic.capture.probes:OptimizerStepProbe._before_step",
    "gradmagic.capture.probes:OptimizerStepProbe._after_step",
    "gradmagic.capture.flow:FlowRecorder.__enter__",
    "gradmagic.capture.flow:FlowRecorder.__exit__",
    "gradmagic.capture.names:Namer._scan",
    "gradmagic.capture.names:may_run_user_code",
    "gradmagic.capture.edits:install",
    "gradmagic.capture.edits:uninstall",
    "gradmagic.findings:findings_for",
    "gradmagic.graph.snapshot:snapshot",
    "gradmagic.stats:read_values",
    "gradmagic.report.statistics:summaries",
    "gradmagic.stats:norms",
    "gradmagic.stats:exact_copies",
    "gradmagic.history:History.record",
    "gradmagic._engine:install",
    "gradmagic._engine:uninstall",
    "gradmagic._engine:caller_context",
)


@contextlib.contextmanager
def timed_functions(targets: tuple[str, ...]) -> Any:
    """Wrap each target with a timer; yields {target: [seconds, calls]} (inclusive times)."""
    import functools

    totals: dict[str, list[float]] = {}
    undo: list[tuple[Any, str, Any]] = []
    for target in targets:
        module_name, qualname = target.split(":")
        try:
            owner: Any = importlib.import_module(module_name)
            *path, attr = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        except (ImportError, AttributeError, KeyError):
            continue
        if not callable(original) or isinstance(original, (staticmethod, classmethod)):
            continue
        slot = totals.setdefault(target, [0.0, 0])

        def make(fn: Any, slot: list[float]) -> Any:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    slot[0] += time.perf_counter() - t0
                    slot[1] += 1

            return timed

        setattr(owner, attr, make(original, slot))
        undo.append((owner, attr, original))
    try:
        yield totals
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def breakdown(key: str, sizes: dict[str, Any], graph: bool, steps: int, copies: bool) -> str:
    """Milliseconds per watched step in each of gradmagic's functions (inclusive, nested)."""
    import gradmagic
    from gradmagic.history import History

    w = models.BUILDERS[key](**sizes)
    ns, history = w.namespace(), History()
    phases: dict[str, dict[str, list[float]]] = {"plain": {}, "watched": {}}

    def block() -> Any:
        return gradmagic.watch(ns, history=history, graph=graph, copies=copies)

    for _ in range(2):
        phased_step(w, {}, block)
        phased_step(w, {})
    with timed_functions(BREAKDOWN_TARGETS) as totals:
        for _ in range(steps):
            phased_step(w, phases["plain"])
            phased_step(w, phases["watched"], block)
    lines = [
        f"{w.name} ({w.description}), {steps} steps, graph={graph}, copies={copies}",
        "phase medians, ms (plain -> watched; the timers add a little to watched):",
    ]
    for ph in PHASES:
        p = statistics.median(phases["plain"][ph])
        q = statistics.median(phases["watched"][ph])
        lines.append(f"  {ph:>10}: {1000 * p:9.2f} -> {1000 * q:9.2f}  ({1000 * (q - p):+.2f})")
    lines.append("functions, ms per step (inclusive; nested calls count in their callers too):")
    for target, (secs, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        if calls:
            lines.append(f"  {1000 * secs / steps:9.2f} ms  {calls / steps:8.1f} calls  {target}")
    return "\n".join(lines)
