"""Timing helpers shared by the benchmarks: interleaved runs, paired comparisons with
bootstrap intervals, and a training step timed phase by phase."""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import models

PHASES = ("enter", "forward", "backward", "optimizer", "exit", "report")


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of each function, run in alternating order every round.

    `cpu`, when given, receives the process CPU seconds of each call: less
    sensitive than wall time to other processes competing for the cores.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


@dataclass
class Compared:
    """One variant against the baseline of the same rounds."""

    name: str
    median_s: float
    ratio: float  # median of per-round ratios
    extra_s: float  # median of per-round differences
    samples: int
    ratio_ci: tuple[float, float] = (math.nan, math.nan)  # 95% bootstrap interval
    extra_ci: tuple[float, float] = (math.nan, math.nan)


def bootstrap_ci(values: list[float], resamples: int = 1000) -> tuple[float, float]:
    """95% interval of the median of `values` (percentile bootstrap, fixed seed)."""
    if len(values) < 3:
        return (math.nan, math.nan)
    rng = random.Random(0)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def compare(times: dict[str, list[float]], base: str) -> dict[str, Compared]:
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        extras = [t - b for t, b in zip(ts, times[base])]
        out[name] = Compared(
            name,
            statistics.median(ts),
            statistics.median(ratios),
            statistics.median(extras),
            len(ts),
            bootstrap_ci(ratios) if name != base else (1.0, 1.0),
            bootstrap_ci(extras) if name != base else (0.0, 0.0),
        )
    return out


def phased_step(w: models.Workload, into: dict[str, list[float]], watch: Any = None) -> Any:
    """One training step, timing each phase (`enter`/`exit`: the watch block's edges).

    Returns what the watch block yielded (the recorder), or None for a plain step.
    """
    clock = time.perf_counter
    t0 = clock()
    block = watch() if watch is not None else contextlib.nullcontext()
    entered = block.__enter__()
    t1 = clock()
    try:
        w.opt.zero_grad()
        loss = w.loss_fn(w.model(w.inputs), w.targets)
        t2 = clock()
        loss.backward()
        t3 = clock()
        w.opt.step()
        t4 = clock()
    finally:
        block.__exit__(None, None, None)
    t5 = clock()
    for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
        into.setdefault(name, []).append(dt)
    return entered
