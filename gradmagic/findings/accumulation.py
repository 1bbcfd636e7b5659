"""Gradients that add up: across cell runs, across steps, and on purpose (micro-batches)."""

from __future__ import annotations

from collections.abc import Iterator

from ..records import BlockRecord, LeafRecord, rows
from ._base import Finding, fix, listing, optimizer_of, plural, rule


def _left_by(rows_: list[LeafRecord]) -> str:
    """Who left the gradient this run added to: earlier watched runs, or other code."""
    runs = max(r.runs for r in rows_)
    origins = {r.before_origin for r in rows_}
    if origins == {"watched run"}:
        return (
            f"this run added to the gradient left by {plural(runs - 1, 'earlier run')} "
            f"({runs} runs now sum in `.grad`)"
        )
    if "changed" in origins:
        return (
            "this run added to a gradient already in `.grad`, which changed after the last "
            "watched run (a backward or an edit outside `%%grad`)"
        )
    return (
        "this run added to a gradient already in `.grad` from a backward outside `%%grad` "
        f"(another cell?), so {runs} runs now sum in it"
    )


@rule
def not_zeroed(block: BlockRecord) -> Iterator[Finding]:
    stale = [r for r in rows(block) if r.status == "accumulated" and r.stale_start]
    if not stale:
        return
    names = [r.name for r in stale]
    yield Finding(
        "accumulated",
        "warning",
        f"{listing(names)} {'was' if len(names) == 1 else 'were'} not zeroed: "
        f"{_left_by(stale)}. Forgotten `zero_grad()`? To start afresh, {fix(stale)} before "
        f"`backward()`.",
        tuple(names),
    )


@rule
def summed_in_block(block: BlockRecord) -> Iterator[Finding]:
    """Backwards of this block that summed where each should have started afresh: steps
    that used gradients an earlier step had already used, or one loss's backward repeated
    with no step and nothing zeroing in between."""
    shown = rows(block)
    stale = [r for r in shown if r.status == "accumulated" and r.stale_steps]
    # Gradients of a DDP that ran under `no_sync()` in the block sum on purpose: the next
    # synchronised backward all-reduces the sum (the DDP finding says so).
    unsynced = {k for f in block.ddp if f.unsynced for k in (*f.leaf_keys, *f.ignored_keys)}
    looped = [
        r
        for r in shown
        if r.status == "accumulated"
        and not r.stale_steps
        and not r.steps
        and r.summed > 1
        and r.key not in unsynced
    ]
    if stale:
        names = [r.name for r in stale]
        count = max(r.backwards for r in stale)
        opt = optimizer_of(stale)
        step = f"`{opt}.step()`" if opt else "optimizer step"
        if all(r.emptied == 0 for r in stale):
            what = f"nothing zeroed the gradient in between, so each {step} used the sum of all gradients so far"
        else:
            steps = max(r.steps for r in stale)
            what = (
                f"{max(r.stale_steps for r in stale)} of {steps} steps used gradients that "
                f"an earlier step had already used: nothing zeroed them in between"
            )
        yield Finding(
            "accumulated",
            "warning",
            f"backward ran {count} times in this cell and {listing(names)} summed them: {what}; "
            f"if each step should start afresh, {fix(stale)} before each `backward()`.",
            tuple(names),
        )
    if looped:
        names = [r.name for r in looped]
        count = max(r.summed for r in looped)
        yield Finding(
            "accumulated",
            "warning",
            f"backward ran {count} times in this cell and {listing(names)} summed every one: "
            f"nothing zeroed the gradient in between and no optimizer step used it yet. If "
            f"each backward should start afresh, {fix(looped)} before each `backward()` "
            f"(micro-batches of one step are meant to sum).",
            tuple(names),
        )


@rule
def micro_batches(block: BlockRecord) -> Iterator[Finding]:
    """Deliberate accumulation: several backwards summed into each step, emptied between."""
    summing = [
        r for r in rows(block) if r.steps and not r.stale_steps and r.cycles and max(r.cycles) > 1
    ]
    by_pattern: dict[tuple[str, int, int, int], list[LeafRecord]] = {}
    for r in summing:
        counts = [c for c in r.cycles if c]
        key = (r.optimizer or "", min(counts), max(counts), r.steps)
        by_pattern.setdefault(key, []).append(r)
    for (opt, low, high, steps), members in by_pattern.items():
        names = [r.name for r in members]
        each = f"{low}" if low == high else f"{low} to {high}"
        step = f"`{opt}.step()`" if opt else "optimizer step"
        into = f"each of {steps} steps" if steps > 1 else "the step"
        yield Finding(
            "gradient-accumulation",
            "info",
            f"{each} backwards summed into the gradient of {into} ({step}), and no step used "
            f"a gradient an earlier step had used: gradient accumulation over micro-batches "
            f"({listing(names)}).",
            tuple(names),
        )
