"""A leaf's gradient norm after each backward, in bounded memory, and its sparkline.

The norms are the ones capture already reads right after each backward (a summary's
norm, or the norm of a small exact copy): keeping them costs a float per backward
and no pass over a gradient. Up to `MAX_POINTS` backwards every norm is kept; past
it, neighbouring backwards merge into buckets that keep their smallest and largest
norm, so a spike or a trend stays visible in at most `MAX_POINTS` floats.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

MAX_POINTS = 1024  # floats per leaf: every norm up to here, then (min, max) per bucket
BLOCKS = "▁▂▃▄▅▆▇█"
ZERO, NONFINITE = "·", "!"
LOG_FROM = 10.0  # a log scale where the largest norm is at least this times the smallest


def _low(a: float, b: float) -> float:
    return math.nan if a != a or b != b else min(a, b)  # NaN stays visible


def _high(a: float, b: float) -> float:
    return math.nan if a != a or b != b else max(a, b)


class Trajectory:
    """The norms of one leaf's gradient, read right after each backward that reached it.

    `count` backwards are held as buckets of `width` consecutive backwards: while
    `width == 1` every norm is kept exactly; then each bucket keeps its smallest and
    largest norm (NaN wins over both). `first` and `last` are exact.

    >>> t = Trajectory()
    >>> for n in (1.0, 2.0, 4.0):
    ...     t.add(n)
    >>> t.norms()
    [1.0, 2.0, 4.0]
    """

    __slots__ = ("count", "width", "first", "last", "missing", "_lo", "_hi")

    def __init__(self) -> None:
        self.count = 0  # backwards whose norm was recorded
        self.width = 1  # backwards per bucket
        self.first = math.nan
        self.last = math.nan
        self.missing = 0  # backwards whose gradient had no readable norm (not counted)
        self._lo = array("d")  # every norm while width == 1; else each bucket's smallest
        self._hi: array | None = None  # each bucket's largest, once width > 1

    def __len__(self) -> int:
        return self.count

    def add(self, norm: float | None) -> None:
        """One more backward's norm (None: its gradient's values could not be read)."""
        if norm is None:
            self.missing += 1
            return
        if self.count == 0:
            self.first = norm
        self.last = norm
        if self._hi is None and self.count < MAX_POINTS:
            self._lo.append(norm)
            self.count += 1
            return
        if self._hi is None:  # the first overflow: every norm so far becomes pairs
            self._hi = array("d", self._lo)
            self.width = 1
        index = self.count // self.width
        while index >= MAX_POINTS // 2:
            self._merge()
            index = self.count // self.width
        if index == len(self._lo):
            self._lo.append(norm)
            self._hi.append(norm)
        else:
            self._lo[index] = _low(self._lo[index], norm)
            self._hi[index] = _high(self._hi[index], norm)
        self.count += 1

    def _merge(self) -> None:
        """Halve the buckets: each pair of neighbours becomes one, twice as wide."""
        lo, hi = self._lo, self._hi
        assert hi is not None
        pairs = range(0, len(lo), 2)
        self._lo = array("d", (_low(lo[i], lo[min(i + 1, len(lo) - 1)]) for i in pairs))
        self._hi = array("d", (_high(hi[i], hi[min(i + 1, len(hi) - 1)]) for i in pairs))
        self.width *= 2

    def buckets(self) -> list[tuple[int, float, float]]:
        """(first backward, smallest norm, largest norm) of each bucket, backwards from 0."""
        hi = self._hi if self._hi is not None else self._lo
        return [(i * self.width, lo, h) for i, (lo, h) in enumerate(zip(self._lo, hi))]

    def norms(self) -> list[float]:
        """Every norm in order while they fit (`width == 1`); past `MAX_POINTS`
        backwards, each bucket's smallest and largest norm, bucket after bucket."""
        if self._hi is None:
            return list(self._lo)
        return [v for lo, hi in zip(self._lo, self._hi) for v in (lo, hi)]

    def compact(self, limit: int) -> Trajectory:
        """A copy of at most `limit` buckets (for the run history, which keeps many)."""
        copy = Trajectory()
        copy.count, copy.width, copy.missing = self.count, self.width, self.missing
        copy.first, copy.last = self.first, self.last
        copy._lo = array("d", self._lo)
        copy._hi = array("d", self._hi if self._hi is not None else self._lo)
        while len(copy._lo) > max(1, limit):
            copy._merge()
        if copy.width == 1:
            copy._hi = None
        return copy


@dataclass(frozen=True)
class Sparkline:
    """One character per column of backwards: its largest norm, on a linear scale from 0
    or, where the norms span more than a decade, a log scale (`scale`). `low` and `high`
    are the norms drawn as ▁ and █; · is a zero norm, ! a NaN or Inf one."""

    text: str
    scale: str  # "linear" or "log"
    low: float
    high: float
    count: int  # backwards drawn
    per_char: float  # backwards per character

    def legend(self, symbol: str = "‖g‖") -> str:
        """What the characters mean, for a tooltip or a line under a table."""
        each = (
            "one character per backward"
            if self.per_char <= 1
            else f"each character the largest of {self.per_char:.3g} backwards"
        )
        scale = (
            f"log scale: ▁ = {_num(self.low)}, █ = {_num(self.high)}"
            if self.scale == "log"
            else f"linear scale from 0: █ = {_num(self.high)}"
        )
        return f"{symbol} right after each backward, {each}; {scale}; · zero, ! NaN/Inf"


def _num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def sparkline(trajectory: Trajectory, width: int = 32) -> Sparkline | None:
    """The sparkline of a trajectory of at least two backwards (None otherwise)."""
    if trajectory.count < 2:
        return None
    buckets = trajectory.buckets()
    columns = min(width, len(buckets))
    values: list[float] = [-math.inf] * columns
    for start, _, high in buckets:
        col = min(columns - 1, start * columns // trajectory.count)
        values[col] = _high(values[col], high)
    finite = [v for v in values if math.isfinite(v) and v > 0]
    low, top = (min(finite), max(finite)) if finite else (0.0, 0.0)
    log = bool(finite) and top >= LOG_FROM * low
    chars = []
    for v in values:
        if not math.isfinite(v):
            chars.append(NONFINITE)
        elif v <= 0:
            chars.append(ZERO)
        elif log:
            level = (math.log(v) - math.log(low)) / (math.log(top) - math.log(low))
            chars.append(BLOCKS[round(level * (len(BLOCKS) - 1))])
        else:
            chars.append(BLOCKS[max(0, math.ceil(v / top * len(BLOCKS)) - 1)])
    return Sparkline(
        "".join(chars),
        "log" if log else "linear",
        low if log else 0.0,
        top,
        trajectory.count,
        trajectory.count / columns,
    )
