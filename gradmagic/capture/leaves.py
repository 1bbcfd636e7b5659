"""`LeafTrack`: what one leaf's `.grad` did during a block, kept up at every reading.

Readings happen before and after each backward, before each optimizer step and
when the block ends; each compares the content with the last reading. A
gradient that became None or all zeros starts a new accumulation run; a
backward adds to the current run; a step uses it (and a second step that uses a
gradient an earlier step already used is stale: nothing zeroed it in between).
Changes with no backward in between (a clip, an unscale, a write through
`.data`) are `Change` facts, said to come from the edit calls seen in between
when their effect matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import stats
from ..records import Change, LeafRecord

MAX_CYCLES = 64  # per-step counts kept per leaf; the totals are exact beyond it


@dataclass(slots=True)
class Edit:
    """An edit call seen during the block (capture side: ids, not names)."""

    clock: int
    what: str  # "clip_norm", "clip_value", "unscale", "scale", "scaler_step"
    factor: float | None  # what it multiplies gradients by, when it scales them
    leaf_ids: frozenset[int] | None  # the tensors it touches; None when not known
    text: str = ""  # filled when the block closes and names are known
    refs: tuple[Any, ...] = ()  # weak references to the scaler and optimizer, for names
    skipped: bool = False
    within_step: bool = False  # an unscale made by `GradScaler.step` itself


def scale_factor(before: Any, after: Any) -> float | None:
    """c when `after == c * before` for exact copies (to float32 rounding); the ratio of
    norms for summaries, which only says how much the norm changed."""
    if isinstance(before, stats.TensorSummary) and isinstance(after, stats.TensorSummary):
        if before.norm and after.norm is not None and math.isfinite(before.norm):
            return after.norm / before.norm
        return None
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return None
    if before.shape != after.shape or before.layout != torch.strided or before.is_complex():
        return None
    b, a = before.double().reshape(-1), after.double().reshape(-1)
    if not bool(torch.isfinite(b).all()) or not bool(torch.isfinite(a).all()):
        return None
    mask = b != 0
    if not bool(mask.any()) or bool((a[~mask] != 0).any()):
        return None
    c = float((a[mask] / b[mask]).median())
    tolerance = 1e-6 * float(a.abs().max()) + 1e-30
    return c if float((a - c * b).abs().max()) <= tolerance else None


_CHANGING = ("clip_norm", "clip_value", "unscale")


def classify(
    before: Any, after: Any, edits: list[Edit], leaf_id: int, when: str
) -> tuple[Change, list[Edit]]:
    """The change from `before` to `after`, and the edit calls said to have made it (their
    texts go into `Change.by` when the block closes and names are known)."""
    if after is None:
        return Change("set to None", "", before, after, when=when), []
    if stats.is_zero(after):
        return Change("zeroed", "", before, after, when=when), []
    factor = scale_factor(before, after)
    exact = isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
    what = "scaled" if exact and factor is not None else "changed"
    touching = [
        e for e in edits if e.what in _CHANGING and (e.leaf_ids is None or leaf_id in e.leaf_ids)
    ]
    if not touching:
        return Change(what, "", before, after, factor if exact else None, when), []
    if len(touching) == 1 and touching[0].factor is not None and factor is not None:
        expected = touching[0].factor
        if math.isclose(factor, expected, rel_tol=1e-4):
            return Change("scaled", "", before, after, expected, when), touching
    return Change(what, "", before, after, factor if exact else None, when), touching


class LeafTrack:
    """The live side of one `LeafRecord` while the block runs."""

    __slots__ = (
        "record",
        "attributions",
        "seen",
        "last",
        "last_clock",
        "base",
        "base_copy",
        "from_before",
        "run_changed",
        "run_summed",
        "run_graphs",
        "summed_graphs",
        "consumed",
        "leaf_id",
    )

    def __init__(self, record: LeafRecord, attributions: list[tuple[Change, list[Edit]]]) -> None:
        self.record = record
        self.attributions = attributions  # shared by the block: `Change.by` is filled at close
        self.seen = False
        self.last: Any = None
        self.last_clock = 0
        self.base: Any = None  # value where the current accumulation run started
        self.base_copy: torch.Tensor | None = None  # a large non-empty base, copied
        self.from_before = True  # the current run started from the block's `before`
        self.run_changed = False  # a change that was not an emptying, inside the run
        self.run_summed = 0
        # The graphs of the run's backwards, by id: how many distinct structures they have is
        # worked out when the block closes (hashing a graph costs; one backward never does).
        self.run_graphs: dict[int, Any] = {}
        self.summed_graphs: dict[int, Any] = {}  # the run's graphs as of the last backward
        self.consumed = False  # a step used the current gradient
        self.leaf_id = 0  # id() of the leaf, to match the tensors an edit call touched

    def _reading(self, value: Any, clock: int, edits: list[Edit], when: str) -> Any:
        """Compare a reading with the last; return the value to keep: the last one's own
        object when the content is the same (a full copy read as a norm stays the copy)."""
        same = stats.same(self.last, value) if self.seen else None
        if same:
            value = self.last
        elif same is False:
            rec = self.record
            change, by = classify(self.last, value, edits, self.leaf_id, when)
            rec.later.append(change)
            if by:
                self.attributions.append((change, by))
            if stats.is_empty(value):
                rec.emptied += 1
                self.base, self.base_copy, self.from_before = value, None, False
                self.run_changed, self.run_summed, self.consumed = False, 0, False
                self.run_graphs = {}
            else:
                self.run_changed = True
        self.seen = True
        self.last, self.last_clock = value, clock
        return value

    def before_backward(self, value: Any, clock: int, edits: list[Edit]) -> bool:
        """A reading before a backward adds to it. True when the caller should keep an
        exact copy of this gradient (a large one, to say what the backward added)."""
        if not self.seen:
            self.record.before = value
            self.base = value
            self.seen, self.last, self.last_clock = True, value, clock
            return not stats.is_empty(value) and not isinstance(value, torch.Tensor)
        self._reading(value, clock, edits, "before the next backward")
        return False

    def after_backward(
        self, value: Any, ok: bool, graph: Any, clock: int, norm: float | None = None
    ) -> bool:
        """The reading right after a backward (`norm`: its norm, for the trajectory); False
        when it added nothing (it raised before reaching this leaf)."""
        rec = self.record
        if not ok:
            rec.failed += 1
            if stats.same(self.last, value) is not False:
                self.last_clock = clock
                return False
        rec.backwards += 1
        rec.trajectory.add(norm)
        self.run_summed += 1
        self.run_graphs[id(graph)] = graph
        self.summed_graphs = self.run_graphs  # the same dict until the run starts over
        rec.summed = self.run_summed
        rec.after, rec.later, rec.stepped, rec.used = value, [], False, None
        rec.stale_start = self.from_before and not stats.is_empty(rec.before)
        self.last, self.last_clock = value, clock
        return True

    def added(self, value: Any, difference: Any = None) -> None:
        """What the backwards of the current run added: `after` itself when the run
        started empty; the exact difference for copies; `difference` (a summary of
        `grad - base_copy`) for large gradients."""
        rec = self.record
        if self.run_changed:
            rec.added, rec.added_known = None, False
        elif stats.is_empty(self.base):
            rec.added, rec.added_known = value, True
        elif isinstance(self.base, torch.Tensor) and isinstance(value, torch.Tensor):
            same_shape = self.base.shape == value.shape and self.base.layout == value.layout
            rec.added = value - self.base if same_shape else None
            rec.added_known = same_shape
        else:
            rec.added, rec.added_known = difference, difference is not None

    def at_step(self, value: Any, clock: int, edits: list[Edit], when: str) -> None:
        """The reading an optimizer step uses."""
        value = self._reading(value, clock, edits, when)
        rec = self.record
        rec.steps += 1
        if self.consumed:
            rec.stale_steps += 1
        self.consumed = True
        if len(rec.cycles) < MAX_CYCLES:
            rec.cycles.append(self.run_summed)
        rec.used, rec.stepped = value, True

    def summed_structures(self) -> int:
        """Distinct graph structures among the backwards summed into the current gradient."""
        graphs = [g for g in self.summed_graphs.values() if g is not None]
        if len(graphs) <= 1:
            return len(self.summed_graphs)
        return len({(g.repeat_of or g).structure for g in graphs})

    def at_end(self, value: Any, clock: int, edits: list[Edit], read: bool = True) -> None:
        """The block ended: `value` when it was read; otherwise only the last reading is
        known (`latest`), and nothing is said of what came after it."""
        rec = self.record
        if read:
            rec.end = self._reading(value, clock, edits, "by the end of the block")
            rec.end_read = True
        rec.latest = self.last
        rec.summed_structures = self.summed_structures()
